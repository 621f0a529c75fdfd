"""Successive halving: an accuracy signal whose training time is bounded and stated in advance.

Every candidate that fits the hardware budget trains ``epochs`` epochs and is scored on held-out
frames; the best ``1/eta`` (at least one) go on to the next rung, which trains them from the same
seed for ``eta`` times as many epochs; and so on for ``rungs`` rungs (Jamieson & Talwalkar 2016,
the inner loop of Hyperband). Each rung retrains from scratch, so a rung's score is exactly that of
a run with its budget: reproducible, and comparable within the rung. Pure logic: the scorer is
passed in, so the selection is tested on hand-made scores.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fedseg.search.select import MIOU_DECIMALS


@dataclass(frozen=True)
class Rung:
    """One rung: the budget each entrant trained for, their scores, and who went on."""

    epochs: int
    scores: dict[str, float]  # entrant -> held-out mIoU after ``epochs`` epochs
    promoted: tuple[str, ...]  # best first; on the last rung, every entrant in rank order


def rung_sizes(count: int, *, rungs: int, eta: int) -> list[int]:
    """Entrants per rung for ``count`` candidates: ``ceil(n / eta)`` (>= 1) go on; stops at one."""
    sizes = [count]
    while len(sizes) < rungs and sizes[-1] > 1:
        sizes.append(max(1, math.ceil(sizes[-1] / eta)))
    return sizes


def planned_epochs(count: int, *, epochs: int, rungs: int, eta: int) -> int:
    """Candidate-epochs the halving trains for ``count`` candidates: the search's stated budget."""
    return sum(n * epochs * eta**r for r, n in enumerate(rung_sizes(count, rungs=rungs, eta=eta)))


def successive_halving(names: Sequence[str], score: Callable[[str, int], float], *, epochs: int,
                       rungs: int, eta: int) -> list[Rung]:
    """Run the rungs over ``names`` (order breaks ties: list faster candidates first).

    ``score(name, epochs)`` trains ``name`` for ``epochs`` epochs and returns its held-out mIoU.
    Scores equal at the report's precision (3 decimals) are ties, kept in ``names`` order.
    """
    if rungs < 1 or eta < 2 or epochs < 1:
        raise ValueError(f"successive halving needs rungs >= 1, eta >= 2, epochs >= 1; got {rungs}, {eta}, "
                         f"{epochs}")
    order = {name: i for i, name in enumerate(names)}
    sizes = rung_sizes(len(names), rungs=rungs, eta=eta)
    entrants, history = list(names), []
    for r, size in enumerate(sizes):
        budget = epochs * eta**r
        scores = {name: float(score(name, budget)) for name in entrants}
        ranked = sorted(entrants, key=lambda n: (-round(scores[n], MIOU_DECIMALS), order[n]))
        keep = sizes[r + 1] if r + 1 < len(sizes) else len(ranked)
        history.append(Rung(budget, scores, tuple(ranked[:keep])))
        entrants = ranked[:keep]
    return history


def kendall_tau(first: Sequence[str], second: Sequence[str]) -> float | None:
    """Kendall's tau between two rankings of the same names (1: same order, -1: reversed).

    ``None`` when there is no pair to compare (fewer than two names).
    """
    if sorted(first) != sorted(second):
        raise ValueError(f"kendall_tau: rankings of different names {list(first)} and {list(second)}")
    position = {name: i for i, name in enumerate(second)}
    pairs = list(itertools.combinations(first, 2))  # (a, b): a ranked above b in ``first``
    if not pairs:
        return None
    agree = sum(1 if position[a] < position[b] else -1 for a, b in pairs)
    return agree / len(pairs)
