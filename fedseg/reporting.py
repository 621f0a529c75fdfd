"""Evaluation of a global model and everything a run reports about it, shared by fedseg-sim and fedseg-train.

:class:`RunReporter` evaluates on the held-out set, appends the round to ``metrics.jsonl``, prints
the console line, checkpoints the model, feeds the tracker, and at the end draws the plots and writes
``summary.json``. The federated server and the centralized baseline both use it, so their outputs
can be compared key for key.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fedseg.config import EarlyStopSpec
from fedseg.data import FleetData
from fedseg.data.normalize import denormalize
from fedseg.labels import class_colors
from fedseg.metrics import scores
from fedseg.models import count_parameters
from fedseg.plots import plot_curves, plot_examples, plot_time_to_accuracy
from fedseg.quality import check_convergence, plateaus, read_rows, run_progress
from fedseg.runlog import RunLog, format_row
from fedseg.tracking import Predictions, Tracker

log = logging.getLogger("fedseg")
from fedseg.training import evaluate, make_loader, predict


class RunReporter:
    """Server-side (or baseline) evaluation plus the run-output contract for one run directory."""

    def __init__(self, *, model: torch.nn.Module, data: FleetData, out_dir: Path, tracker: Tracker,
                 meta: dict[str, Any], total_rounds: int, batch_size: int = 16, device: str = "cpu",
                 example_images: int = 4, resume_after: int | None = None, early_stop: EarlyStopSpec | None = None,
                 compare: Path | None = None, lr_drops: int = 0) -> None:
        """``early_stop``: :meth:`record` raises :class:`~fedseg.quality.Converged` after the round the run
        converged at (``lr_drops``: after the rule has first fired that many times, each dropping the lr:
        ``federation.lr_schedule=plateau``, :meth:`lr_dropped`); ``compare``: another run's directory,
        whose curve joins this one's in ``plots/time_to_accuracy.png`` (:func:`fedseg.quality.check_compare`
        checked it)."""
        self.model = model.to(device)
        self.data = data
        self.log = RunLog(out_dir, resume_after=resume_after)
        self.tracker = tracker
        self.meta = meta
        self.total_rounds = total_rounds
        self.device = device
        self.example_images = example_images
        self.loader = make_loader(data.heldout, batch_size=batch_size, shuffle=False, seed=0)
        self.early_stop = early_stop or EarlyStopSpec()
        self.compare = compare
        self.lr_drops = lr_drops

    def lr_dropped(self) -> int:
        """How many times the lr has dropped so far (``federation.lr_schedule=plateau``): where ``early_stop``'s
        rule fired on the rows recorded, up to ``lr_drops``; read again from the rows on resume."""
        if not self.lr_drops:
            return 0
        return min(self.lr_drops, len(plateaus(self.log.rows, window=self.early_stop.window,
                                               min_delta=self.early_stop.min_delta,
                                               in_steps=self.early_stop.unit == "step", drops=self.lr_drops)))

    def evaluate(self) -> tuple[float, dict[str, float]]:
        """Held-out loss and metrics of ``self.model`` from one summed confusion matrix."""
        result = evaluate(self.model, self.loader, num_classes=self.data.label_map.num_classes,
                          device=self.device)
        s = scores(result.confmat, self.data.label_map.class_names)
        metrics = {"pixel_acc": s["pixel_acc"], "miou": s["miou"], "dice": s["dice"]}
        for name, iou in s["per_class_iou"].items():
            metrics[f"iou/{name}"] = float("nan") if iou is None else iou
        return result.loss, metrics

    def record(self, row: dict[str, Any], resume: dict[str, Any] | None = None) -> None:
        """Write one round everywhere it belongs, and checkpoint the model that produced it; ``resume`` is
        what the checkpoint holds besides weights and metadata so a killed run can continue
        (``fedseg/server/resume.py``; the federated server's round recorder hands it over with the row)."""
        row = self.log.log_round(row)
        log.info(format_row(row, self.total_rounds))  # the console and the run's job log alike
        examples = self._heldout_examples() if self.tracker.logs_predictions else None
        if examples is not None:  # before the row, which commits the round's step (W&B)
            batch, labels, preds = examples
            self.tracker.log_predictions(Predictions(np.stack([denormalize(x) for x in batch]), labels.numpy(),
                                                     preds.numpy(), self.data.label_map.class_names),
                                         step=int(row["round"]))
        self.tracker.log_round(row)
        state = {**resume, "tracker_id": self.tracker.run_id} if resume is not None else {}
        self.log.save_checkpoint(self.model, {**self.meta, "round": row["round"], "resume": state})
        unit = "epoch" if self.meta.get("mode") == "centralized" else "round"
        if check_convergence(self.log.rows, window=self.early_stop.window, min_delta=self.early_stop.min_delta,
                             unit=unit, in_steps=self.early_stop.unit == "step", drops=self.lr_drops):
            span = "sequential step" if self.early_stop.unit == "step" else unit
            log.info(f"lr drops after {unit} {row['round']}: held-out mIoU rose no more than "
                     f"{self.early_stop.min_delta:g} in the last {self.early_stop.window} {span}s "
                     "(federation.lr_schedule=plateau, early_stop)")

    def finish(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Plots, the example sheet, ``summary.json``, and the tracker's summary and final model."""
        plots = self.log.out_dir / "plots"
        plot_curves(self.log.rows, plots, title=str(self.meta.get("backbone", "")))
        curves = [run_progress(self.log.rows, self.meta)]
        if self.compare is not None:
            curves.append(run_progress(read_rows(self.compare), json.loads((self.compare / "summary.json").read_text())))
        self.tracker.log_plot("time_to_accuracy", plot_time_to_accuracy(
            curves, plots / "time_to_accuracy.png", title=str(self.meta.get("backbone", ""))))
        examples = self._heldout_examples()
        if examples is not None:
            batch, labels, preds = examples
            plot_examples(batch.numpy(), labels.numpy(), preds.numpy(), class_colors(self.data.label_map),
                          plots / "examples.png")
        summary = self.log.write_summary({
            **self.meta,
            "parameters": count_parameters(self.model),
            **extra,
        })
        checkpoint = self.log.out_dir / "checkpoints" / "global.pt"
        if checkpoint.is_file():  # the model of the last recorded round, described without the run's config
            final = summary.get("final") or {}
            self.tracker.log_model(checkpoint, {k: v for k, v in self.meta.items() if k != "config"} | {
                "round": final.get("round"), "miou": final.get("miou"), "best_miou": summary.get("best_miou")})
        self.tracker.finish(summary.get("final", {}) | {"best_miou": summary.get("best_miou")})
        return summary

    def _heldout_examples(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The first ``example_images`` held-out frames (normalized), their labels and the model's prediction."""
        dataset: Dataset = self.data.heldout
        n = min(self.example_images, len(dataset))  # type: ignore[arg-type]
        if n == 0:
            return None
        images, labels = zip(*(dataset[i] for i in range(n)))
        batch = torch.stack(images)
        return batch, torch.stack(labels), predict(self.model, batch.to(self.device)).cpu()
