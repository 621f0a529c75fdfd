"""Evaluation of a global model and everything a run reports about it, shared by fedseg-sim and fedseg-train.

:class:`RunReporter` evaluates on the held-out set, appends the round to ``metrics.jsonl``, prints
the console line, checkpoints the model, feeds the tracker, and at the end draws the plots and writes
``summary.json``. The federated server and the centralized baseline both use it, so their outputs
can be compared key for key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fedseg.data import FleetData
from fedseg.labels import class_colors
from fedseg.metrics import scores
from fedseg.models import count_parameters
from fedseg.plots import plot_curves, plot_examples
from fedseg.runlog import RunLog, format_row
from fedseg.tracking import Tracker

log = logging.getLogger("fedseg")
from fedseg.training import evaluate, make_loader, predict


class RunReporter:
    """Server-side (or baseline) evaluation plus the run-output contract for one run directory."""

    def __init__(self, *, model: torch.nn.Module, data: FleetData, out_dir: Path, tracker: Tracker,
                 meta: dict[str, Any], total_rounds: int, batch_size: int = 16, device: str = "cpu",
                 example_images: int = 4, resume_after: int | None = None) -> None:
        self.model = model.to(device)
        self.data = data
        self.log = RunLog(out_dir, resume_after=resume_after)
        # What a checkpoint holds besides weights and metadata, so a killed run can continue (fedseg/server/resume.py).
        self.checkpoint_state: Callable[[], dict[str, Any]] | None = None
        self.tracker = tracker
        self.meta = meta
        self.total_rounds = total_rounds
        self.device = device
        self.example_images = example_images
        self.loader = make_loader(data.heldout, batch_size=batch_size, shuffle=False, seed=0)

    def evaluate(self) -> tuple[float, dict[str, float]]:
        """Held-out loss and metrics of ``self.model`` from one summed confusion matrix."""
        result = evaluate(self.model, self.loader, num_classes=self.data.label_map.num_classes,
                          device=self.device)
        s = scores(result.confmat, self.data.label_map.class_names)
        metrics = {"pixel_acc": s["pixel_acc"], "miou": s["miou"], "dice": s["dice"]}
        for name, iou in s["per_class_iou"].items():
            metrics[f"iou/{name}"] = float("nan") if iou is None else iou
        return result.loss, metrics

    def record(self, row: dict[str, Any]) -> None:
        """Write one round everywhere it belongs, and checkpoint the model that produced it."""
        row = self.log.log_round(row)
        log.info(format_row(row, self.total_rounds))  # the console and the run's job log alike
        self.tracker.log_round(row)
        state = self.checkpoint_state() if self.checkpoint_state is not None else {}
        self.log.save_checkpoint(self.model, {**self.meta, "round": row["round"], "resume": state})

    def finish(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Plots, the example sheet, ``summary.json`` and the tracker's summary."""
        plots = self.log.out_dir / "plots"
        plot_curves(self.log.rows, plots, title=str(self.meta.get("backbone", "")))
        sheet = self._example_sheet(self.data.heldout, plots / "examples.png")
        if sheet is not None and self.log.rows:
            self.tracker.log_images("examples", sheet, step=int(self.log.rows[-1]["round"]))
        summary = self.log.write_summary({
            **self.meta,
            "parameters": count_parameters(self.model),
            **extra,
        })
        self.tracker.finish(summary.get("final", {}) | {"best_miou": summary.get("best_miou")})
        return summary

    def _example_sheet(self, dataset: Dataset, path: Path) -> Path | None:
        n = min(self.example_images, len(dataset))  # type: ignore[arg-type]
        if n == 0:
            return None
        images, labels = zip(*(dataset[i] for i in range(n)))
        batch = torch.stack(images)
        preds = predict(self.model, batch.to(self.device)).cpu()
        return plot_examples(batch.numpy(), torch.stack(labels).numpy(), preds.numpy(),
                             class_colors(self.data.label_map), path)
