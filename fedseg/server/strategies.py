"""The strategy registry: Flower's own strategies by name, with what each aggregate is (a weighted sum?
a mean that central DP's noise covers?), and :class:`InPlaceFedAvgM`, Flower's FedAvgM without its copies.

``conf/strategy/*.yaml`` mirrors :data:`STRATEGIES` one to one; ``fedseg/server/compose.py`` wraps the
strategy built here in the run's features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.common import FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, Krum, Strategy
from flwr.server.strategy.aggregate import aggregate_inplace


@dataclass(frozen=True)
class StrategyEntry:
    """One registry entry: Flower's class, and whether its aggregate is a weighted sum of the updates
    (the only thing SecAgg+ reveals, and what client-level DP's noise calibration assumes)."""

    flower: type[FedAvg]
    weighted_sum: bool = True
    # Its new model is the (noised) mean itself: what central DP's noise calibration covers. Otherwise
    # why not (for the error message).
    why_not_mean: str | None = None

    @property
    def noise_on_mean(self) -> bool:
        return self.why_not_mean is None


class InPlaceFedAvgM(FedAvgM):
    """Flower's FedAvgM, the same arithmetic (velocity ``m = momentum * m + (w - mean)``, then
    ``w -= server_learning_rate * m``), done in place: Flower's own keeps about ten copies of the model
    at once (a weighted copy per vehicle, the weights decoded twice, gradient, velocity, result), which
    at UNet-ResNet34's 97 MB got a shared 23 GB machine's vehicles killed for memory in round 2."""

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        if not self.server_opt or not results or (failures and not self.accept_failures):
            return super().aggregate_fit(server_round, results, failures)
        assert self.initial_parameters is not None, "server momentum needs the initial model"
        mean = aggregate_inplace(results)
        weights = parameters_to_ndarrays(self.initial_parameters)
        velocity = self.momentum_vector if server_round > 1 and self.server_momentum > 0 else None
        for i, (w, m) in enumerate(zip(weights, mean, strict=True)):
            step = np.subtract(w, m, dtype=np.result_type(w, m))  # the pseudo-gradient
            if velocity is not None:
                step = np.add(velocity[i] * self.server_momentum, step)
            if self.server_momentum > 0:
                mean[i] = step  # kept as the velocity below (the mean's slot is free now)
            weights[i] = (w - self.server_learning_rate * step).astype(w.dtype, copy=False)
        if self.server_momentum > 0:
            self.momentum_vector = mean
        self.initial_parameters = parameters = ndarrays_to_parameters(weights)
        metrics = self.fit_metrics_aggregation_fn([(r.num_examples, r.metrics) for _, r in results]) \
            if self.fit_metrics_aggregation_fn else {}
        return parameters, metrics


_ROBUST = "is not a mean (it picks or trims updates, so one vehicle's influence is not bounded by C/m)"
# The strategy registry, mirrored one to one by conf/strategy/*.yaml.
STRATEGIES: dict[str, StrategyEntry] = {
    "fedavg": StrategyEntry(FedAvg),
    "fedprox": StrategyEntry(FedProx),
    # Server momentum (Hsu et al., 2019): Flower's FedAvgM, server_learning_rate and server_momentum.
    "fedavgm": StrategyEntry(InPlaceFedAvgM, why_not_mean=(
        "steps a server optimizer (momentum) on the mean, and Flower's wrapper noises the optimizer's output")),
    "fedadam": StrategyEntry(FedAdam, why_not_mean=(
        "steps a server optimizer whose adaptive scale changes the mean's sensitivity, and Flower's "
        "wrapper noises the optimizer's output")),
    # Robust aggregation (coordinate-wise median / trimmed mean / Krum): each needs every update in clear.
    "fedmedian": StrategyEntry(FedMedian, weighted_sum=False, why_not_mean=_ROBUST),
    "fedtrimmedavg": StrategyEntry(FedTrimmedAvg, weighted_sum=False, why_not_mean=_ROBUST),
    "krum": StrategyEntry(Krum, weighted_sum=False, why_not_mean=_ROBUST),
}


def strategy_entry(name: str) -> StrategyEntry:
    """The registry entry for ``name``; an unknown name lists the valid ones."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid: {sorted(STRATEGIES)}")
    return STRATEGIES[name]


def build_strategy(name: str, options: dict[str, Any], **common: Any) -> Strategy:
    """Instantiate Flower's strategy ``name`` with its own options plus the shared arguments."""
    return strategy_entry(name).flower(**common, **options)

