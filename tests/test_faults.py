"""Faults are counted, never hidden or hanging: failing vehicles, hostile updates, a fleet that cannot go on.

In-process through the real client mods and server composition (``toy_fleet``), with golden numbers by
hand; and end to end through ``fedseg-sim`` with vehicles whose camera frames are really corrupt.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from toy_fleet import START, Fleet, toy_updates

from fedseg.errors import RunFailed

PLAIN = {"name": "none"}


def test_nan_and_outsized_updates_are_rejected_logged_and_the_others_averaged(
        caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: vehicles 0 and 1 are honest (+1, +2); 2 sends NaN, 3 sends 100x vehicle 0's update.
    updates = toy_updates((1.0, 2.0, 0.0, 0.0))
    send = {2: lambda p: [np.full_like(a, np.nan) for a in p],
            3: lambda p: [a + 100.0 * u for a, u in zip(p, updates[0], strict=True)]}
    fleet = Fleet(updates, [1, 2, 3, 4], PLAIN, send=send, federation={"min_fit_clients": 2})

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedseg"):
        fleet.run()

    # Assert: the average is the example-weighted mean of vehicles 0 and 1 only: (1*1 + 2*2) / 3.
    np.testing.assert_allclose(fleet.globals[-1][0], np.full((2, 3), START + 5 / 3), rtol=1e-6)
    row = fleet.rows[-1]
    reasons = {r["vehicle"]: r["reason"] for r in row["rejected"]}
    assert set(reasons) == {"2", "3"} and row["clients"] == 2
    assert "not finite" in reasons["2"] and "median" in reasons["3"]
    assert "rejected vehicle 2" in caplog.text and "rejected vehicle 3" in caplog.text


def test_a_round_whose_every_update_is_rejected_stops_the_run_naming_the_reason() -> None:
    # Every vehicle sends NaN: without the stop, the run would go on with an unchanged model.
    nan = {i: (lambda p: [np.full_like(a, np.nan) for a in p]) for i in range(3)}
    fleet = Fleet(toy_updates(), [1, 2, 3], PLAIN, send=nan, rounds=2)

    with pytest.raises(RunFailed, match=r"round 1: every vehicle's update was rejected \(3\); first: vehicle 0: "
                                        r".*not finite"):
        fleet.run()

    assert [r["round"] for r in fleet.rows] == [0]


def test_a_vehicle_failing_every_round_is_counted_and_the_run_completes() -> None:
    fleet = Fleet(toy_updates(), [1, 2, 3], PLAIN, fail_always=(1,), rounds=2).run()

    rows = fleet.rows[1:]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["failures"] == 1 and "vehicle 1 lost its camera" in r["failure"] for r in rows)
    # Vehicles 0 and 2 only, each round: (1*1 + 3*-2) / 4 = -1.25 per round.
    np.testing.assert_allclose(fleet.globals[-1][0], np.full((2, 3), START - 2.5), rtol=1e-6)


def test_a_round_below_min_fit_clients_stops_the_run_naming_the_error() -> None:
    fleet = Fleet(toy_updates(), [1, 2, 3], PLAIN, fail_always=(0, 1), rounds=3)

    with pytest.raises(RunFailed, match=r"round 1: only 1 of 3 vehicles answered, below "
                                        r"federation.min_fit_clients=2; first vehicle error: .*lost its camera"):
        fleet.run()

    assert [r["round"] for r in fleet.rows] == [0]  # nothing recorded as if it had trained


# ---- end to end: fedseg-sim with vehicles whose frames are corrupt ----

def fedseg_sim(*args: str, cache: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("fedseg-sim")
    env = {**os.environ, "FEDSEG_DATA_CACHE": str(cache), "WANDB_MODE": "offline"}
    return subprocess.run([str(exe), "experiment=smoke", "run.progress=false", *args], check=False,
                          capture_output=True, text=True, env=env, timeout=600)


def corrupt_frames(cache: Path, vehicles: list[int]) -> list[Path]:
    """Generate the smoke fleet, then break one RGB frame of each listed vehicle (after generation)."""
    from fedseg.config import DataSpec
    from fedseg.data import load_data

    spec = DataSpec(root=str(cache / "synthetic"), image_size=(64, 64), frames_per_vehicle=8, heldout_frames=8)
    load_data(spec, num_clients=3, seed=0, progress=False)
    root = next((cache / "synthetic").iterdir())
    broken = []
    for v in vehicles:
        frame = min((root / f"vehicle_{v:02d}" / "CameraRGB").glob("*.png"))
        frame.write_bytes(b"\x89PNG\r\n\x1a\n broken")
        broken.append(frame)
    return broken


@pytest.mark.e2e
def test_sim_with_one_broken_vehicle_completes_and_records_its_failures(tmp_path: Path) -> None:
    broken = corrupt_frames(tmp_path / "cache", [0])

    proc = fedseg_sim("federation.min_fit_clients=2", f"hydra.run.dir={tmp_path / 'out'}", cache=tmp_path / "cache")

    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["failures"] == 1 and r["clients"] == 2 and broken[0].name in r["failure"] for r in rows[1:])


@pytest.mark.e2e
def test_sim_whose_vehicles_all_fail_exits_non_zero_in_one_line(tmp_path: Path) -> None:
    corrupt_frames(tmp_path / "cache", [0, 1, 2])

    proc = fedseg_sim(f"hydra.run.dir={tmp_path / 'out'}", cache=tmp_path / "cache")

    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fedseg-sim: error: ")]
    assert len(errors) == 1 and "round 1: only 0 of 3 vehicles answered" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "done" not in proc.stdout
