"""The round recorder: what passes through the strategy chain becomes the run-output contract.

:class:`RoundRecorder` wraps the run's strategy (with whatever privacy, screening and decoding
wrappers ``fedseg/server/compose.py`` put inside it) and writes one row per round: real serialized
bytes each way, the vehicles' training loss, their privacy spend, the server-side evaluation, and
what the other wrappers noted about the round (:class:`~fedseg.server.notes.RoundNotes`). It also
stops a run that cannot go on: no vehicle sampled, too few answers, or every update rejected. Before
it reads anything a vehicle reported, it screens the replies (:class:`~fedseg.server.replies.ReplyRules`:
malformed metrics rejected, example counts capped); vehicles are named by their Flower node id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from flwr.common import FitIns, FitRes, Parameters, Scalar
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedseg.errors import RunFailed
from fedseg.runlog import metrics_row
from fedseg.server.arrays import parameters_bytes
from fedseg.server.central_dp import AdaptiveClipping
from fedseg.server.notes import RoundNotes
from fedseg.server.replies import ReplyRules, partition_label, privacy_key, vehicle_of
from fedseg.server.resume import resume_state
from fedseg.server.wrapper import StrategyWrapper, layers

log = logging.getLogger("fedseg")
# on_round(row, resume): the round's row, and what a checkpoint of it needs to continue the run.
OnRound = Callable[[dict[str, Any], dict[str, Any]], None]


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


def reply_order(result: tuple[ClientProxy, FitRes]) -> tuple[int, str]:
    """A vehicle's place in the order replies are aggregated in: its partition id, then Flower's node id
    (a vehicle reporting another's partition id moves itself in the order, and nothing else).

    Replies arrive in whatever order the vehicles finish, and a float32 weighted sum depends on the
    order of its terms, so without a fixed order two runs with the same seed can drift apart (two
    runs of the default experiment before this order existed ended 1.3 mIoU points apart).
    """
    proxy, res = result
    partition = partition_label(res)
    return (partition if partition is not None else 2**63, str(proxy.cid))


class RoundRecorder(StrategyWrapper):
    """Delegates to ``inner`` and calls ``on_round(row, resume)`` after each server-side evaluation.

    ``notes`` holds what the other wrappers noted about a round (rejected updates, the bytes SecAgg+
    really carried); their fields win over the recorder's own. ``resume`` is what a checkpoint of the
    round needs to continue the run (:func:`~fedseg.server.resume.resume_state` of the Flower strategy
    at the bottom of the chain and the vehicles' privacy spend recorded here). ``central_dp`` maps a
    round to the vehicle-level ``(epsilon, delta)`` of client-level DP. ``replies`` says what a reply
    may claim (default: equal weights).
    """

    def __init__(self, inner: Strategy, notes: RoundNotes, *, on_round: OnRound,
                 central_dp: Callable[[int], tuple[float, float]] | None = None, min_replies: int = 1,
                 replies: ReplyRules | None = None) -> None:
        super().__init__(inner)
        self.notes = notes
        self.replies = replies or ReplyRules()
        self.on_round = on_round
        self.central_dp = central_dp
        self.min_replies = min_replies  # fewer vehicles answering a round than this stops the run
        self.client_epsilon: dict[str, float] = {}
        self.client_delta: dict[str, float] = {}
        self._pending: dict[str, Any] = {}

    def settings(self) -> dict[str, Any]:
        cap = self.replies.max_examples
        return {"min_replies": self.min_replies, **({"max_examples": cap} if cap else {"weights": "equal"}),
                **({"central_dp": True} if self.central_dp else {})}

    def base(self) -> Strategy:
        """The Flower strategy at the bottom of the chain (its state is what a run resumes with)."""
        return list(layers(self))[-1]

    def adaptive_clipping(self) -> AdaptiveClipping | None:
        """Central DP's adaptive-clipping layer inside this one, if the run has it (its norm resumes)."""
        return next((layer for layer in layers(self) if isinstance(layer, AdaptiveClipping)), None)

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
        screened = self.replies.screen(server_round, results)  # nothing below reads an unchecked value
        trained = [(p, r) for p, r in screened.kept if not r.metrics.get("skipped")]
        if screened.rejected:
            self.notes.reject(server_round, screened.rejected, kept=len(trained))
        skipped = [vehicle_of(p) for p, r in screened.kept if r.metrics.get("skipped")]
        n = sum(r.num_examples for _, r in trained)
        for proxy, res in screened.kept:
            if res.metrics.get("epsilon") is not None:
                self._note_spend(privacy_key(proxy, res), float(res.metrics["epsilon"]),
                                 float(res.metrics.get("delta", 0.0)))
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
            train_s={vehicle_of(p): float(r.metrics["train_s"]) for p, r in trained if "train_s" in r.metrics},
            # and its optimizer steps: the round's sequential steps are the most of them (fedseg/quality.py)
            steps={vehicle_of(p): int(r.metrics["steps"]) for p, r in trained if "steps" in r.metrics},
            **({"clipped": screened.clipped} if screened.clipped else {}),
        )
        if errors:
            log.warning(f"round {server_round}: {self._pending['failures']} vehicle(s) failed; first: {errors[0]}")
        if len(results) < self.min_replies:
            raise RunFailed(f"round {server_round}: only {len(results)} of {self._pending.get('sampled')} "
                            f"vehicles answered, below federation.min_fit_clients={self.min_replies}"
                            + (f"; first vehicle error: {errors[0]}" if errors else ""))
        aggregated = self.inner.aggregate_fit(server_round, trained, failures) if trained else (None, {})
        rejected = self.notes.rejected(server_round)
        if rejected and aggregated[0] is None and len(rejected) >= len(trained) + len(screened.rejected):
            # Every update was rejected (guard or codec decoder): the model could not change, so stop
            # instead of "training" on.
            raise RunFailed(f"round {server_round}: every vehicle's update was rejected ({len(rejected)}); "
                            f"first: node {rejected[0]['vehicle']}: {rejected[0]['reason']}")
        clipping = self.adaptive_clipping()
        if clipping is not None and clipping.round_clipping_norm is not None:  # the norm this round clipped to
            self._pending["clipping_norm"] = clipping.round_clipping_norm
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
        self.on_round({**row, **self.notes.pop(server_round)}, resume_state(self.base(), self, self.adaptive_clipping()))
        return evaluated

    def _note_spend(self, key: str, epsilon: float, delta: float) -> None:
        """A vehicle's cumulative spend, kept as the largest reported: an honest vehicle's epsilon only
        grows, so a vehicle claiming another's partition can raise that entry but never lower it."""
        self.client_epsilon[key] = max(self.client_epsilon.get(key, epsilon), epsilon)
        self.client_delta[key] = max(self.client_delta.get(key, delta), delta)

    def _privacy_fields(self, server_round: int) -> dict[str, Any]:
        """``epsilon`` (max over vehicles so far, or vehicle-level for central DP) and ``delta``."""
        if self.central_dp is not None:
            eps, delta = self.central_dp(server_round) if server_round > 0 else (0.0, self.central_dp(1)[1])
            return {"epsilon": eps, "delta": delta}
        if not self.client_epsilon:
            return {"epsilon": None, "delta": None}
        return {"epsilon": max(self.client_epsilon.values()), "delta": max(self.client_delta.values())}
