"""The run-output contract: ``metrics.jsonl``, ``summary.json``, ``checkpoints/``, ``plots/``.

One :class:`RunLog` serves the federated server and the centralized baseline, so both write the
same files with the same keys (README, "What a run writes").
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from fedseg.checkpoints import save_checkpoint

# Keys every metrics.jsonl row carries (the run-output contract); extra keys (train_loss, ...) may follow.
ROW_KEYS = (
    "round", "loss", "pixel_acc", "miou", "dice", "per_class_iou", "epsilon", "delta",
    "bytes_up", "bytes_down", "round_s", "clients",
)


def _jsonable(value: Any) -> Any:
    """NaN/inf are not JSON: write them as null so every reader can parse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def split_metrics(metrics: dict[str, float]) -> tuple[dict[str, float], dict[str, float | None]]:
    """Flower-style flat metrics -> (scalars, per-class IoU with None for classes absent everywhere)."""
    per_class = {k[4:]: (None if math.isnan(v) else v) for k, v in metrics.items() if k.startswith("iou/")}
    return {k: v for k, v in metrics.items() if not k.startswith("iou/")}, per_class


def metrics_row(server_round: int, loss: float, metrics: dict[str, float], **fields: Any) -> dict[str, Any]:
    """The ``metrics.jsonl`` row of a round (federated) or epoch (centralized): one builder for both."""
    scalars, per_class = split_metrics(metrics)
    return {"round": server_round, "loss": loss, **scalars, "per_class_iou": per_class, **fields}


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunLog:
    """Appends one row per round and writes the summary and checkpoints of a run directory."""

    def __init__(self, out_dir: str | Path, *, resume_after: int | None = None) -> None:
        """``resume_after``: continue a run whose last completed (checkpointed) round is this one: its
        rows up to it are kept, any later row (written before an interruption) is dropped."""
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "checkpoints").mkdir(exist_ok=True)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        if resume_after is not None and self.metrics_path.exists():
            lines = self.metrics_path.read_text().splitlines()
            self.rows = [row for row in map(json.loads, filter(None, lines)) if row["round"] <= resume_after]
            atomic_write_text(self.metrics_path, "".join(json.dumps(row) + "\n" for row in self.rows))
        elif self.metrics_path.exists():  # a new run in an old directory starts a new file
            self.metrics_path.unlink()
        self.started = time.time()

    def log_round(self, row: dict[str, Any]) -> dict[str, Any]:
        """Append a row (missing contract keys become null) and flush it to disk at once."""
        missing = [k for k in ROW_KEYS if k not in row]
        full = {**{k: None for k in missing}, **row}
        full = {k: full[k] for k in (*ROW_KEYS, *sorted(set(full) - set(ROW_KEYS)))}
        self.rows.append(_jsonable(full))
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(self.rows[-1]) + "\n")
        return self.rows[-1]

    def save_checkpoint(self, model: torch.nn.Module, meta: dict[str, Any], name: str = "global.pt") -> Path:
        """Save the model state with what rebuilding and resuming it needs (atomically)."""
        return save_checkpoint(self.out_dir / "checkpoints" / name, model, meta)

    def write_summary(self, extra: dict[str, Any]) -> dict[str, Any]:
        """``summary.json``: the final row plus run-level facts (backbone, params, privacy, ...)."""
        final = self.rows[-1] if self.rows else {}
        best = max((r for r in self.rows if r.get("miou") is not None), key=lambda r: r["miou"], default={})
        summary = {
            "final": final,
            "best_round": best.get("round"),
            "best_miou": best.get("miou"),
            "rounds": len(self.rows),
            "wall_s": round(time.time() - self.started, 2),
            **extra,
        }
        atomic_write_text(self.out_dir / "summary.json", json.dumps(_jsonable(summary), indent=2))
        return summary


def format_row(row: dict[str, Any], total_rounds: int) -> str:
    """One console line per round: what a person watching the run wants to see."""
    eps = row.get("epsilon")
    parts = [
        f"round {row['round']:>3}/{total_rounds}",
        f"loss {row['loss']:.4f}" if row.get("loss") is not None else "loss -",
        f"pixel_acc {row['pixel_acc']:.3f}" if row.get("pixel_acc") is not None else "",
        f"mIoU {row['miou']:.3f}" if row.get("miou") is not None else "",
        f"eps {eps:.2f}" if eps is not None else "",
        f"up {row['bytes_up'] / 1e6:.1f} MB" if row.get("bytes_up") else "",
        f"{row['round_s']:.1f} s" if row.get("round_s") is not None else "",
    ]
    return " | ".join(p for p in parts if p)
