"""Tracking: W&B offline (no account, no network) receives the same rows as metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseg.tracking import NullTracker, make_tracker


def test_unknown_tracker_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown tracking 'mlflow'.*'none', 'wandb'"):
        make_tracker({"name": "mlflow"}, run_dir=tmp_path, config={}, name="x")


def test_none_tracker_is_null(tmp_path: Path) -> None:
    assert isinstance(make_tracker({"name": "none"}, run_dir=tmp_path, config={}, name="x"), NullTracker)


def test_wandb_offline_logs_rows_and_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = make_tracker({"name": "wandb", "project": "fedseg-test", "mode": "offline"}, run_dir=tmp_path,
                           config={"seed": 0}, name="unit")

    tracker.log_round({"round": 0, "loss": 1.5, "miou": 0.1, "per_class_iou": {"road": 0.3, "sky": None},
                       "epsilon": None})
    tracker.log_round({"round": 1, "loss": 1.0, "miou": 0.2, "per_class_iou": {"road": 0.5}, "epsilon": 2.0})
    run = tracker.run  # type: ignore[attr-defined]
    summary = dict(run.summary)
    tracker.finish({"best_miou": 0.2})

    assert summary["miou"] == 0.2 and summary["per_class_iou/road"] == 0.5 and summary["epsilon"] == 2.0
    assert list((tmp_path / "wandb").glob("offline-run-*")), "offline run folder missing"
