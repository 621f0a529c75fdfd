"""The smoke experiment as a user runs it: ``fedseg-sim`` in a subprocess, and its metrics rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_sim(tmp: Path, name: str, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    """``fedseg-sim experiment=smoke`` into ``tmp/name`` (data cached in ``tmp/cache``)."""
    out = tmp / name
    exe = Path(sys.executable).with_name("fedseg-sim")
    env = {**os.environ, "FEDSEG_DATA_CACHE": str(tmp / "cache")}
    args = [str(exe), "experiment=smoke", "run.progress=false", f"hydra.run.dir={out}", *overrides]
    proc = subprocess.run(args, check=False, capture_output=True, text=True, env=env, timeout=900)
    return proc, out


def rows_of(out: Path) -> list[dict]:
    """The run's ``metrics.jsonl`` rows."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
