"""Pooled statistics: BatchNorm running means and variances (and integer counters) leave each round as
what all the vehicles' frames say together, not as a mean or a server optimizer's step of them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.common import FitRes, Parameters, Scalar, bytes_to_ndarray, ndarray_to_bytes
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedseg.server.arrays import array_dtype
from fedseg.server.wrapper import StrategyWrapper


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

    def settings(self) -> dict[str, Any]:
        tagged = sum(1 for tag in self.statistics if tag)
        return {"statistics": tagged} if tagged else {}

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
            kind = array_dtype(first[i])
            if not tag and not np.issubdtype(kind, np.integer):
                if array_dtype(aggregated.tensors[i]) != kind:  # FedAdam's bias correction makes float64 weights
                    aggregated.tensors[i] = ndarray_to_bytes(bytes_to_ndarray(aggregated.tensors[i]).astype(kind))
                continue
            value = mean(arrays(i))
            if tag == "running_var" and tags[i - 1] == "running_mean":  # BatchNorm's state-dict order
                means = arrays(i - 1)
                value = mean([v + m**2 for v, m in zip(arrays(i), means, strict=True)]) - mean(means) ** 2
            value = np.rint(value).astype(kind) if np.issubdtype(kind, np.integer) else value.astype(kind)
            aggregated.tensors[i] = ndarray_to_bytes(value)
        return aggregated, metrics

