"""Tracking: W&B offline (no account, no network) receives the same rows as metrics.jsonl, held-out overlays
with class names, the final model as an artifact, and one group per Hydra multirun."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from fedseg.sim._cli import CONF_DIR, resolve
from fedseg.tracking import Predictions, WandbSpec, parse_tracking


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


BLOCK = 32768  # bytes per block of a .wandb file


def offline_records(run_dir: Path) -> list[Any]:
    """Every record of the offline W&B run under ``run_dir``: what ``wandb sync`` would upload.

    The ``.wandb`` file is a LevelDB-style log (7-byte file header, 32 KiB blocks, each record a
    7-byte header then a chunk; a record whose chunk is 1 = whole or 4 = last is complete) of
    ``wandb_internal_pb2.Record`` protobufs. wandb 0.31 has no Python reader for it.

    The file is written by wandb's service process, which may still be flushing it after ``finish()``
    returns on a loaded machine: read it again (up to 60 s) until it ends with the run's ``exit`` record.
    """
    deadline = time.monotonic() + 60
    while True:
        paths = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        records = _read_records(paths[0]) if len(paths) == 1 else []
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def _read_records(path: Path) -> list[Any]:
    """The complete records of a ``.wandb`` file (a partly written last record is left out)."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        chunks, pos = chunks + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(chunks)
            except DecodeError:
                break
            records.append(record)
            chunks = b""
    return records


def of_kind(records: list[Any], kind: str) -> list[Any]:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def logged(records: list[Any], *key: str) -> list[Any]:
    """Every value logged under the nested ``key``, in step order."""
    return [json.loads(item.value_json) for history in of_kind(records, "history") for item in history.item
            if list(item.nested_key or [item.key]) == list(key)]


def test_wandb_offline_logs_overlays_with_class_names_the_model_and_the_group(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = make_tracker({"name": "wandb", "project": "fedseg-test", "mode": "offline", "group": "sweep-7"},
                           run_dir=tmp_path, config={"seed": 0}, name="unit")
    labels = np.array([[[0, 1], [255, 1]]], dtype=np.uint8)  # one 2x2 frame, one pixel unlabelled
    shown = Predictions(images=np.zeros((1, 2, 2, 3), np.uint8), labels=labels, preds=np.ones((1, 2, 2), np.uint8),
                        class_names=("road", "sky"))
    checkpoint = tmp_path / "checkpoints" / "global.pt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"weights")

    for step in (0, 1):
        tracker.log_predictions(shown, step=step)
        tracker.log_round({"round": step, "miou": 0.1 * step})
    tracker.log_model(checkpoint, {"backbone": "tiny", "class_names": ["road", "sky"], "miou": 0.1})
    plot = tmp_path / "time_to_accuracy.png"
    plt.imsave(plot, np.zeros((4, 4, 3), np.uint8))
    tracker.log_plot("time_to_accuracy", plot)
    tracker.finish({"miou": 0.1})

    records = offline_records(tmp_path)
    (run,) = of_kind(records, "run")
    assert run.run_group == "sweep-7"
    assert logged(records, "miou") == [0, 0.1]
    assert logged(records, "time_to_accuracy", "_type") == ["image-file"]  # after the last round
    assert logged(records, "time_to_accuracy", "width") == logged(records, "time_to_accuracy", "height") == [4]
    masks = logged(records, "predictions", "all_masks")
    assert len(masks) == 2 and all(set(m[0]) == {"prediction", "ground_truth"} for m in masks)  # each round
    class_labels = json.loads(next(i.value_json for i in of_kind(records, "config")[-1].update
                                   if i.key == "_wandb"))["mask/class_labels"]
    assert class_labels["predictions_wandb_delimeter_prediction"]["value"] == {"0": "road", "1": "sky"}
    assert class_labels["predictions_wandb_delimeter_ground_truth"]["value"] == {"0": "road", "1": "sky",
                                                                                 "255": "unlabelled"}
    (artifact,) = of_kind(records, "artifact")
    assert (artifact.type, artifact.name, list(artifact.aliases)) == ("model", f"model-{run.run_id}", ["latest"])
    assert json.loads(artifact.metadata) == {"backbone": "tiny", "class_names": ["road", "sky"], "miou": 0.1}
    assert [entry.path for entry in artifact.manifest.contents] == ["global.pt"]


@pytest.mark.parametrize("mode, group", [(RunMode.RUN, None), (RunMode.MULTIRUN, "sweeps/a")])
def test_a_multirun_is_one_wandb_group_named_after_its_sweep(mode: RunMode, group: str | None) -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["tracking=wandb", "hydra.sweep.dir=sweeps/a"], return_hydra_config=True)
    cfg.hydra.mode, cfg.hydra.runtime.output_dir = mode, "outputs/x"
    HydraConfig.instance().set_config(cfg)
    try:
        with open_dict(cfg):
            del cfg["hydra"]
        assert resolve(cfg)["tracking"]["group"] == group
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.e2e
def test_fedseg_train_multirun_lands_in_one_wandb_group_with_overlays_and_models(tmp_path: Path) -> None:
    env = {**os.environ, "WANDB_SILENT": "true", "FEDSEG_DATA_CACHE": str(tmp_path / "cache")}
    exe = Path(sys.executable).with_name("fedseg-train")
    subprocess.run([str(exe), "-m", "experiment=smoke", "run.progress=false", "train.epochs=1", "tracking=wandb",
                    "tracking.mode=offline", "hydra.sweep.dir=sweep", "seed=0,1"],
                   cwd=tmp_path, env=env, check=True, capture_output=True, timeout=600)

    for job in ("0", "1"):
        run_dir = tmp_path / "sweep" / job
        records = offline_records(run_dir)
        final = json.loads((run_dir / "summary.json").read_text())["final"]
        assert of_kind(records, "run")[0].run_group == "sweep"
        assert len(logged(records, "predictions", "all_masks")) == 2  # rounds (epochs) 0 and 1
        (artifact,) = of_kind(records, "artifact")
        metadata = json.loads(artifact.metadata)
        assert metadata["backbone"] == "tiny" and metadata["image_size"] == [64, 64]
        assert metadata["round"] == 1 and metadata["miou"] == pytest.approx(final["miou"])
        assert "config" not in metadata  # the run's config is the W&B run's, not the model's
