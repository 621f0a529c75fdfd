"""Server strategies: a registry of Flower's own, and a wrapper that records every round.

``RoundRecorder`` wraps whatever strategy the run uses (FedAvg, FedProx, FedAdam, or a DP wrapper
around one of them) and turns what passes through it into the run-output contract: real serialized
bytes each way, the vehicles' training loss, their privacy spend, and the server-side evaluation.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from flwr.common import FitIns, FitRes, Parameters, Scalar
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAdam, FedAvg, FedProx, Strategy

from fedseg.reporting import split_metrics

STRATEGIES: dict[str, type[FedAvg]] = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}


def build_strategy(name: str, options: dict[str, Any], **common: Any) -> Strategy:
    """Instantiate Flower's strategy ``name`` with its own options plus the shared arguments."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid: {sorted(STRATEGIES)}")
    return STRATEGIES[name](**common, **options)


def parameters_bytes(parameters: Parameters) -> int:
    """Serialized size of a parameter set as it travels (Flower's ndarray bytes)."""
    return sum(len(t) for t in parameters.tensors)


class RoundRecorder(Strategy):
    """Delegates to ``inner`` and calls ``on_round(row)`` after each server-side evaluation."""

    def __init__(self, inner: Strategy, on_round: Callable[[dict[str, Any]], None]) -> None:
        self.inner = inner
        self.on_round = on_round
        self.client_epsilon: dict[str, float] = {}
        self._pending: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"RoundRecorder({self.inner!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        self._pending = {
            "t0": time.perf_counter(),
            "bytes_down": sum(parameters_bytes(ins.parameters) for _, ins in instructions),
        }
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        trained = [(p, r) for p, r in results if not r.metrics.get("skipped")]
        skipped = [str(r.metrics.get("partition_id", p.cid)) for p, r in results if r.metrics.get("skipped")]
        n = sum(r.num_examples for _, r in trained)
        losses = [(r.num_examples, r.metrics["loss"]) for _, r in trained if "loss" in r.metrics]
        for proxy, res in results:
            if res.metrics.get("epsilon") is not None:
                self.client_epsilon[str(res.metrics.get("partition_id", proxy.cid))] = float(res.metrics["epsilon"])
        self._pending.update(
            bytes_up=sum(parameters_bytes(r.parameters) for _, r in results),
            train_loss=sum(k * v for k, v in losses) / max(1, sum(k for k, _ in losses)) if losses else None,
            clients=len(trained),
            skipped=skipped,
            failures=len(failures),
            examples=n,
        )
        aggregated = self.inner.aggregate_fit(server_round, trained, failures) if trained else (None, {})
        if "t0" in self._pending:  # configure_fit opened this round
            self._pending["round_s"] = time.perf_counter() - self._pending["t0"]
        return aggregated

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                           ) -> list:
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results: list, failures: list
                           ) -> tuple[float | None, dict[str, Scalar]]:
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        evaluated = self.inner.evaluate(server_round, parameters)
        if evaluated is None:
            return None
        loss, metrics = evaluated
        pending, self._pending = self._pending, {}
        pending.pop("t0", None)
        scalars, per_class = split_metrics(dict(metrics))  # type: ignore[arg-type]
        row = {
            "round": server_round,
            "loss": loss,
            **scalars,
            "per_class_iou": per_class,
            "epsilon": max(self.client_epsilon.values()) if self.client_epsilon else None,
            "client_epsilon": dict(self.client_epsilon) or None,
            "bytes_up": pending.pop("bytes_up", 0),
            "bytes_down": pending.pop("bytes_down", 0),
            "round_s": pending.pop("round_s", 0.0),
            "clients": pending.pop("clients", 0),
            **pending,
        }
        self.on_round(row)
        return evaluated
