"""The fedseg Flower ClientApp: one vehicle trains the global UNet on its own camera frames.

A thin adapter: it turns Flower messages into calls of :mod:`fedseg` and back. The vehicle's data
partition comes from ``context.node_config`` (``partition-id``/``num-partitions`` in simulation),
its settings from ``context.run_config`` (the flattened Hydra config).
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.client import Client, ClientApp, NumPyClient
from flwr.common import Context

from fedseg.config import RunSettings, from_run_config, resolve_device
from fedseg.engine import make_optimizer, train
from fedseg.models import get_weights, set_weights
from fedseg.task import cached_data, derive_seed, make_loader, run_model


class VehicleClient(NumPyClient):
    """Local training of one vehicle (one partition of the fleet)."""

    def __init__(self, settings: RunSettings, partition_id: int) -> None:
        self.settings = settings
        self.partition_id = partition_id
        fed = settings.federation
        data = cached_data(settings.data, fed.num_clients, settings.seed)
        if not 0 <= partition_id < len(data.clients):
            raise ValueError(f"partition-id {partition_id} outside 0..{len(data.clients) - 1}")
        self.dataset = data.clients[partition_id]
        self.num_classes = data.label_map.num_classes
        self.device = resolve_device(settings.device)

    def fit(self, parameters: list, config: dict[str, Any]) -> tuple[list, int, dict[str, Any]]:
        fed, server_round = self.settings.federation, int(config.get("server_round", 0))
        seed = derive_seed(self.settings.seed, server_round, self.partition_id)
        torch.manual_seed(seed)
        model = run_model(self.settings.model, self.num_classes, seed=self.settings.seed)
        set_weights(model, parameters)
        loader = make_loader(self.dataset, batch_size=fed.batch_size, shuffle=True, seed=seed)
        optimizer = make_optimizer(model, name=fed.optimizer, lr=fed.lr)
        result = train(model, loader, optimizer, epochs=int(config.get("local_epochs", fed.local_epochs)),
                       proximal_mu=float(config.get("proximal_mu", 0.0)), device=self.device)
        metrics = {"loss": result.loss, "steps": result.steps, "partition_id": self.partition_id}
        return get_weights(model.cpu()), result.num_examples, metrics


def client_fn(context: Context) -> Client:
    """Build the vehicle for this node from its node config and the run config."""
    settings = RunSettings.from_config(from_run_config(context.run_config))
    # Ray gives each virtual vehicle `client_cpus` cores: match torch's threads so that actors
    # sharing a machine don't oversubscribe it.
    torch.set_num_threads(max(1, settings.federation.client_cpus))
    partition_id = int(context.node_config.get("partition-id", 0))
    return VehicleClient(settings, partition_id).to_client()


app = ClientApp(client_fn=client_fn)
