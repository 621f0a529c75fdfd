"""End-to-end: the console scripts as a user runs them (subprocess, tiny smoke config)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
SAMPLE = Path(__file__).parent / "data" / "carla_sample"
CONTRACT = {"round", "loss", "pixel_acc", "miou", "dice", "per_class_iou", "epsilon", "delta",
            "bytes_up", "bytes_down", "round_s", "clients"}


def run_cli(name: str, *args: str, tmp: Path, activated: bool = True) -> subprocess.CompletedProcess:
    """``name`` from this environment; ``activated=False``: by its full path with the environment's
    ``bin`` off ``PATH``, as cron or systemd would start it."""
    exe = Path(sys.executable).with_name(name)
    env = {**os.environ, "FEDSEG_DATA_CACHE": str(tmp / "cache"), "WANDB_MODE": "offline"}
    if not activated:
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                      if p and Path(p).resolve() != exe.parent.resolve())
    return subprocess.run([str(exe), *args], check=False, capture_output=True, text=True, env=env,
                          timeout=600)


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_vehicle_federation_writes_the_contract_and_loss_falls(tmp_path: Path) -> None:
    out = tmp_path / "sim"

    # Not activated: Flower's processes start each other by name (flower-superexec, flwr-simulation)
    proc = run_cli("fedseg-sim", "experiment=smoke", "federation.num_clients=2",
                   "federation.min_fit_clients=2", f"hydra.run.dir={out}", tmp=tmp_path, activated=False)

    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(CONTRACT <= set(r) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[1]["clients"] == 2 and rows[1]["bytes_up"] > 0 and rows[1]["bytes_down"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backbone"] == "tiny" and summary["parameters"] > 0
    assert (out / "checkpoints" / "global.pt").exists() and (out / ".hydra" / "config.yaml").exists()
    assert {"loss.png", "miou.png", "per_class_iou.png", "examples.png"} <= {
        p.name for p in (out / "plots").iterdir()}


def test_centralized_baseline_writes_metrics(tmp_path: Path) -> None:
    out = tmp_path / "train"

    proc = run_cli("fedseg-train", "experiment=smoke", f"hydra.run.dir={out}", tmp=tmp_path)

    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]  # smoke: 2 rounds x 1 local epoch
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert [r["lr"] for r in rows] == [None, 0.003, 0.003]  # smoke's constant lr, each epoch's own


def test_corrupt_png_fails_with_one_line_naming_the_file(tmp_path: Path) -> None:
    root = tmp_path / "carla"
    shutil.copytree(SAMPLE, root, ignore=shutil.ignore_patterns("*.md"))
    bad = root / "dataA" / "CameraRGB" / "000_0414.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")

    proc = run_cli("fedseg-train", "experiment=smoke", "data=carla", f"data.root={root}",
                   "federation.num_clients=1", "run.progress=false", f"hydra.run.dir={tmp_path / 'out'}", tmp=tmp_path)

    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fedseg-train: error: ") and "000_0414.png" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_missing_data_root_names_the_key(tmp_path: Path) -> None:
    proc = run_cli("fedseg-train", "experiment=smoke", "data=carla", "run.progress=false",
                   f"hydra.run.dir={tmp_path / 'out'}", tmp=tmp_path)

    assert proc.returncode == 2
    assert proc.stderr.strip() == "fedseg-train: error: data.root is required (set it on the command line: data.root=...)"
