"""Pick a backbone from measurements: pure logic, no torch, so it is tested on hand-made numbers.

Rules (docs/GUIDE.md and ``conf/hardware/*.yaml`` repeat them; budgets: :mod:`fedseg.search.hardware`):

* A candidate **fits** a budget when every limit the budget sets is met by a *measured* value:
  p95 latency <= ``latency_ms`` (a per-frame deadline: 19 frames in 20 must meet it, the median
  would let half of them miss), peak inference memory <= ``memory_mb``, model file <= ``model_mb``,
  and, when the budget sets ``train_memory_mb`` (vehicles train on board in federated learning),
  peak DP-SGD/plain training-step memory <= it. A limit set to ``None`` is not checked; a
  measurement that is missing for a checked limit means "does not fit" (never guess in favour).
* Among the candidates that fit, the most accurate (highest mIoU) wins. mIoU values equal at the
  report's precision (3 decimals) are a **tie**, broken by lower median latency, then by fewer
  parameters, then by name (so the choice is deterministic).
* A candidate over any limit is never chosen, however accurate. If none fits,
  :class:`NoBackboneFits` names the closest candidates and the limits each one misses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fedseg.errors import NoBackboneFits
from fedseg.search.hardware import HardwareBudget

MIOU_DECIMALS = 3  # ties: equal mIoU as printed in search.md


@dataclass(frozen=True)
class Candidate:
    """One backbone's measurements (of the precision that would be deployed)."""

    name: str
    miou: float | None
    latency_ms: float | None  # median
    latency_p95_ms: float | None
    memory_mb: float | None
    model_mb: float | None
    params: int
    train_memory_mb: float | None = None


# Budget field -> the candidate field it is checked against.
_MEASURED_BY = {"latency_ms": "latency_p95_ms", "memory_mb": "memory_mb", "model_mb": "model_mb",
                "train_memory_mb": "train_memory_mb"}


@dataclass(frozen=True)
class Choice:
    """The selected backbone, every fitting candidate best first, and why the others were rejected."""

    selected: Candidate
    ranked: list[Candidate]
    rejected: dict[str, list[str]] = field(default_factory=dict)


def overshoot(candidate: Candidate, budget: HardwareBudget) -> dict[str, float]:
    """For each checked limit, measured / limit (``inf`` when not measured); > 1 means over."""
    ratios = {}
    for limit, value in budget.checked_limits():
        measured = getattr(candidate, _MEASURED_BY[limit])
        ratios[limit] = float("inf") if measured is None else float(measured) / value
    return ratios


def fits(candidate: Candidate, budget: HardwareBudget) -> tuple[bool, list[str]]:
    """Whether ``candidate`` meets every limit of ``budget``, and a reason per limit it misses."""
    reasons = []
    for limit, ratio in overshoot(candidate, budget).items():
        measured_by = _MEASURED_BY[limit]
        value = getattr(candidate, measured_by)
        if value is None:
            reasons.append(f"{measured_by} not measured (limit {limit}={getattr(budget, limit):g})")
        elif ratio > 1.0:
            reasons.append(f"{measured_by} {value:.1f} > {limit} {getattr(budget, limit):g}")
    if candidate.miou is None and not reasons:  # over budget: not trained, the limit is the reason
        reasons.append("no mIoU measured")
    return not reasons, reasons


def cost_fits(candidate: Candidate, budget: HardwareBudget) -> bool:
    """Whether ``candidate``'s measured costs meet ``budget`` (accuracy aside): worth training."""
    return all(ratio <= 1.0 for ratio in overshoot(candidate, budget).values())


def rank_key(candidate: Candidate) -> tuple[float, float, int, str]:
    """Sort key, best first: mIoU (at report precision), then median latency, params, name."""
    latency = candidate.latency_ms if candidate.latency_ms is not None else float("inf")
    return (-round(candidate.miou or 0.0, MIOU_DECIMALS), latency, candidate.params, candidate.name)


def select_backbone(candidates: Sequence[Candidate], budget: HardwareBudget) -> Choice:
    """The most accurate candidate that fits ``budget`` (rules in the module docstring).

    Raises :class:`NoBackboneFits` when none fits, naming up to three closest candidates (smallest
    worst overshoot) and the limits each misses; ``ValueError`` when ``candidates`` is empty.
    """
    if not candidates:
        raise ValueError("select_backbone: no candidates to choose from")
    fitting, rejected = [], {}
    for candidate in candidates:
        ok, reasons = fits(candidate, budget)
        if ok:
            fitting.append(candidate)
        else:
            rejected[candidate.name] = reasons
    if not fitting:
        def worst(c: Candidate) -> float:
            return max(overshoot(c, budget).values(), default=0.0)

        closest = sorted(candidates, key=lambda c: (worst(c), c.name))[:3]
        detail = "; ".join(f"{c.name}: {', '.join(rejected[c.name])}" for c in closest)
        raise NoBackboneFits(f"no backbone fits hardware profile {budget.name!r} ({budget.limits()}). "
                             f"Closest: {detail}. Relax the profile (hardware.latency_ms=...), lower "
                             f"hardware.image_size, or add lighter backbones to search.backbones.")
    ranked = sorted(fitting, key=rank_key)
    return Choice(selected=ranked[0], ranked=ranked, rejected=rejected)


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates no other beats on both mIoU (higher) and median latency (lower), fastest first.

    Candidates missing either measurement are left out. Equal points are all kept.
    """
    points = {c.name: (float(c.miou), float(c.latency_ms)) for c in candidates
              if c.miou is not None and c.latency_ms is not None}

    def dominates(a: str, b: str) -> bool:
        (miou_a, lat_a), (miou_b, lat_b) = points[a], points[b]
        return miou_a >= miou_b and lat_a <= lat_b and (miou_a > miou_b or lat_a < lat_b)

    front = [c for c in candidates if c.name in points and not any(dominates(o, c.name) for o in points)]
    return sorted(front, key=lambda c: (points[c.name][1], -points[c.name][0], c.name))
