"""The strategy registry: Flower's own strategies by name, with what each aggregate is (a weighted sum?
a mean that central DP's noise covers?); :class:`InPlaceFedAvgM`, Flower's FedAvgM without its copies;
and two levers Flower lacks as strategies: :class:`Cyclic` (one vehicle after another) and :class:`FedExP`.

``conf/strategy/*.yaml`` mirrors :data:`STRATEGIES` one to one; ``fedseg/server/compose.py`` wraps the
strategy built here in the run's features.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.common import FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, Krum
from flwr.server.strategy.aggregate import aggregate_inplace

log = logging.getLogger("fedseg")


@dataclass(frozen=True)
class StrategyEntry:
    """One registry entry: Flower's class, and whether its aggregate is a weighted sum of the updates
    (the only thing SecAgg+ reveals, and what client-level DP's noise calibration assumes)."""

    flower: type[FedAvg]
    weighted_sum: bool = True
    # Its new model is the (noised) mean itself: what central DP's noise calibration covers. Otherwise
    # why not (for the error message).
    why_not_mean: str | None = None
    # Why SecAgg+ cannot hide what it aggregates, if a weighted sum is not the whole story (for the error).
    why_not_secagg: str | None = None
    # Vehicles it trains a round whatever federation.fraction_fit says (None: Flower's sampling).
    vehicles_per_round: int | None = None
    # A server optimizer stepping from a plain mean: under central DP it steps outside the noise, on the
    # noised mean (post-processing; fedseg/server/noised_mean.py), so central DP admits it.
    server_optimizer: bool = False

    @property
    def noise_on_mean(self) -> bool:
        return self.why_not_mean is None

    @property
    def secagg_refusal(self) -> str | None:
        """Why SecAgg+ cannot run under this strategy, or None."""
        return self.why_not_secagg or (None if self.weighted_sum else "needs each update")


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


class Cyclic(FedAvg):
    """Cyclic (sequential) training: one vehicle a round, in a fixed order, its model the next global model.

    Chang et al. 2018 ("distributed deep learning networks among institutions", cyclical weight transfer)
    and Flower's ``FedXgbCyclic``: K rounds visit the K vehicles once, so a run of ``rounds x K`` rounds
    trains the frames ``rounds`` rounds of FedAvg train, but one vehicle after another: every step
    starts where the last vehicle's ended (the sequential steps FedAvg's parallel vehicles give up).
    The order is the vehicles' node ids sorted, fixed for the run; a vehicle that has left is skipped.
    """

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        client_manager.wait_for(self.min_available_clients, timeout=86400)  # the fleet's manager caps the wait
        vehicles = sorted(client_manager.all().values(), key=lambda proxy: str(proxy.cid))
        if not vehicles:
            return []
        config = self.on_fit_config_fn(server_round) if self.on_fit_config_fn is not None else {}
        return [(vehicles[(server_round - 1) % len(vehicles)], FitIns(parameters, config))]


class FedExP(FedAvg):
    """FedExP (Jhunjhunwala, Wang and Joshi, ICLR 2023): FedAvg with an adaptive server step, extrapolating
    from the current model through the vehicles' mean by

        eta = max(1, sum_k p_k ||w - w_k||^2 / (2 (||w - mean||^2 + epsilon)))

    (``p_k``: the vehicles' frame weights), the POCS extrapolation step: large when the vehicles' updates
    disagree (their mean is short against each), 1 (FedAvg) when they agree. Norms are over trained
    weights only: arrays ``statistics`` tags (BatchNorm running statistics, set by
    ``fedseg/server/compose.py``) are pooled by ``StatisticsMean`` instead. Needs each update: no SecAgg+,
    and the step depends on the updates: no central DP.
    """

    def __init__(self, *, epsilon: float = 1e-3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.statistics: list[bool | str] = []
        self.server_step: float | None = None  # the last round's eta

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.initial_parameters  # kept (Flower's FedAvg drops it): the model the next step starts from

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        if not results or (failures and not self.accept_failures):
            return super().aggregate_fit(server_round, results, failures)
        assert self.initial_parameters is not None, "FedExP steps from the current model"
        current = parameters_to_ndarrays(self.initial_parameters)
        trained = [i for i, w in enumerate(current) if np.issubdtype(w.dtype, np.floating)
                   and not (i < len(self.statistics) and self.statistics[i])]
        total = sum(r.num_examples for _, r in results)
        spread = 0.0
        for _, res in results:  # sum_k p_k ||w - w_k||^2, one vehicle's arrays at a time
            arrays = parameters_to_ndarrays(res.parameters)
            share = res.num_examples / total if total else 1 / len(results)
            spread += share * sum(float(np.sum(np.square(current[i] - arrays[i], dtype=np.float64))) for i in trained)
        mean = aggregate_inplace(results)
        shortfall = sum(float(np.sum(np.square(current[i] - mean[i], dtype=np.float64))) for i in trained)
        self.server_step = eta = max(1.0, spread / (2 * (shortfall + self.epsilon)))
        log.info(f"round {server_round}: FedExP server step {eta:.2f}")
        for i in trained:  # w - eta (w - mean); everything else leaves as the mean
            mean[i] = (current[i] - eta * (current[i] - mean[i])).astype(current[i].dtype, copy=False)
        self.initial_parameters = parameters = ndarrays_to_parameters(mean)
        metrics = self.fit_metrics_aggregation_fn([(r.num_examples, r.metrics) for _, r in results]) \
            if self.fit_metrics_aggregation_fn else {}
        return parameters, metrics


_ROBUST = "is not a mean (it picks or trims updates, so one vehicle's influence is not bounded by C/m)"
# The strategy registry, mirrored one to one by conf/strategy/*.yaml.
STRATEGIES: dict[str, StrategyEntry] = {
    "fedavg": StrategyEntry(FedAvg),
    "fedprox": StrategyEntry(FedProx),
    # Server momentum (Hsu et al., 2019): Flower's FedAvgM, server_learning_rate and server_momentum.
    "fedavgm": StrategyEntry(InPlaceFedAvgM, server_optimizer=True, why_not_mean=(
        "steps a server optimizer (momentum) on the mean")),
    "fedadam": StrategyEntry(FedAdam, server_optimizer=True, why_not_mean=(
        "steps a server optimizer (Adam) on the mean")),
    # Levers that give back sequential steps (docs/PERFORMANCE.md "Federated vs centralized").
    "cyclic": StrategyEntry(Cyclic, vehicles_per_round=1, why_not_mean=(
        "trains one vehicle a round: the new model is that vehicle's model, not a mean over vehicles"),
        why_not_secagg="trains one vehicle a round, so the sum SecAgg+ reveals is that vehicle's update"),
    "fedexp": StrategyEntry(FedExP, weighted_sum=False, why_not_mean=(
        "scales its server step by the spread of the vehicles' updates, which the noise does not cover")),
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


def build_strategy(name: str, options: dict[str, Any], **common: Any) -> FedAvg:
    """Instantiate Flower's strategy ``name`` with its own options plus the shared arguments."""
    return strategy_entry(name).flower(**common, **options)

