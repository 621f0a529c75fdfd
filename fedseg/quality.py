"""How a run's quality is compared: convergence, fleet time and frames trained, read from ``metrics.jsonl`` rows.

A federated run and ``fedseg-train`` write the same rows (``round`` = epoch for the baseline), so one
reading serves both:

* :func:`converged_at`: the round (epoch) at which held-out mIoU stopped improving, the rule
  ``early_stop`` stops a run by and ``scripts/bench/fl_quality.py`` compares converged runs at;
* :func:`progress`: mIoU against the *fleet's* wall time (vehicles in parallel: a round costs its
  slowest vehicle's training, ``max(train_s)``; an epoch of the baseline its training time), against
  frames trained (every vehicle's, summed) and against sequential optimizer steps (a round: its
  busiest vehicle's ``steps``), the axes of ``plots/time_to_accuracy.png`` and of the equal-fleet-time
  comparison (``scripts/bench/fl_quality.py``).
  Evaluation and communication are left out of both clocks: the fleet's network and the server's
  held-out set are not what the comparison is about.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class Converged(Exception):  # not an error: the run is done
    """Raised after the round at which a run with ``early_stop.window`` converged; the run finishes there."""

    def __init__(self, round_: int, window: int, min_delta: float, unit: str = "round",
                 window_unit: str | None = None) -> None:
        super().__init__(f"converged at {unit} {round_}: held-out mIoU rose no more than {min_delta:g} in the "
                         f"last {window} {window_unit or unit}s (early_stop)")
        self.round = round_


def converged_at(miou: Sequence[float | None], *, window: int, min_delta: float,
                 steps: Sequence[int] | None = None, after: int = 0) -> int | None:
    """The first index ``r`` (a round, or an epoch: ``miou[0]`` is the initial model) at which none of the
    last ``window`` values rose more than ``min_delta`` above the best before them; None if none yet.

    ``miou[r - window + 1 .. r]`` against ``max(miou[0 .. r - window])``: a run that plateaus for
    ``window`` rounds stops ``window`` rounds after its last real gain. With ``steps`` (each index's
    cumulative sequential optimizer steps: fleet time) the window counts steps: index ``r`` against the
    best up to the last index at least ``window`` steps before it, so runs whose rounds (epochs) do
    different work are held to the same fleet time. ``after``: only windows that begin after that index
    count (a run whose lr dropped at ``after`` is judged on what followed the drop).
    """
    best: list[float] = []  # best[i]: max of miou[0..i]
    for value in miou:
        best.append(max(best[-1] if best else float("-inf"), float("-inf") if value is None else value))
    if steps is not None and len(steps) != len(miou):
        raise ValueError(f"converged_at: {len(steps)} step counts for {len(miou)} mIoU values")
    before = 0  # steps: the last index at least `window` steps before r
    for r in range(1, len(miou)):
        if steps is None:
            if r < window:
                continue
            before = r - window
        else:
            while before + 1 < r and steps[before + 1] <= steps[r] - window:
                before += 1
            if steps[before] > steps[r] - window:
                continue
        if before >= after and best[r] <= best[before] + min_delta:
            return r
    return None


def cumulative_steps(rows: Sequence[dict[str, Any]]) -> list[int]:
    """Each row's cumulative sequential optimizer steps (:func:`sequential_steps`; round 0 at zero)."""
    total, out = 0, []
    for row in rows:
        if row.get("round", 0) > 0:
            total += sequential_steps(row)
        out.append(total)
    return out


def plateaus(rows: Sequence[dict[str, Any]], *, window: int | None, min_delta: float, in_steps: bool = False,
             drops: int = 0) -> list[int]:
    """The indices of ``rows`` at which the ``early_stop`` rule fired: first where the lr drops
    (``federation.lr_schedule=plateau``: up to ``drops`` times, each judged on the rows after the last),
    then where the run converged. Empty without a ``window``."""
    if window is None or not rows:
        return []
    steps = cumulative_steps(rows) if in_steps else None
    if steps is not None and len(rows) > 1 and steps[-1] == 0:
        raise ValueError("early_stop.unit=step: this run's rows record no optimizer steps; use early_stop.unit=round")
    miou, fired = [row.get("miou") for row in rows], list[int]()
    while len(fired) <= drops:
        r = converged_at(miou, window=window, min_delta=min_delta, steps=steps, after=fired[-1] if fired else 0)
        if r is None:
            break
        fired.append(r)
    return fired


