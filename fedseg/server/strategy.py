"""Server strategies: a registry of Flower's own, and a wrapper that records every round.

``RoundRecorder`` wraps whatever strategy the run uses (FedAvg, FedProx, FedAdam, or Flower's DP
wrapper around one of them) and turns what passes through it into the run-output contract: real
serialized bytes each way, the vehicles' training loss, their privacy spend, and the server-side
evaluation. The order of the wrappers is fixed in one place, ``fedseg/server/compose.py``.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    bytes_to_ndarray,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, Krum, Strategy
from flwr.server.strategy.aggregate import aggregate_inplace

from fedseg.errors import RunFailed
from fedseg.runlog import metrics_row

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


def mean_train_loss(metrics: list[tuple[int, dict]]) -> dict[str, float]:
    """Vehicles' training loss weighted by their frames (also what Flower logs as fit metrics)."""
    pairs = [(n, m["loss"]) for n, m in metrics if "loss" in m]
    total = sum(n for n, _ in pairs)
    return {"train_loss": sum(n * v for n, v in pairs) / total} if total else {}


def failure_reason(failure: BaseException | tuple[ClientProxy, FitRes]) -> str:
    """One line saying why a vehicle's fit failed (Flower hands failures as exceptions or bad replies)."""
    if isinstance(failure, BaseException):
        text = str(failure.args[0] if failure.args else failure)
        reason = getattr(failure.args[0], "reason", None) if failure.args else None  # Flower's Error record
        text = str(reason) if reason else text
    else:
        text = f"vehicle replied {failure[1].status.code.name}: {failure[1].status.message}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(failure).__name__)[:300]


def build_strategy(name: str, options: dict[str, Any], **common: Any) -> Strategy:
    """Instantiate Flower's strategy ``name`` with its own options plus the shared arguments."""
    return strategy_entry(name).flower(**common, **options)


def parameters_bytes(parameters: Parameters) -> int:
    """Serialized size of a parameter set as it travels (Flower's ndarray bytes)."""
    return sum(len(t) for t in parameters.tensors)


