"""Rank the measured candidates that fit a budget by successive halving, and check the order holds.

Cost first, accuracy second: a candidate over any limit of the profile is never trained (it could
not be chosen), so the training budget goes to those that could. ``score`` is injected (the CLI
passes :func:`fedseg.search.measure.score_architecture`), so tests run the real selection on
hand-made scores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fedseg.search.halving import Rung, kendall_tau, planned_epochs, successive_halving
from fedseg.search.hardware import HardwareBudget
from fedseg.search.measure import BackboneResult, to_candidate
from fedseg.search.select import MIOU_DECIMALS, cost_fits

# (name, epochs, seed) -> (mIoU, pixel accuracy, train loss, seconds)
Scorer = Callable[[str, int, int], tuple[float, float, float, float]]


@dataclass(frozen=True)
class Stability:
    """The last rung retrained under another seed: its order, Kendall tau against the run's, and scores."""

    order: tuple[str, ...]
    kendall_tau: float | None
    scores: dict[str, float]  # held-out mIoU under that seed


@dataclass(frozen=True)
class Ranking:
    """What the halving trained and found."""

    results: list[BackboneResult]  # every candidate; the trained ones with their last rung's scores
    rungs: list[Rung]
    finalists: tuple[str, ...]  # the last rung's entrants, best first: the only ones selectable
    planned_epochs: int  # candidate-epochs the halving was allowed (stated in search.md)
    train_s: float  # seconds spent training, stability runs included
    stability: dict[int, Stability]  # seed -> the last rung under that seed


def rank_candidates(results: Sequence[BackboneResult], budget: HardwareBudget, score: Scorer, *,
                    precision: str, dp: bool, seed: int, epochs: int, rungs: int, eta: int,
                    stability_seeds: Sequence[int] = ()) -> Ranking:
    """Successive halving over the candidates whose measured costs fit ``budget``.

    Entrants are listed fastest first (median latency of the deployed precision), so mIoU ties go
    to the faster one. Each extra seed in ``stability_seeds`` retrains the last rung's entrants at
    its budget; the Kendall tau of that order against the run's says whether the ranking held.
    """
    candidates = {r.name: to_candidate(r, precision=precision, dp=dp) for r in results}
    fitting = sorted((c for c in candidates.values() if cost_fits(c, budget)),
                     key=lambda c: (c.latency_ms if c.latency_ms is not None else float("inf"), c.name))
    names = [c.name for c in fitting]
    measured: dict[str, tuple[float, float, float, float]] = {}
    spent = [0.0]

    def train(name: str, rung_epochs: int, rung_seed: int) -> float:
        outcome = score(name, rung_epochs, rung_seed)
        spent[0] += outcome[3]
        if rung_seed == seed:
            measured[name] = outcome
        return outcome[0]

    history = successive_halving(names, lambda n, e: train(n, e, seed), epochs=epochs, rungs=rungs,
                                 eta=eta) if names else []
    last_epochs = {name: rung.epochs for rung in history for name in rung.scores}
    trained = [dataclasses.replace(r, miou=measured[r.name][0], pixel_acc=measured[r.name][1],
                                   train_loss=measured[r.name][2], train_s=measured[r.name][3],
                                   epochs=last_epochs[r.name]) if r.name in measured else r for r in results]
    finalists = history[-1].promoted if history else ()
    stability = {}
    for other in stability_seeds:
        scores = {name: train(name, history[-1].epochs, other) for name in finalists}
        order = tuple(sorted(finalists, key=lambda n: (-round(scores[n], MIOU_DECIMALS), names.index(n))))
        stability[other] = Stability(order, kendall_tau(finalists, order), scores)
    return Ranking(trained, history, finalists, planned_epochs(len(names), epochs=epochs, rungs=rungs, eta=eta),
                   spent[0], stability)


def halving_notes(ranking: Ranking, *, frames: int, seed: int) -> list[str]:
    """search.md's lines on the training budget and the ranking's stability."""
    used = sum(rung.epochs * len(rung.scores) for rung in ranking.rungs)
    lines = [f"Accuracy: successive halving over the {len(ranking.rungs[0].scores) if ranking.rungs else 0} "
             f"candidate(s) within the profile's limits (over-budget ones are not trained): "
             + "; ".join(f"rung {i}: {len(r.scores)} x {r.epochs} epoch(s)" for i, r in enumerate(ranking.rungs))
             + f". Budget: at most {ranking.planned_epochs} candidate-epochs of {frames} frames, used "
             f"{used} ({ranking.train_s:.0f} s of training). Only the last rung's entrants "
             f"({', '.join(ranking.finalists) or 'none'}) can be selected; the `epochs` column says "
             "which rung a candidate's mIoU comes from."]
    for other, again in ranking.stability.items():
        agreed = "the same order" if again.order == ranking.finalists else "order"
        scored = ", ".join(f"{name} {again.scores[name]:.3f}" for name in again.order)
        tau = again.kendall_tau
        lines.append(f"Stability: the last rung retrained with seed {other} (run seed {seed}) gives {agreed} "
                     f"({scored}); Kendall tau {'n/a (one entrant)' if tau is None else f'{tau:.2f}'}.")
    return lines
