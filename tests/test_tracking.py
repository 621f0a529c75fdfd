"""Tracking: W&B offline (no account, no network) receives the same rows as metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseg.tracking import WandbSpec, parse_tracking


def make_tracker(block: dict, *, run_dir: Path, config: dict, name: str):
    return parse_tracking(block).build(run_dir=run_dir, config=config, name=name)


def test_unknown_tracker_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"tracking=mlflow: valid: \['none', 'wandb'\]"):
        parse_tracking({"name": "mlflow"})


@pytest.mark.parametrize("block, message", [
    ({"name": "wandb", "mode": "cloud"}, r"tracking.mode='cloud': expected 'online' \| 'offline' \| 'disabled'"),
    ({"name": "wandb", "tags": "a,b"}, r"tracking.tags='a,b': expected a list of a string"),
    ({"name": "wandb", "projekt": "x"}, r"unknown tracking keys \['projekt'\]"),
])
def test_malformed_wandb_settings_fail_when_parsed(block: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_tracking(block)


def test_wandb_block_parses_to_its_typed_spec() -> None:
    spec = parse_tracking({"name": "wandb", "project": "p", "mode": "offline", "tags": ["a", "b"]})

    assert spec == WandbSpec(project="p", mode="offline", tags=("a", "b"))


def test_none_tracker_logs_nothing(tmp_path: Path) -> None:
    tracker = make_tracker({"name": "none"}, run_dir=tmp_path, config={}, name="x")

    tracker.log_round({"round": 0, "loss": 1.0})
    tracker.finish({})

    assert list(tmp_path.iterdir()) == []  # no wandb folder, no file: the run dir's files are the record


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