def check_convergence(rows: Sequence[dict[str, Any]], *, window: int | None, min_delta: float,
                      unit: str = "round", in_steps: bool = False, drops: int = 0) -> bool:
    """Raise :class:`Converged` when ``rows``' last round (``unit``: epoch for fedseg-train) is where the run
    converged (``window`` None: never; ``in_steps``: ``window`` counts sequential steps, not rows; ``drops``:
    the times the rule first drops the lr instead, :func:`plateaus`). Returns whether the lr drops after
    the last round."""
    fired = plateaus(rows, window=window, min_delta=min_delta, in_steps=in_steps, drops=drops)
    at_last = bool(fired) and fired[-1] == len(rows) - 1
    if at_last and len(fired) > drops:
        raise Converged(int(rows[-1]["round"]), window or 0, min_delta, unit,
                        "sequential step" if in_steps else None)
    return at_last


def sequential_steps(row: dict[str, Any]) -> int:
    """A round's optimizer steps one after another: its busiest vehicle's (vehicles in parallel); an epoch
    of ``fedseg-train`` its steps."""
    steps = row.get("steps")
    if isinstance(steps, dict):
        return max((int(v) for v in steps.values()), default=0)
    return int(steps or 0)


def fleet_seconds(row: dict[str, Any]) -> float:
    """A round's training time with its vehicles in parallel: its slowest vehicle's ``train_s``; a row
    without per-vehicle times (``fedseg-train``'s epochs) its ``round_s``."""
    per_vehicle = row.get("train_s")
    if isinstance(per_vehicle, dict) and per_vehicle:
        return max(float(v) for v in per_vehicle.values())
    return float(row.get("round_s") or 0.0)


@dataclass(frozen=True)
class Progress:
    """A run's held-out mIoU against the fleet's cumulative training seconds, frames trained and sequential
    optimizer steps."""

    label: str
    seconds: list[float]
    frames: list[int]
    steps: list[int]
    miou: list[float]


def progress(rows: Sequence[dict[str, Any]], label: str, *, local_epochs: int = 1) -> Progress:
    """:class:`Progress` of one run's rows (round 0, the initial model, at zero); ``local_epochs``: the
    passes a vehicle makes over the frames a federated row counts (``examples``)."""
    seconds, frames, steps, miou = [], [], [], []
    t, n, k = 0.0, 0, 0
    for row in rows:
        if row.get("round", 0) > 0:
            t += fleet_seconds(row)
            n += int(row.get("examples") or 0) * local_epochs
            k += sequential_steps(row)
        if row.get("miou") is not None:
            seconds.append(t)
            frames.append(n)
            steps.append(k)
            miou.append(float(row["miou"]))
    return Progress(label, seconds, frames, steps, miou)


def run_progress(rows: Sequence[dict[str, Any]], meta: dict[str, Any], label: str | None = None) -> Progress:
    """:func:`progress` of a run described by ``meta`` (its ``summary.json`` or checkpoint metadata)."""
    federated = meta.get("mode") == "federated"
    epochs = int(((meta.get("config") or {}).get("federation") or {}).get("local_epochs", 1)) if federated else 1
    return progress(rows, label or run_label(meta), local_epochs=epochs)


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """``run_dir/metrics.jsonl``'s rows."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_label(summary: dict[str, Any]) -> str:
    """What a run is, for a legend: centralized, or federated with its strategy."""
    mode = summary.get("mode", "run")
    return f"{mode} ({summary['strategy']})" if mode == "federated" and summary.get("strategy") else str(mode)


def check_compare(compare: str | None, *, data: dict[str, Any], seed: int) -> Path | None:
    """The directory ``compare=`` names, if it is a finished run on the same data and seed; a one-line
    ``ValueError`` naming ``compare`` and what differs otherwise."""
    if compare is None:
        return None
    run_dir = Path(compare)
    summary_path = run_dir / "summary.json"
    if not (run_dir / "metrics.jsonl").is_file() or not summary_path.is_file():
        raise ValueError(f"compare={compare}: not a finished fedseg-sim or fedseg-train run directory (it needs "
                         "metrics.jsonl and summary.json)")
    config = json.loads(summary_path.read_text()).get("config") or {}
    theirs = {"seed": config.get("seed", 0), **{f"data.{k}": v for k, v in (config.get("data") or {}).items()}}
    ours = {"seed": seed, **{f"data.{k}": v for k, v in data.items()}}
    differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if differ:
        k = differ[0]
        raise ValueError(f"compare={compare}: that run's {k}={theirs.get(k)!r}, this run's {ours.get(k)!r}; "
                         "a time-to-accuracy comparison needs the same data and seed")
    return run_dir