class StrategyWrapper(Strategy):
    """A strategy that delegates every call to ``inner``; wrappers override only what they change."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        return self.inner.aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                           ) -> list:
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results: list, failures: list
                           ) -> tuple[float | None, dict[str, Scalar]]:
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return self.inner.evaluate(server_round, parameters)


def _header(tensor: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """Shape, Fortran order, dtype and data offset of one serialized array (numpy's .npy bytes, as
    Flower sends them), from its header only."""
    stream = io.BytesIO(tensor)
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(stream)
    return shape, fortran, np.dtype(dtype), stream.tell()


def _dtype(tensor: bytes) -> np.dtype:
    return _header(tensor)[2]


def parameters_view(parameters: Parameters) -> list[np.ndarray]:
    """``parameters_to_ndarrays`` without the copy: read-only arrays over the message's bytes (for code
    that only reads them, e.g. screening 4 x 98 MB of replies every round)."""
    views = []
    for tensor in parameters.tensors:
        shape, fortran, dtype, offset = _header(tensor)
        flat = np.frombuffer(tensor, dtype=dtype, count=math.prod(shape), offset=offset)
        views.append(flat.reshape(shape, order="F" if fortran else "C"))
    return views


class StatisticsMean(StrategyWrapper):
    """Around Flower's strategy: arrays that are statistics, not trained weights, leave each round as
    what the vehicles' statistics say about all their frames together.

    A BatchNorm running mean becomes the frame-weighted mean of the vehicles' means; a running
    variance the variance of their mixture, ``sum_k w_k (var_k + mean_k^2) - mean^2`` (the plain mean
    of variances leaves out how far the towns' means lie apart, and the server evaluated every frame
    with too small a variance); other statistics (counters) their frame-weighted mean. Every array
    leaves with the vehicles' dtype: Flower's FedAdam multiplies by a float64 bias correction, and a
    float64 global model would have the next round's float32 updates rejected. Defects this
    fixes besides: Flower's in-place FedAvg scales integer arrays by a weight cast to their dtype (0),
    so ``num_batches_tracked`` came back 0 every round; and a server optimizer (FedAvgM, FedAdam)
    stepped running means and variances as if they were weights (momentum can push a variance below
    zero). ``statistics`` tags each array (``fedseg.training.statistics_mask`` of the run's model:
    "" a weight, else ``running_mean``/``running_var``/``buffer``; ``True`` a generic statistic);
    integer arrays are always statistics.
    """

    def __init__(self, inner: Strategy, statistics: Sequence[bool | str] | None = None) -> None:
        super().__init__(inner)
        self.statistics = list(statistics) if statistics is not None else []

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        aggregated, metrics = self.inner.aggregate_fit(server_round, results, failures)
        if aggregated is None or not results:
            return aggregated, metrics
        tags = self.statistics + [""] * (len(aggregated.tensors) - len(self.statistics))
        total = sum(r.num_examples for _, r in results)
        weights = [r.num_examples / total if total else 1 / len(results) for _, r in results]

        def arrays(i: int) -> list[np.ndarray]:
            return [bytes_to_ndarray(r.parameters.tensors[i]).astype(np.float64) for _, r in results]

        def mean(values: list[np.ndarray]) -> np.ndarray:
            return np.sum([v * w for v, w in zip(values, weights, strict=True)], axis=0)

        first = results[0][1].parameters.tensors
        for i, tag in enumerate(tags):
            kind = _dtype(first[i])
            if not tag and not np.issubdtype(kind, np.integer):
                if _dtype(aggregated.tensors[i]) != kind:  # FedAdam's bias correction makes float64 weights
                    aggregated.tensors[i] = ndarray_to_bytes(bytes_to_ndarray(aggregated.tensors[i]).astype(kind))
                continue
            value = mean(arrays(i))
            if tag == "running_var" and tags[i - 1] == "running_mean":  # BatchNorm's state-dict order
                means = arrays(i - 1)
                value = mean([v + m**2 for v, m in zip(arrays(i), means, strict=True)]) - mean(means) ** 2
            value = np.rint(value).astype(kind) if np.issubdtype(kind, np.integer) else value.astype(kind)
            aggregated.tensors[i] = ndarray_to_bytes(value)
        return aggregated, metrics


def reply_order(result: tuple[ClientProxy, FitRes]) -> tuple[int, str]:
    """A vehicle's place in the order replies are aggregated in: its partition id, else Flower's node id.

    Replies arrive in whatever order the vehicles finish, and a float32 weighted sum depends on the
    order of its terms, so without a fixed order two runs with the same seed can drift apart (two
    runs of the default experiment before this order existed ended 1.3 mIoU points apart).
    """
    proxy, res = result
    partition = res.metrics.get("partition_id")
    return (int(partition), "") if isinstance(partition, int) else (2**63, str(proxy.cid))


class RoundRecorder(StrategyWrapper):
    """Delegates to ``inner`` and calls ``on_round(row)`` after each server-side evaluation.

    Other wrappers add to a round's row with :meth:`annotate` (their fields win over the recorder's
    own, e.g. the bytes SecAgg+ really carried); ``central_dp`` maps a round to the vehicle-level
    ``(epsilon, delta)`` of client-level DP.
    """

    def __init__(self, inner: Strategy, on_round: Callable[[dict[str, Any]], None],
                 central_dp: Callable[[int], tuple[float, float]] | None = None, min_replies: int = 1) -> None:
        super().__init__(inner)
        self.on_round = on_round
        self.central_dp = central_dp
        self.min_replies = min_replies  # fewer vehicles answering a round than this stops the run
        self.client_epsilon: dict[str, float] = {}
        self.client_delta: dict[str, float] = {}
        self._pending: dict[str, Any] = {}
        self._notes: dict[int, dict[str, Any]] = {}

    def annotate(self, server_round: int, fields: dict[str, Any]) -> None:
        """Fields to merge into the row of ``server_round`` when it is emitted."""
        self._notes.setdefault(server_round, {}).update(fields)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        if not instructions:  # Flower would skip the round silently and evaluate an unchanged model
            raise RunFailed(f"round {server_round}: no vehicle was sampled ({client_manager.num_available()} "
                            "available; federation.num_clients, fraction_fit and min_fit_clients)")
        self._pending = {
            "t0": time.perf_counter(),
            "sampled": len(instructions),
            "bytes_down": sum(parameters_bytes(ins.parameters) for _, ins in instructions),
        }
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        results = sorted(results, key=reply_order)  # float sums must not depend on which reply came first
        trained = [(p, r) for p, r in results if not r.metrics.get("skipped")]
        skipped = [str(r.metrics.get("partition_id", p.cid)) for p, r in results if r.metrics.get("skipped")]
        n = sum(r.num_examples for _, r in trained)
        for proxy, res in results:
            vehicle = str(res.metrics.get("partition_id", proxy.cid))
            if res.metrics.get("epsilon") is not None:  # cumulative per vehicle: keep the latest
                self.client_epsilon[vehicle] = float(res.metrics["epsilon"])
                self.client_delta[vehicle] = float(res.metrics.get("delta", 0.0))
        errors = [failure_reason(f) for f in failures]
        silent = self._pending.get("sampled", 0) - len(results) - len(failures)
        if silent > 0:  # no reply within federation.round_timeout (or lost on the way)
            errors.append(f"{silent} vehicle(s) gave no answer within federation.round_timeout")
        self._pending.update(
            bytes_up=sum(parameters_bytes(r.parameters) for _, r in results),
            train_loss=mean_train_loss([(r.num_examples, r.metrics) for _, r in trained]).get("train_loss"),
            clients=len(trained),
            skipped=skipped,
            failures=len(failures) + max(silent, 0),
            failure=errors[0] if errors else None,
            examples=n,
            # Each vehicle's training seconds (its `train_s` metric): how much of round_s is training.
            train_s={str(r.metrics.get("partition_id", p.cid)): float(r.metrics["train_s"])
                     for p, r in trained if "train_s" in r.metrics},
        )
        if errors:
            log.warning(f"round {server_round}: {self._pending['failures']} vehicle(s) failed; first: {errors[0]}")
        if len(results) < self.min_replies:
            raise RunFailed(f"round {server_round}: only {len(results)} of {self._pending.get('sampled')} "
                            f"vehicles answered, below federation.min_fit_clients={self.min_replies}"
                            + (f"; first vehicle error: {errors[0]}" if errors else ""))
        aggregated = self.inner.aggregate_fit(server_round, trained, failures) if trained else (None, {})
        rejected = self._notes.get(server_round, {}).get("rejected", [])
        if trained and aggregated[0] is None and len(rejected) >= len(trained):
            # Every update was rejected (guard or codec decoder): the model could not change, so stop
            # instead of "training" on.
            raise RunFailed(f"round {server_round}: every vehicle's update was rejected ({len(rejected)}); "
                            f"first: vehicle {rejected[0]['vehicle']}: {rejected[0]['reason']}")
        if "t0" in self._pending:  # configure_fit opened this round
            self._pending["round_s"] = time.perf_counter() - self._pending["t0"]
        return aggregated

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        evaluated = self.inner.evaluate(server_round, parameters)
        if evaluated is None:
            return None
        loss, metrics = evaluated
        pending, self._pending = self._pending, {}
        pending.pop("t0", None)
        row = metrics_row(
            server_round, loss, dict(metrics),  # type: ignore[arg-type]
            **self._privacy_fields(server_round),
            client_epsilon=dict(self.client_epsilon) or None,
            bytes_up=pending.pop("bytes_up", 0),
            bytes_down=pending.pop("bytes_down", 0),
            round_s=pending.pop("round_s", 0.0),
            clients=pending.pop("clients", 0),
            **pending,
        )
        self.on_round({**row, **self._notes.pop(server_round, {})})
        return evaluated

    def _privacy_fields(self, server_round: int) -> dict[str, Any]:
        """``epsilon`` (max over vehicles so far, or vehicle-level for central DP) and ``delta``."""
        if self.central_dp is not None:
            eps, delta = self.central_dp(server_round) if server_round > 0 else (0.0, self.central_dp(1)[1])
            return {"epsilon": eps, "delta": delta}
        if not self.client_epsilon:
            return {"epsilon": None, "delta": None}
        return {"epsilon": max(self.client_epsilon.values()), "delta": max(self.client_delta.values())}
