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
from collections.abc import Callable
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

from fedseg.config import RunSettings
from fedseg.fixedpoint import (
    SecAggRangeError,
    SecAggSpec,
    aggregate_error_bound,
    auto_quantization_range,
    decode_delta,
    resolve_max_weight,
    validate_secagg,
    vehicles_per_round,
)
from server.grids import MeteredGrid
from server.strategy import StrategyWrapper

log = logging.getLogger("fedseg.secagg")


class SecAggRoundError(ValueError):
    """A SecAgg+ round the run cannot go on from (a ValueError: entry points print it as one line)."""


def check_config(settings: RunSettings, partition_sizes: list[int] | None = None) -> SecAggSpec | None:
    """The run's SecAgg+ spec after every check that can fail before training; ``None`` without SecAgg+."""
    spec = SecAggSpec.from_block(settings.blocks.get("secagg", {}))
    if spec is None:
        return None
    fed = settings.federation
    privacy = str(settings.blocks.get("privacy", {}).get("name", "none"))
    validate_secagg(spec, sampled=vehicles_per_round(fed.num_clients, fed.fraction_fit, fed.min_fit_clients),
                    strategy=settings.strategy.name, privacy=privacy, partition_sizes=partition_sizes)
    return spec


def _partition_sizes(settings: RunSettings) -> list[int]:
    """Frames per vehicle, as the simulation partitions them (cached: the server loaded them already)."""
    from fedseg.data import cached_fleet

    data = cached_fleet(settings.data, settings.federation.num_clients, settings.seed)
    return [len(d) for d in data.clients]


def build_fit_workflow(settings: RunSettings, partition_sizes: list[int] | None = None
                       ) -> SecAggPlusFit | None:
    """The fit workflow for ``DefaultWorkflow``: SecAgg+ under ``secagg=secaggplus``, else ``None``."""
    if SecAggSpec.from_block(settings.blocks.get("secagg", {})) is None:
        return None
    sizes = partition_sizes if partition_sizes is not None else _partition_sizes(settings)
    spec = check_config(settings, sizes)
    assert spec is not None
    fed = settings.federation
    sampled = vehicles_per_round(fed.num_clients, fed.fraction_fit, fed.min_fit_clients)
    max_weight = resolve_max_weight(spec, sizes)
    grid_levels = spec.quantization_range or auto_quantization_range(sampled, spec.modulus_range)
    return SecAggPlusFit(spec, max_weight=max_weight, quantization_range=grid_levels)


def wrap_strategy(strategy: Strategy, settings: RunSettings) -> Strategy:
    """``strategy`` wrapped for delta decoding under ``secagg=secaggplus``; unchanged otherwise."""
    if SecAggSpec.from_block(settings.blocks.get("secagg", {})) is None:
        return strategy
    central = settings.blocks.get("privacy", {}).get("name") == "central"
    return SecureSumStrategy(strategy, all_or_nothing=central)


class SecureSumStrategy(StrategyWrapper):
    """Adds the global weights back to the unmasked mean update and annotates the round's row.

    ``inner`` is the run's strategy (usually the ``RoundRecorder``); if it has an ``on_round``
    callback, the rows it emits get the protocol's measured bytes and a ``secagg`` entry.
    ``all_or_nothing`` (``privacy=central``) discards a round that lost any vehicle: Flower's DP
    wrapper calibrates its noise to the sampled count and rejects rounds with error replies itself,
    but a vehicle that vanished silently (no reply) would slip through with too little noise.
    """

    def __init__(self, inner: Strategy, *, all_or_nothing: bool = False) -> None:
        super().__init__(inner)
        self.all_or_nothing = all_or_nothing
        self._sampled: dict[int, int] = {}
        self._global: list[np.ndarray] = []
        self._notes: dict[int, dict[str, Any]] = {}
        self.aggregated: dict[int, bool] = {}
        self.examples: dict[int, list[int]] = {}
        emit = getattr(inner, "on_round", None)
        if callable(emit):  # the recorder's callback: rows pass through self._annotated on their way out
            inner.on_round = self._annotated(emit)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:  # e.g. RoundRecorder.client_epsilon
        if name == "inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _annotated(self, emit: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        """``emit`` with the fields noted for the row's round merged in (they win over the recorder's)."""
        return lambda row: emit({**row, **self._notes.pop(int(row["round"]), {})})

    def note(self, server_round: int, fields: dict[str, Any]) -> None:
        """Fields to merge into the row of ``server_round`` when the inner strategy emits it."""
        self._notes.setdefault(server_round, {}).update(fields)

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

    def __init__(self, spec: SecAggSpec, *, max_weight: float, quantization_range: int) -> None:
        self.spec = spec
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
            raise TypeError("SecAgg+ vehicles send deltas: wrap the strategy with "
                            "server.secagg.wrap_strategy")
        server_round = int(cast(int, legacy.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND]))
        metered = MeteredGrid(grid)
        start = time.perf_counter()
        self.flower(metered, legacy)
        elapsed = time.perf_counter() - start
        range_errors = [e for e in metered.errors() if "SecAggRangeError" in e or "secagg.max_weight" in e]
        if range_errors:  # a configuration problem: every later round would drop vehicles the same way
            raise SecAggRangeError(range_errors[0][range_errors[0].find("secagg:"):].rstrip("'>"))
        ok = strategy.aggregated.get(server_round, False)
        strategy.note(server_round, self._round_fields(metered, strategy.examples.get(server_round, []), ok,
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
