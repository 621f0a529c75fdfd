"""The fedseg Flower ClientApp: one vehicle trains the global UNet on its own camera frames.

A thin adapter: it turns Flower messages into calls of :mod:`fedseg` and back. The vehicle knows
only itself: ``context.node_config`` names its data (``data-root=DIR`` on an edge box, or
``partition-id``/``num-partitions``; :mod:`fedseg.deploy.vehicle`), and it loads only those frames.
Its settings come from ``context.run_config`` (the flattened Hydra config, or the Hydra ``overrides``
that :func:`expand_settings` composes into it first, parsed once per run). How it trains (plainly,
or under DP-SGD) is the privacy spec's :class:`~fedseg.privacy.LocalTrainer`. The mods around it are
:data:`VEHICLE_MODS`, one Flower mod list that Flower's ``ClientApp`` chains; each applies only in the
runs it is for (``fedseg/clients/mods.py``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message
from flwr.client import Client, ClientApp, NumPyClient
from flwr.client.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import ArrayRecord, ConfigRecord, Context

from fedseg.clients.codecs import RESIDUAL_RECORD
from fedseg.clients.mods import (
    encode_update_mod,
    packed_transport_mod,
    secure_aggregation_mod,
    sends_encoded_update,
    uses_adaptive_clipping,
    uses_fixed_clipping,
    uses_secagg,
    when,
)
from fedseg.clients.pool import pooled_vehicle
from fedseg.config import resolve_device
from fedseg.deploy.runconfig import expand_run_config
from fedseg.deploy.vehicle import NodeSpec, load_vehicle, vehicle_id
from fedseg.models import get_weights, model_with_weights
from fedseg.privacy import LocalTrainer, VehicleBudget
from fedseg.settings import RunSettings, settings_of
from fedseg.training import augmented, derive_seed, make_loader, make_optimizer, norm_state_keys

STATE_KEY = "privacy"  # context.state record holding what the trainer must keep (its accountant)
NORM_KEY = "local_norm"  # context.state record: this vehicle's own BatchNorm (federation.local_norm)


class VehicleClient(NumPyClient):
    """Local training of one vehicle, on its own frames only."""

    def __init__(self, settings: RunSettings, partition_id: int, context: Context) -> None:
        self.settings = settings
        self.partition_id = partition_id
        self.state = context.state
        self.run_id = context.run_id
        self.node = node = NodeSpec.from_node_config(context.node_config)
        vehicle = load_vehicle(settings, node, default_partition=partition_id)
        self.dataset = vehicle.dataset
        self.num_classes = vehicle.num_classes
        self.device = resolve_device(settings.device)
        self.trainer = self._trainer()

    def fit(self, parameters: list, config: dict[str, Any]) -> tuple[list, int, dict[str, Any]]:
        fed, server_round = self.settings.federation, int(config.get("server_round", 0))
        seed = derive_seed(self.settings.seed, server_round, self.partition_id)
        model = model_with_weights(self.settings.model, self.num_classes, parameters, dp=self.settings.group_norm)
        self._keep_local_norm(model, restore=True)
        torch.manual_seed(seed)
        loader = make_loader(augmented(self.dataset, fed.augment), batch_size=fed.local_batch_size, shuffle=True,
                             seed=seed)
        # The server's lr schedule sends the round's lr (fedseg.training.scheduled_lr).
        optimizer = make_optimizer(model, name=fed.optimizer, lr=float(config.get("lr", fed.lr)))
        epochs, mu = int(config.get("local_epochs", fed.local_epochs)), float(config.get("proximal_mu", 0.0))
        # A deployed vehicle trains under its own privacy floor and ledger, noise from the OS (fedseg.deploy.floor)
        trainer = self.node.guard(self.trainer, run=self.run_id, server_round=server_round,
                                  num_examples=len(self.dataset), run_privacy=self.settings.privacy.name)
        started = time.perf_counter()
        outcome = trainer.train_round(model, loader, optimizer, epochs=epochs, seed=seed,
                                      proximal_mu=mu, device=self.device)
        train_s = time.perf_counter() - started  # the round's training alone (docs/PERFORMANCE.md)
        self._keep_local_norm(model, restore=False)
        if (state := self.trainer.state()) is not None:
            self.state[STATE_KEY] = ConfigRecord({"accountant": state})
        metrics: dict[str, Any] = {"partition_id": self.partition_id, "train_s": train_s, **outcome.metrics}
        if outcome.result is None:  # did not train (e.g. privacy budget spent): the server leaves it out
            return parameters, 0, metrics
        metrics |= {"loss": outcome.result.loss, "steps": outcome.result.steps}
        # Under DP the Poisson-sampled count is random: weight by the partition size instead.
        return get_weights(model.cpu()), len(self.dataset), metrics

    def _keep_local_norm(self, model: torch.nn.Module, *, restore: bool) -> None:
        """FedBN/SiloBN (``federation.local_norm``): put this vehicle's own BatchNorm back over the global
        one (``restore``), or keep it after training, in Flower's ``context.state`` (simulation and
        deployment alike). The vehicle still sends it: the server evaluates with the frames-weighted
        mean of the vehicles' BatchNorm, and never hands that mean back to a vehicle that has its own."""
        mode = self.settings.federation.local_norm
        if mode == "none":
            return
        if restore:
            if isinstance(saved := self.state.get(NORM_KEY), ArrayRecord):
                model.load_state_dict(saved.to_torch_state_dict(), strict=False)
            return
        state = model.state_dict()
        keys = norm_state_keys(model, affine=mode == "affine")
        self.state[NORM_KEY] = ArrayRecord(torch_state_dict={k: state[k].detach().cpu() for k in keys})

    def _trainer(self) -> LocalTrainer:
        """This vehicle's trainer, sized by its data and restored from disk and Flower's context.state."""
        fed = self.settings.federation
        saved = self.state[STATE_KEY]["accountant"] if STATE_KEY in self.state else None
        return self.settings.privacy.vehicle_trainer(VehicleBudget(
            vehicle=self.partition_id, num_examples=len(self.dataset), batch_size=fed.local_batch_size,
            rounds=fed.rounds, local_epochs=fed.local_epochs,
            state_dir=Path(self.settings.output_dir) / "privacy",
            saved_state=saved if isinstance(saved, bytes) else None))


