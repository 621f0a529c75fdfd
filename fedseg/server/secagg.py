"""Secure aggregation: Flower's SecAgg+ workflow, fed deltas, metered, and tolerant of vehicles that drop out.

``secagg=secaggplus`` swaps the legacy fit workflow for Flower's ``SecAggPlusWorkflow`` (the server
learns only the sum of the masked vectors) and wraps the strategy in :class:`SecureSumStrategy`:

* vehicles send ``weights - global``, encoded by the run's codec (``fedseg/clients/mods.py``); Flower hands
  ``aggregate_fit`` the unmasked weighted mean in every result, and the wrapper decodes it (a
  SecAgg+-compatible codec decodes linearly) and adds the global weights back before the configured
  strategy (FedAvg/FedProx/FedAdam, possibly inside Flower's DP wrapper) sees it;
* vehicles send their masked vectors packed to the modulus' width (``fedseg/clients/mods.py``);
  :class:`PackedVectorsGrid`, between Flower's workflow and the metered grid, restores the list of
  arrays the workflow reads, so the meter counts what travelled and the protocol is Flower's own;
* the per-vehicle metrics (loss, epsilon, partition id, example count) still reach the server in
  clear, as Flower's workflow sends them, so the round recorder works unchanged;
* the sum cannot leave a vehicle out, so :class:`SecureSumStrategy` applies it only if every survivor's
  reply passes the checks (:meth:`~fedseg.server.replies.ReplyRules.secure_problems`: metrics, a count
  within the cap) and the unmasked mean lies where in-range vehicles can put it
  (:meth:`~fedseg.secagg.FixedPoint.sum_problem`); else the round fails as below, naming why;
* :class:`MeteredGrid` counts what every protocol stage really carries; the round's row gets those
  bytes (``bytes_up``/``bytes_down``) and a ``secagg`` entry (survivors, dropouts, error bound).

A round in which fewer vehicles survive than the threshold needs is halted by Flower; the global
model then stays as it was, and ``secagg.on_failure`` says whether the run goes on or stops.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any, cast

import numpy as np
from flwr.app import Message
from flwr.common import (
    Context,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.server import LegacyContext
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key

from fedseg.compression import Codec, NoCompression, round_seed
from fedseg.secagg import (
    PACKED_RECORD,
    PACKED_SHAPES,
    FixedPoint,
    SecAggRangeError,
    SecAggSpec,
    aggregate_error_bound,
    unpack_masked,
)
from fedseg.server.codecs import weights_from
from fedseg.server.grids import GridWrapper, MeteredGrid
from fedseg.server.notes import RoundNotes, SecureSum
from fedseg.server.replies import ReplyRules
from fedseg.server.wrapper import StrategyWrapper

log = logging.getLogger("fedseg.secagg")


class SecAggRoundError(ValueError):
    """A SecAgg+ round the run cannot go on from (a ValueError: entry points print it as one line)."""


class SecureSumStrategy(StrategyWrapper):
    """Decodes the unmasked mean update and adds the global weights back before ``inner`` aggregates it.

    ``codec`` is the run's (SecAgg+-compatible) codec, ``run_seed`` gives its rounds' shared seeds.
    ``inner`` is the run's strategy chain up to and including the round recorder. What each round's
    sum held and whether it became a model goes into ``notes``, where :class:`SecAggPlusFit` reads it.
    ``all_or_nothing`` (``privacy=central``) discards a round that lost any vehicle: Flower's DP
    wrapper calibrates its noise to the sampled count and rejects rounds with error replies itself,
    but a vehicle that vanished silently (no reply) would slip through with too little noise.
    ``replies`` and ``fixed_point`` decide whether the round's sum may be applied at all (see the
    module docstring); without ``fixed_point`` the sum's range is not checked.
    """

    def __init__(self, inner: Strategy, notes: RoundNotes, *, all_or_nothing: bool = False,
                 codec: Codec | None = None, run_seed: int = 0, replies: ReplyRules | None = None,
                 fixed_point: FixedPoint | None = None) -> None:
        super().__init__(inner)
        self.notes = notes
        self.replies = replies or ReplyRules()
        self.fixed_point = fixed_point
        self.all_or_nothing = all_or_nothing
        self.codec = codec or NoCompression()
        self.run_seed = run_seed
        self._sampled: dict[int, int] = {}
        self._global: list[np.ndarray] = []

    def settings(self) -> dict[str, Any]:
        return {"codec": self.codec.name, **({"all_or_nothing": True} if self.all_or_nothing else {})}

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        self._global = parameters_to_ndarrays(parameters)  # what the vehicles' deltas are relative to
        self.notes.note_secure_sum(server_round, None)
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        self._sampled[server_round] = len(instructions)
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        examples = [r.num_examples for _, r in results]
        self.notes.note_secure_sum(server_round, SecureSum(examples, aggregated=False))
        if rejected := self.replies.secure_problems(results):
            self.notes.reject(server_round, rejected, kept=0)
            first = rejected[0]
            return self._refuse(server_round, examples, f"node {first['vehicle']}'s reply: {first['reason']}")
        if self.all_or_nothing and (failures or len(results) < self._sampled.get(server_round, 0)):
            return None, {}
        if results and sum(examples) > 0:
            # Flower writes the one unmasked aggregate into every result; decode it once.
            mean = parameters_to_ndarrays(results[0][1].parameters)
            if self.fixed_point and (problem := self.fixed_point.sum_problem(mean, examples)):
                return self._refuse(server_round, examples, problem)
            seed = round_seed(self.run_seed, server_round) if self.codec.needs_seed else None
            decoded = ndarrays_to_parameters(weights_from(self.codec, mean, self._global, seed=seed))
            results = [(p, FitRes(r.status, decoded, r.num_examples, r.metrics)) for p, r in results]
        parameters, metrics = self.inner.aggregate_fit(server_round, results, failures)
        self.notes.note_secure_sum(server_round, SecureSum(examples, aggregated=parameters is not None))
        return parameters, metrics

    def _refuse(self, server_round: int, examples: list[int], why: str) -> tuple[None, dict[str, Scalar]]:
        """Leave the round's sum unapplied; :class:`SecAggPlusFit` reports ``why`` (and stops the run if
        ``secagg.on_failure=stop``)."""
        self.notes.note_secure_sum(server_round, SecureSum(examples, aggregated=False, rejected=why))
        return None, {}


class SecAggPlusFit:
    """One SecAgg+ fit round: Flower's workflow on a metered grid, then the round's verdict.

    The :class:`SecureSumStrategy` in the chain notes each round's outcome in ``notes``; this reads it
    there and adds the protocol's bytes and a ``secagg`` entry to the round's row.
    """

    def __init__(self, spec: SecAggSpec, notes: RoundNotes, *, max_weight: float, quantization_range: int,
                 round_offset: int = 0) -> None:
        self.spec = spec
        self.notes = notes
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
        flower_round = int(cast(int, legacy.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND]))
        server_round = flower_round + self.round_offset
        metered = MeteredGrid(grid)
        start = time.perf_counter()
        self.flower(PackedVectorsGrid(metered), legacy)
        elapsed = time.perf_counter() - start
        range_errors = [e for e in metered.errors() if "SecAggRangeError" in e or "secagg.max_weight" in e]
        if 2 * len(range_errors) > metered.sent("setup"):
            # Most of the round's vehicles cannot fit the fixed-point range: a configuration problem that
            # would drop them the same way every round. Fewer are failures of their round only (the row
            # and the log say why), so no single vehicle's error text can stop the fleet.
            raise SecAggRangeError(range_errors[0][range_errors[0].find("secagg:"):].rstrip("'>"))
        outcome = self.notes.secure_sum(server_round)
        ok = outcome is not None and outcome.aggregated
        examples = outcome.examples if outcome is not None else None
        fields = self._round_fields(metered, examples or [], ok, elapsed)
        if outcome is not None and outcome.rejected:  # the checks refused the sum: say why in the row
            fields["secagg"]["rejected"] = outcome.rejected
        self.notes.annotate(server_round, fields)
        if not ok:
            self._fail(server_round, metered, outcome)

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

    def _fail(self, server_round: int, metered: MeteredGrid, outcome: SecureSum | None) -> None:
        """Explain a round that produced no model; stop the run if so configured."""
        examples = outcome.examples if outcome is not None else None
        stage = metered.last_stage()
        errors = metered.errors()
        why = (f"only {metered.replied(stage)} of {metered.sent(stage)} vehicles answered stage '{stage}' "
               f"(reconstruction_threshold={self.spec.reconstruction_threshold}, "
               f"num_shares={self.spec.num_shares})")
        if outcome is not None and outcome.rejected:
            why = f"its sum was not applied: {outcome.rejected}"
        elif examples is not None and sum(examples) == 0:
            why = "no surviving vehicle trained (each skipped, e.g. its privacy budget was spent)"
        elif examples is not None:  # Flower unmasked the sum and handed it on: the strategy said no
            why = "the strategy discarded the aggregate (privacy=central rejects rounds with dropouts)"
        detail = f"; first vehicle error: {errors[0][:200]}" if errors else ""
        message = f"secagg: round {server_round} failed: {why}; the global model is kept{detail}"
        if self.spec.on_failure == "stop":
            raise SecAggRoundError(message + " (secagg.on_failure=stop)")
        log.warning(message)


class PackedVectorsGrid(GridWrapper):
    """Restores each vehicle's packed masked vector (``fedseg.clients.mods.pack_masked_vector``) to the list of
    ``.npy`` bytes under ``masked_parameters`` that Flower's SecAgg+ workflow reads."""

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error() or PACKED_RECORD not in reply.content.array_records:
                continue
            packed = reply.content.array_records[PACKED_RECORD].to_numpy_ndarrays()[0]
            del reply.content[PACKED_RECORD]
            config = reply.content.config_records[RECORD_KEY_CONFIGS]
            shapes = cast(list[int], config.pop(PACKED_SHAPES))
            config[SecAggKey.MASKED_PARAMETERS] = [ndarray_to_bytes(a) for a in unpack_masked(packed, shapes)]
        return replies
