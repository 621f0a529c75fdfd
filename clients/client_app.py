"""The fedseg Flower ClientApp: one vehicle trains the global UNet on its own camera frames.

A thin adapter: it turns Flower messages into calls of :mod:`fedseg` and back. The vehicle's data
partition comes from ``context.node_config`` (``partition-id``/``num-partitions`` in simulation),
its settings from ``context.run_config`` (the flattened Hydra config).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from flwr.client import Client, ClientApp, NumPyClient
from flwr.common import ConfigRecord, Context

from clients.mods import central_dp_clipping_mod, secure_aggregation_mod
from fedseg.config import RunSettings, from_run_config, resolve_device
from fedseg.data import cached_fleet
from fedseg.models import build_run_model, get_weights, set_weights
from fedseg.privacy import ClientPrivacy, DPSpec, private_round, steps_per_epoch, uses_dp_model
from fedseg.training import derive_seed, make_loader, make_optimizer, train


class VehicleClient(NumPyClient):
    """Local training of one vehicle (one partition of the fleet)."""

    def __init__(self, settings: RunSettings, partition_id: int, context: Context) -> None:
        self.settings = settings
        self.partition_id = partition_id
        self.state = context.state
        fed = settings.federation
        data = cached_fleet(settings.data, fed.num_clients, settings.seed)
        if not 0 <= partition_id < len(data.clients):
            raise ValueError(f"partition-id {partition_id} outside 0..{len(data.clients) - 1}")
        self.dataset = data.clients[partition_id]
        self.num_classes = data.label_map.num_classes
        self.device = resolve_device(settings.device)
        privacy = settings.blocks.get("privacy", {})
        self.dp = DPSpec.from_block(privacy) if privacy.get("name") == "dpsgd" else None
        self.dp_model = uses_dp_model(privacy.get("name", "none"))
        self.dp_state_dir = Path(privacy.get("state_dir") or Path(settings.output_dir) / "privacy")

    def fit(self, parameters: list, config: dict[str, Any]) -> tuple[list, int, dict[str, Any]]:
        fed, server_round = self.settings.federation, int(config.get("server_round", 0))
        seed = derive_seed(self.settings.seed, server_round, self.partition_id)
        model = build_run_model(self.settings.model, self.num_classes, seed=self.settings.seed, dp=self.dp_model)
        set_weights(model, parameters)
        torch.manual_seed(seed)  # after run_model, which seeds the (overwritten) initialisation
        loader = make_loader(self.dataset, batch_size=fed.batch_size, shuffle=True, seed=seed)
        optimizer = make_optimizer(model, name=fed.optimizer, lr=fed.lr)
        epochs, mu = int(config.get("local_epochs", fed.local_epochs)), float(config.get("proximal_mu", 0.0))
        metrics: dict[str, Any] = {"partition_id": self.partition_id}
        if self.dp is None:
            result = train(model, loader, optimizer, epochs=epochs, proximal_mu=mu, device=self.device)
        else:
            privacy = self._privacy()
            result = private_round(privacy, model, loader, optimizer, epochs=epochs, seed=seed,
                                   proximal_mu=mu, device=self.device)
            self.state["privacy"] = ConfigRecord({"accountant": privacy.to_bytes()})
            metrics |= {"epsilon": privacy.epsilon(), "delta": privacy.delta,
                        "noise_multiplier": privacy.noise_multiplier}
            if result is None:  # budget exhausted: say so; the server leaves this vehicle out
                return parameters, 0, metrics | {"skipped": True, "reason": "privacy budget exhausted"}
        metrics |= {"loss": result.loss, "steps": result.steps}
        # Under DP the Poisson-sampled count is random: weight by the partition size instead.
        return get_weights(model.cpu()), len(self.dataset), metrics

    def _privacy(self) -> ClientPrivacy:
        """This vehicle's accountant: from its disk file, then Flower's context.state if that spent more."""
        fed, n = self.settings.federation, len(self.dataset)
        assert self.dp is not None
        privacy = ClientPrivacy(
            self.dp, num_examples=n, batch_size=fed.batch_size,
            planned_steps=fed.rounds * fed.local_epochs * steps_per_epoch(n, fed.batch_size),
            state_path=self.dp_state_dir / f"vehicle_{self.partition_id}.json")
        if "privacy" in self.state:
            privacy.load_state(self.state["privacy"]["accountant"])  # type: ignore[index]
        return privacy


def client_fn(context: Context) -> Client:
    """Build the vehicle for this node from its node config and the run config."""
    settings = RunSettings.from_config(from_run_config(context.run_config))
    # Ray gives each virtual vehicle `client_cpus` cores: match torch's threads so that actors
    # sharing a machine don't oversubscribe it.
    torch.set_num_threads(max(1, settings.federation.client_cpus))
    partition_id = int(context.node_config.get("partition-id", 0))
    return VehicleClient(settings, partition_id, context).to_client()


# Mods read the run config per message: SecAgg+ and central-DP clipping switch on only when configured.
app = ClientApp(client_fn=client_fn, mods=[secure_aggregation_mod, central_dp_clipping_mod])