def client_fn(context: Context) -> Client:
    """Build the vehicle for this node from its node config and the run config."""
    settings = settings_of(context.run_config)
    node = NodeSpec.from_node_config(context.node_config)
    # Ray gives each virtual vehicle `client_cpus` cores: match torch's threads so that actors
    # sharing a machine don't oversubscribe it (an edge box: its node config's threads or hardware).
    torch.set_num_threads(node.torch_threads(settings.federation.client_cpus))
    return VehicleClient(settings, vehicle_id(context), context).to_client()


_kept: dict[tuple[Any, ...], VehicleClient] = {}


def kept_client_fn(context: Context) -> Client:
    """:func:`client_fn` for a vehicle's long-lived worker (``fedseg-clientapp --serve``): the vehicle (its
    frames, its trainer and DP-SGD accountant) is built once per run and kept for the run's later
    messages; a message of another run drops it. Each message's ``context.state`` (from the SuperNode)
    replaces the kept one, and the trainer's accountant is the one that state and the vehicle's ledger
    restored, advanced by this worker's own rounds since, so nothing goes back."""
    key = (context.run_id, context.node_id, vehicle_id(context), tuple(sorted(context.node_config.items())),
           tuple(sorted(context.run_config.items())))
    vehicle = _kept.get(key)
    if vehicle is None:
        _kept.clear()
        settings = settings_of(context.run_config)
        torch.set_num_threads(NodeSpec.from_node_config(context.node_config).torch_threads(
            settings.federation.client_cpus))
        vehicle = _kept[key] = VehicleClient(settings, vehicle_id(context), context)
    vehicle.state = context.state
    return vehicle.to_client()


def expand_settings(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outermost mod: Hydra ``overrides`` in the run config become the full flat config every mod reads."""
    context.run_config = expand_run_config(context.run_config, context.run_id)
    return call_next(msg, context)


# The vehicle's mods, outermost first; Flower chains them. A mod whose condition the run's settings do not
# meet passes every message through (fedseg/clients/mods.py), so each is chosen by the run's settings alone.
VEHICLE_MODS: list[Mod] = [
    packed_transport_mod,  # the message's arrays unpacked as sent (fedseg.packing), the reply's packed
    expand_settings,  # then: every mod after it reads the full run config
    # a pooled simulation node becomes the vehicle its message names (fedseg/clients/pool.py): its node
    # config and context.state; the accountant and the residual come from their own files
    pooled_vehicle(kept_elsewhere={STATE_KEY, RESIDUAL_RECORD}),
    when(uses_secagg, secure_aggregation_mod),  # Flower's secaggplus_mod; the masked vector packed
    when(sends_encoded_update, encode_update_mod),  # weights -> the codec's encoded update (+ SecAgg+ range)
    when(uses_fixed_clipping, fixedclipping_mod),  # Flower's clipping to the server's norm (central DP)
    when(uses_adaptive_clipping, adaptiveclipping_mod),  # the same to the round's adaptive norm, + its bit
]

app = ClientApp(client_fn=client_fn, mods=VEHICLE_MODS)
# The same ClientApp for the vehicle's long-lived worker (fedseg.sim.vehicle_apps.worker_main): one process
# serves a run's messages, so the vehicle is built once (kept_client_fn). Never used in simulation, where
# one Ray actor serves many virtual vehicles.
worker_app = ClientApp(client_fn=kept_client_fn, mods=VEHICLE_MODS)
