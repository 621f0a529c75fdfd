"""The run-output contract: metrics rows, summary, checkpoints, console lines, and the reporter that writes them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedseg.checkpoints import load_checkpoint, read_checkpoint
from fedseg.runlog import ROW_KEYS, RunLog, format_row, metrics_row
from fedseg.tracking import Predictions


def test_metrics_row_splits_per_class_iou_and_keeps_extra_fields() -> None:
    row = metrics_row(3, 0.5, {"miou": 0.25, "iou/road": 0.5, "iou/sky": float("nan")}, clients=2)

    assert row == {"round": 3, "loss": 0.5, "miou": 0.25, "per_class_iou": {"road": 0.5, "sky": None},
                   "clients": 2}


def test_run_log_fills_the_contract_orders_keys_and_writes_nan_as_null(tmp_path: Path) -> None:
    log = RunLog(tmp_path)

    log.log_round({"zeta": 1, "round": 0, "loss": float("nan"), "miou": 0.1})
    log.log_round({"round": 1, "loss": 0.7, "miou": 0.3, "per_class_iou": {"road": math.inf}})

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == log.rows and len(lines) == 2
    assert list(lines[0])[: len(ROW_KEYS)] == list(ROW_KEYS) and list(lines[0])[-1] == "zeta"
    assert lines[0]["loss"] is None and lines[0]["epsilon"] is None and lines[0]["zeta"] == 1
    assert lines[1]["per_class_iou"] == {"road": None}


def test_a_new_run_in_an_old_directory_starts_a_new_metrics_file(tmp_path: Path) -> None:
    RunLog(tmp_path).log_round({"round": 0, "loss": 1.0})

    RunLog(tmp_path).log_round({"round": 0, "loss": 2.0})

    assert [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2.0]


def test_summary_names_the_best_round_and_the_final_row(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    for r, miou in enumerate([0.1, 0.4, 0.3]):
        log.log_round({"round": r, "loss": 1.0 - miou, "miou": miou})

    summary = log.write_summary({"backbone": "tiny"})

    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert (summary["best_round"], summary["best_miou"], summary["rounds"]) == (1, 0.4, 3)
    assert summary["final"]["round"] == 2 and summary["backbone"] == "tiny"


def test_console_line_by_hand() -> None:
    row = {"round": 2, "loss": 0.51234, "pixel_acc": 0.9, "miou": 0.4567, "epsilon": 3.5,
           "bytes_up": 2_500_000, "round_s": 1.25}

    assert format_row(row, 12) == ("round   2/12 | loss 0.5123 | pixel_acc 0.900 | mIoU 0.457 | eps 3.50 | "
                                   "up 2.5 MB | 1.2 s")
    assert format_row({"round": 0, "loss": None}, 1) == "round   0/1 | loss -"


class RecordingTracker:
    logs_predictions = True

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.predictions: dict[int, Predictions] = {}
        self.models: list[tuple[Path, dict[str, Any]]] = []
        self.plots: dict[str, Path] = {}
        self.summary: dict[str, Any] | None = None

    def log_round(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def log_predictions(self, predictions: Predictions, step: int) -> None:
        assert step not in self.predictions and all(r["round"] != step for r in self.rows)  # before its row
        self.predictions[step] = predictions

    def log_model(self, path: Path, metadata: dict[str, Any]) -> None:
        self.models.append((path, metadata))

    def log_plot(self, key: str, path: Path) -> None:
        self.plots[key] = path

    def finish(self, summary: dict[str, Any]) -> None:
        self.summary = summary


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from fedseg.config import DataSpec
    from fedseg.data import load_data

    spec = DataSpec(root=str(tmp_path_factory.mktemp("data")), image_size=(32, 32), frames_per_vehicle=2,
                    heldout_frames=3)
    return load_data(spec, num_clients=1, seed=0, progress=False)


def test_reporter_records_evaluates_checkpoints_and_summarises(tmp_path: Path, fleet: Any) -> None:
    from fedseg.config import ModelSpec
    from fedseg.models import build_run_model, count_parameters
    from fedseg.reporting import RunReporter

    model = build_run_model(ModelSpec(name="tiny"), fleet.label_map.num_classes, seed=0)
    tracker = RecordingTracker()
    reporter = RunReporter(model=model, data=fleet, out_dir=tmp_path, tracker=tracker,
                           meta={"backbone": "tiny", "num_classes": fleet.label_map.num_classes},
                           total_rounds=1, batch_size=2, example_images=2)

    loss, metrics = reporter.evaluate()
    reporter.record(metrics_row(0, loss, metrics))
    with torch.no_grad():  # a different model for round 1: the checkpoint must follow it
        next(model.parameters()).add_(1.0)
    reporter.record(metrics_row(1, loss, metrics))
    summary = reporter.finish({"experiment": "unit"})

    assert 0.0 <= metrics["miou"] <= 1.0 and 0.0 <= metrics["pixel_acc"] <= 1.0 and math.isfinite(loss)
    assert [r["round"] for r in tracker.rows] == [0, 1] and tracker.rows == reporter.log.rows
    assert read_checkpoint(tmp_path / "checkpoints" / "global.pt")["round"] == 1
    restored, _ = load_checkpoint(tmp_path / "checkpoints" / "global.pt")
    assert torch.equal(next(restored.parameters()), next(model.parameters()).cpu())
    assert summary["parameters"] == count_parameters(model) and summary["experiment"] == "unit"
    assert tracker.summary is not None
    assert sorted(tracker.predictions) == [0, 1]  # every round: 2 held-out frames, labels and prediction
    shown = tracker.predictions[1]
    assert shown.images.dtype == np.uint8 and shown.images.shape == (2, 32, 32, 3)
    assert shown.labels.shape == shown.preds.shape == (2, 32, 32)
    assert shown.class_names == fleet.label_map.class_names
    assert tracker.models == [(tmp_path / "checkpoints" / "global.pt",
                               {"backbone": "tiny", "num_classes": fleet.label_map.num_classes, "round": 1,
                                "miou": metrics["miou"], "best_miou": summary["best_miou"]})]
    assert {"loss.png", "miou.png", "examples.png"} <= {p.name for p in (tmp_path / "plots").iterdir()}
