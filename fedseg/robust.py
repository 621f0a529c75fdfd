"""Screening vehicles' updates before aggregation: broken or hostile updates never reach the average.

A vehicle's reply is rejected when an array is not finite, when its arrays do not match the global
model's shapes and dtypes, or when its update (``local - global``, floating arrays only) has an L2
norm more than ``max_norm_ratio`` times the round's lower median. The lower median (not the mean, and
not the upper median) so that with two vehicles the smaller update is the yardstick: one hostile
vehicle cannot drag the reference up to its own size.

What a vehicle says about its update (its example count and metrics) is checked too
(:func:`reply_problem`): a malformed value is a rejected reply, never an exception in the server.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


def structure_problem(local: Sequence[np.ndarray], global_: Sequence[np.ndarray]) -> str | None:
    """Why ``local`` cannot be averaged with ``global_`` (count, shape, dtype, non-finite), or None."""
    if len(local) != len(global_):
        return f"{len(local)} arrays, the global model has {len(global_)}"
    for index, (a, g) in enumerate(zip(local, global_, strict=True)):
        a, g = np.asarray(a), np.asarray(g)
        if a.shape != g.shape:
            return f"array #{index} has shape {a.shape}, the global model's is {g.shape}"
        if a.dtype != g.dtype:
            return f"array #{index} has dtype {a.dtype}, the global model's is {g.dtype}"
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            return f"array #{index} {a.shape} is not finite (NaN or Inf)"
    return None


def update_norm(local: Sequence[np.ndarray], global_: Sequence[np.ndarray]) -> float:
    """L2 norm of ``local - global`` over the floating arrays (integer counters left out)."""
    squares = 0.0
    for a, g in zip(local, global_, strict=True):
        if np.asarray(g).dtype.kind == "f":
            d = np.subtract(a, g).ravel()  # in the arrays' own precision: a norm for a ratio test
            squares += float(np.dot(d, d))  # BLAS; the float64 square-and-sum took 0.15 s per ResNet34
    return float(np.sqrt(squares))


def screen_updates(updates: Sequence[Sequence[np.ndarray]], global_: Sequence[np.ndarray], *,
                   max_norm_ratio: float | None) -> list[str | None]:
    """For each update, why it is rejected, or None if it may be aggregated."""
    reasons: list[str | None] = [structure_problem(u, global_) for u in updates]
    if max_norm_ratio is None:
        return reasons
    norms = {i: update_norm(u, global_) for i, u in enumerate(updates) if reasons[i] is None}
    if len(norms) < 2:
        return reasons
    reference = statistics.median_low(norms.values())
    for i, norm in norms.items():
        if reference > 0 and norm > max_norm_ratio * reference:
            reasons[i] = (f"update norm {norm:.4g} is {norm / reference:.1f}x the round's median "
                          f"{reference:.4g} (federation.max_norm_ratio={max_norm_ratio:g})")
    return reasons


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _non_negative(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            and value >= 0)


# The metrics the server reads from a reply, and what each must be. Other keys only pass through to
# Flower's logs, so any scalar Flower carries may stand there (a skipped vehicle's ``reason`` text).
REPLY_METRICS: Mapping[str, tuple[Callable[[Any], bool], str]] = {
    "loss": (_non_negative, "a finite number >= 0"),
    "epsilon": (_non_negative, "a finite number >= 0"),
    "delta": (lambda v: _non_negative(v) and v <= 1, "a number in [0, 1]"),
    "noise_multiplier": (_non_negative, "a finite number >= 0"),
    "train_s": (_non_negative, "a finite number >= 0"),
    "steps": (_count, "an integer >= 0"),
    "partition_id": (_count, "an integer >= 0"),
    "skipped": (lambda v: isinstance(v, bool), "true or false"),
}


def reply_problem(num_examples: Any, metrics: Mapping[str, Any]) -> str | None:
    """Why a vehicle's example count or metrics cannot be believed (wrong type, out of range, not
    finite), or None. A reply that trained (not ``skipped``) must claim at least one example: FedAvg
    divides by the claims' sum."""
    if not _count(num_examples):
        return f"num_examples={_shown(num_examples)} is not an integer >= 0"
    for key, (valid, what) in REPLY_METRICS.items():
        if key in metrics and not valid(metrics[key]):
            return f"metric {key}={_shown(metrics[key])} is not {what}"
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            return f"metric {key}={value} is not finite"
    if num_examples == 0 and metrics.get("skipped") is not True:
        return "num_examples=0 in a reply not marked skipped"
    return None


def _shown(value: Any) -> str:
    """A vehicle's value for a log line: its repr, cut short (it chose the value, and its length)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
