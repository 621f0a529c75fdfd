"""Secure aggregation: Flower's SecAgg+ workflow, fed deltas, metered, and tolerant of vehicles that drop out.

``secagg=secaggplus`` swaps the legacy fit workflow for Flower's ``SecAggPlusWorkflow`` (the server
learns only the sum of the masked vectors) and wraps the strategy in :class:`SecureSumStrategy`:

* vehicles send ``weights - global`` (``clients/mods.py``); Flower hands ``aggregate_fit`` the
  unmasked weighted mean in every result, and the wrapper adds the global weights back before the
  configured strategy (FedAvg/FedProx/FedAdam, possibly inside Flower's DP wrapper) sees it;
* the per-vehicle metrics (loss, epsilon, partition id, example count) still reach the server in
  clear, as Flower's workflow sends them, so the round recorder works unchanged;
* :class:`MeteredGrid` counts what every protocol stage really carries; the round's row gets those
  bytes (``bytes_up``/``bytes_down``) and a ``secagg`` entry (survivors, dropouts, error bound).

A round in which fewer vehicles survive than the threshold needs is halted by Flower; the global
model then stays as it was, and ``secagg.on_failure`` says whether the run goes on or stops.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

import numpy as np
from flwr.common import (
    Context,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key

from fedseg.fixedpoint import SecAggRangeError, SecAggSpec, aggregate_error_bound, decode_delta
from server.grids import MeteredGrid
from server.strategy import RoundRecorder, StrategyWrapper

log = logging.getLogger("fedseg.secagg")


class SecAggRoundError(ValueError):
    """A SecAgg+ round the run cannot go on from (a ValueError: entry points print it as one line)."""


class SecureSumStrategy(StrategyWrapper):
    """Adds the global weights back to the unmasked mean update before ``inner`` aggregates it.

    ``inner`` is the run's strategy chain up to and including the ``RoundRecorder`` (``recorder``),
    whose rows get the protocol's measured bytes and a ``secagg`` entry through its ``annotate`` API.
    ``all_or_nothing`` (``privacy=central``) discards a round that lost any vehicle: Flower's DP
    wrapper calibrates its noise to the sampled count and rejects rounds with error replies itself,
    but a vehicle that vanished silently (no reply) would slip through with too little noise.
    """

    def __init__(self, inner: Strategy, recorder: RoundRecorder, *, all_or_nothing: bool = False) -> None:
        super().__init__(inner)
        self.recorder = recorder
        self.all_or_nothing = all_or_nothing
        self._sampled: dict[int, int] = {}
        self._global: list[np.ndarray] = []
        self.aggregated: dict[int, bool] = {}
        self.examples: dict[int, list[int]] = {}

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        self._global = parameters_to_ndarrays(parameters)  # what the vehicles' deltas are relative to
        self.aggregated[server_round] = False
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        self._sampled[server_round] = len(instructions)
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.examples[server_round] = [r.num_examples for _, r in results]
        if self.all_or_nothing and (failures or len(results) < self._sampled.get(server_round, 0)):
            return None, {}
        if results and sum(self.examples[server_round]) > 0:
            # Flower writes the one unmasked aggregate into every result; decode it once.
            mean_delta = parameters_to_ndarrays(results[0][1].parameters)
            decoded = ndarrays_to_parameters(decode_delta(self._global, mean_delta))
            results = [(p, FitRes(r.status, decoded, r.num_examples, r.metrics)) for p, r in results]
        parameters, metrics = self.inner.aggregate_fit(server_round, results, failures)
        self.aggregated[server_round] = parameters is not None
        return parameters, metrics


class SecAggPlusFit:
    """One SecAgg+ fit round: Flower's workflow on a metered grid, then the round's verdict."""

    def __init__(self, spec: SecAggSpec, *, max_weight: float, quantization_range: int,
                 round_offset: int = 0) -> None:
        self.spec = spec
        self.round_offset = round_offset  # a resumed run: Flower's round r is the run's r + offset
        self.max_weight = max_weight
        self.quantization_range = quantization_range
        self.flower = SecAggPlusWorkflow(
            num_shares=spec.num_shares, reconstruction_threshold=spec.reconstruction_threshold,
            max_weight=max_weight, clipping_range=float(spec.clipping_range),
            quantization_range=quantization_range, modulus_range=spec.modulus_range, timeout=spec.timeout)

    def __repr__(self) -> str:
        spec = self.spec
        return (f"SecAggPlusFit(shares={spec.num_shares}, threshold={spec.reconstruction_threshold}, "
                f"clip={spec.clipping_range}, q={self.quantization_range}, max_weight={self.max_weight})")

    def __call__(self, grid: Any, context: Context) -> None:
        legacy = cast(LegacyContext, context)
        strategy = legacy.strategy
        if not isinstance(strategy, SecureSumStrategy):
            raise TypeError("SecAgg+ vehicles send deltas: compose the server with server.compose")
        flower_round = int(cast(int, legacy.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND]))
        server_round = flower_round + self.round_offset
        metered = MeteredGrid(grid)
        start = time.perf_counter()
        self.flower(metered, legacy)
        elapsed = time.perf_counter() - start
        range_errors = [e for e in metered.errors() if "SecAggRangeError" in e or "secagg.max_weight" in e]
        if range_errors:  # a configuration problem: every later round would drop vehicles the same way
            raise SecAggRangeError(range_errors[0][range_errors[0].find("secagg:"):].rstrip("'>"))
        ok = strategy.aggregated.get(server_round, False)
        strategy.recorder.annotate(server_round, self._round_fields(metered, strategy.examples.get(server_round, []), ok,
                                                       elapsed))
        if not ok:
            self._fail(server_round, metered, strategy.examples.get(server_round))

    def _round_fields(self, metered: MeteredGrid, examples: list[int], ok: bool, elapsed: float
                      ) -> dict[str, Any]:
        """Row fields: bytes as the protocol carried them, survivors, and the aggregate's error bound."""
        sampled = metered.sent("setup")
        survivors = metered.replied("collect_masked_vectors")
        bound = aggregate_error_bound(examples, clipping_range=float(self.spec.clipping_range),
                                      quantization_range=self.quantization_range, max_weight=self.max_weight)
        return {
            "bytes_up": metered.bytes_up, "bytes_down": metered.bytes_down, "round_s": elapsed,
            "secagg": {"sampled": sampled, "survivors": survivors, "dropped": sampled - survivors,
                       "failed": not ok, "error_bound": bound if ok and np.isfinite(bound) else None,
                       "stages": metered.stage_summary()},
        }

    def _fail(self, server_round: int, metered: MeteredGrid, examples: list[int] | None) -> None:
        """Explain a round that produced no model; stop the run if so configured."""
        stage = metered.last_stage()
        errors = metered.errors()
        why = (f"only {metered.replied(stage)} of {metered.sent(stage)} vehicles answered stage '{stage}' "
               f"(reconstruction_threshold={self.spec.reconstruction_threshold}, "
               f"num_shares={self.spec.num_shares})")
        if examples is not None and sum(examples) == 0:
            why = "no surviving vehicle trained (each skipped, e.g. its privacy budget was spent)"
        elif examples is not None:  # Flower unmasked the sum and handed it on: the strategy said no
            why = "the strategy discarded the aggregate (privacy=central rejects rounds with dropouts)"
        detail = f"; first vehicle error: {errors[0][:200]}" if errors else ""
        message = f"secagg: round {server_round} failed: {why}; the global model is kept{detail}"
        if self.spec.on_failure == "stop":
            raise SecAggRoundError(message + " (secagg.on_failure=stop)")
        log.warning(message)
