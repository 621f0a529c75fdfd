"""A strategy wrapper that screens each vehicle's update before the strategy inside aggregates it."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.common import FitIns, FitRes, Parameters, Scalar
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedseg.robust import screen_updates
from fedseg.server.arrays import parameters_view
from fedseg.server.notes import RoundNotes
from fedseg.server.replies import described, rejection
from fedseg.server.wrapper import StrategyWrapper

log = logging.getLogger("fedseg")


class UpdateGuard(StrategyWrapper):
    """Drops non-finite, misshapen and outsized updates (``fedseg.robust``), logs each with its vehicle
    (its node id, ``fedseg/server/replies.py``), and notes them in ``notes`` (the round's row)."""

    def __init__(self, inner: Strategy, notes: RoundNotes, *, max_norm_ratio: float | None) -> None:
        super().__init__(inner)
        self.notes = notes
        self.max_norm_ratio = max_norm_ratio
        self._global: list[np.ndarray] = []

    def settings(self) -> dict[str, Any]:
        return {"max_norm_ratio": self.max_norm_ratio}

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        self._global = parameters_view(parameters)
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        updates = [parameters_view(r.parameters) for _, r in results]  # read only: no 98 MB copies
        reasons = screen_updates(updates, self._global, max_norm_ratio=self.max_norm_ratio)
        rejected = []
        for (proxy, res), reason in zip(results, reasons, strict=True):
            if reason is not None:
                log.warning(f"round {server_round}: rejected {described(proxy, res)}'s update: {reason}")
                rejected.append(rejection(proxy, res, reason))
        kept = [pair for pair, reason in zip(results, reasons, strict=True) if reason is None]
        if rejected:
            self.notes.reject(server_round, rejected, kept=len(kept))
        if not kept:
            return None, {}
        return self.inner.aggregate_fit(server_round, kept, failures)
