"""Vehicle-level DP at fleet scale: where the server's noise lands, and what steps after it.

Flower's DP wrappers (``DifferentialPrivacyClientSide*Clipping``) add noise to every array of what the
strategy inside them returns. Two layers around them make that noise land where the accounting says:

* :class:`TrainedOnly` (``privacy.trainable`` other than ``all``): the wrapper and everything inside it
  see only the arrays the vehicles train. Vehicles leave the others exactly as received (frozen
  parameters get no gradient), so their update is zero and clipping measures the trained part alone;
  the server puts the current global arrays back in their place after the noise, whatever a vehicle
  sent there. The noise std per coordinate is unchanged; its norm shrinks with the trained dimension.
* :class:`ServerStep` with :class:`PlainMean` (``strategy=fedavgm``/``fedadam``): the run's strategy
  averages inside the noise with FedAvg's own arithmetic, and its server optimizer steps outside it,
  on the noised mean. A function of the mechanism's output is post-processing: the accountant's
  epsilon is the same as for FedAvg.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flwr.common import Code, FitIns, FitRes, Parameters, Scalar, Status, bytes_to_ndarray, ndarray_to_bytes
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg, Strategy

from fedseg.server.wrapper import StrategyWrapper


class TrainedOnly(StrategyWrapper):
    """Everything inside sees only the arrays ``trained`` marks; the others leave each round as the
    global arrays the round started from (the public-pretrained ones of ``model.init``)."""

    def __init__(self, inner: Strategy, trained: Sequence[bool]) -> None:
        super().__init__(inner)
        self.trained = list(trained)
        self.current: list[bytes] = []  # the round's global arrays, as configure_fit sent them

    def settings(self) -> dict[str, Any]:
        return {"trained": f"{sum(self.trained)}/{len(self.trained)}"}

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        self.current = list(parameters.tensors)
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        sliced = [(proxy, FitRes(res.status, self._slice(res.parameters), res.num_examples, res.metrics))
                  for proxy, res in results]
        mean, metrics = self.inner.aggregate_fit(server_round, sliced, failures)
        if mean is None:
            return None, metrics
        if len(self.current) != len(self.trained):
            raise RuntimeError(f"round {server_round}: the global model has {len(self.current)} arrays, "
                               f"privacy.trainable marks {len(self.trained)}")
        noised = iter(mean.tensors)
        tensors = [next(noised) if keep else frozen for keep, frozen in zip(self.trained, self.current, strict=True)]
        return Parameters(tensors=tensors, tensor_type=mean.tensor_type), metrics

    def _slice(self, parameters: Parameters) -> Parameters:
        tensors = [t for t, keep in zip(parameters.tensors, self.trained, strict=True) if keep]
        return Parameters(tensors=tensors, tensor_type=parameters.tensor_type)


class PlainMean(StrategyWrapper):
    """The run's strategy (FedAvgM, FedAdam) averaging with FedAvg's arithmetic only: its server
    optimizer steps in :class:`ServerStep`, outside the noise."""

    def __init__(self, inner: FedAvg) -> None:
        super().__init__(inner)
        self.mean_of = inner

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        return FedAvg.aggregate_fit(self.mean_of, server_round, results, failures)


class ServerStep(StrategyWrapper):
    """The server optimizer of ``optimizer`` (the run's FedAvgM/FedAdam, also at the bottom of the chain
    under :class:`PlainMean`) stepping from the global model towards the noised mean ``inner`` returns:
    Flower's own step, given that mean as the one update of the round."""

    def __init__(self, inner: Strategy, optimizer: FedAvg) -> None:
        super().__init__(inner)
        self.optimizer = optimizer

    def settings(self) -> dict[str, Any]:
        return {"optimizer": type(self.optimizer).__name__}

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        noised, metrics = self.inner.aggregate_fit(server_round, results, failures)
        if noised is None or not results:
            return noised, metrics
        mean = FitRes(Status(Code.OK, ""), noised, 1, {})
        stepped, _ = self.optimizer.aggregate_fit(server_round, [(results[0][0], mean)], [])
        if stepped is None:
            return None, metrics
        # FedAdam's bias correction is float64: the global model keeps the vehicles' dtypes.
        dtypes = [bytes_to_ndarray(n).dtype for n in noised.tensors]
        tensors = [ndarray_to_bytes(bytes_to_ndarray(s).astype(dtype, copy=False))
                   for s, dtype in zip(stepped.tensors, dtypes, strict=True)]
        return Parameters(tensors=tensors, tensor_type=noised.tensor_type), metrics
