"""The server's half of update compression: each vehicle's encoded update back into weights.

:class:`DecodingStrategy` sits inside the :class:`~fedseg.server.recorder.RoundRecorder` (which therefore
counts the encoded bytes, as they travelled) and outside the update guard, the central-DP wrapper and
the strategy, which all see plain weights. Under SecAgg+ there is no per-vehicle reply to decode:
:class:`~fedseg.server.secagg.SecureSumStrategy` decodes the one unmasked sum with the same
:func:`weights_from` (SecAgg+ admits only codecs that decode linearly, so decoding the mean of the
encodings is the mean of the decoded updates).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.common import FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedseg.compression import Codec, clip_update, round_seed
from fedseg.secagg import decode_delta
from fedseg.server.notes import RoundNotes
from fedseg.server.replies import described, rejection
from fedseg.server.wrapper import StrategyWrapper

log = logging.getLogger("fedseg")


def weights_from(codec: Codec, encoded: Sequence[np.ndarray], global_: Sequence[np.ndarray], *,
                 seed: int | None, clipping_norm: float | None = None) -> list[np.ndarray]:
    """``global + decode(encoded)`` in the global arrays' dtypes; under central DP the decoded update
    is clipped to ``clipping_norm`` first (the noise is calibrated to it). Raises ValueError for an
    encoding that does not fit the global arrays."""
    update = codec.decode(encoded, global_, seed=seed)
    if clipping_norm is not None:
        update = clip_update(update, global_, clipping_norm)
    return decode_delta(global_, update)


class DecodingStrategy(StrategyWrapper):
    """Decodes every vehicle's reply with ``codec`` before ``inner`` sees it.

    ``run_seed`` gives each round's shared seed (:func:`~fedseg.compression.round_seed`, what the
    fit config sent); ``clipping_norm`` is central DP's. A reply that does not decode is left out and
    noted in ``notes`` (the round's row), as the update guard does.
    """

    def __init__(self, inner: Strategy, notes: RoundNotes, codec: Codec, *, run_seed: int,
                 clipping_norm: float | None) -> None:
        super().__init__(inner)
        self.notes = notes
        self.codec = codec
        self.run_seed = run_seed
        self.clipping_norm = clipping_norm
        self._global: list[np.ndarray] = []

    def settings(self) -> dict[str, Any]:
        return {"codec": self.codec.name, **({"clipping_norm": self.clipping_norm} if self.clipping_norm is not None else {})}

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        self._global = parameters_to_ndarrays(parameters)  # what the vehicles' updates are relative to
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        seed = round_seed(self.run_seed, server_round) if self.codec.needs_seed else None
        decoded, rejected = [], []
        for proxy, res in results:
            try:
                weights = weights_from(self.codec, parameters_to_ndarrays(res.parameters), self._global,
                                       seed=seed, clipping_norm=self.clipping_norm)
            except ValueError as err:
                log.warning(f"round {server_round}: rejected {described(proxy, res)}'s update: {err}")
                rejected.append(rejection(proxy, res, f"undecodable {self.codec.name} update: {err}"))
                continue
            decoded.append((proxy, FitRes(res.status, ndarrays_to_parameters(weights), res.num_examples,
                                          res.metrics)))
        if rejected:
            self.notes.reject(server_round, rejected, kept=len(decoded))
        if not decoded:
            return None, {}
        return self.inner.aggregate_fit(server_round, decoded, failures)
