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
    reasons = {r["vehicle"]: r["reason"] for r in row["rejected"]}  # named by node id (vehicle i is node 100 + i)
    assert set(reasons) == {"102", "103"} and row["clients"] == 2
    assert [r["partition"] for r in row["rejected"]] == [2, 3]
    assert "not finite" in reasons["102"] and "median" in reasons["103"]
    assert "rejected node 102 (partition 2)" in caplog.text and "rejected node 103 (partition 3)" in caplog.text


def test_a_round_whose_every_update_is_rejected_stops_the_run_naming_the_reason() -> None:
    # Every vehicle sends NaN: without the stop, the run would go on with an unchanged model.
    nan = {i: (lambda p: [np.full_like(a, np.nan) for a in p]) for i in range(3)}
    fleet = Fleet(toy_updates(), [1, 2, 3], PLAIN, send=nan, rounds=2)

    with pytest.raises(RunFailed, match=r"round 1: every vehicle's update was rejected \(3\); first: node 100: "
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


# ---- what a vehicle says about its reply: count, metrics, identity ----

def test_a_vehicle_claiming_1e12_examples_weighs_no_more_than_the_largest_partition() -> None:
    # Prepare: vehicles 0, 1, 2 train on 1, 2, 3 frames (the cap: 3, the largest partition the server
    # knows) and add +1, +4, -2; vehicle 2 claims 10**12 frames, which would make it the whole mean.
    fleet = Fleet(toy_updates(), [1, 2, 3], PLAIN, claims={2: {"examples": 10**12}})

    # Execute
    fleet.run()

    # Assert: its claim clipped to 3, the mean is the honest one, (1*1 + 2*4 + 3*-2) / 6 = 0.5
    # (uncapped it would be -2 to 7 digits), and the row says whose count was clipped.
    np.testing.assert_allclose(fleet.globals[-1][0], np.full((2, 3), START + 0.5), rtol=1e-6)
    row = fleet.rows[-1]
    assert row["clipped"] == [{"vehicle": "102", "partition": 2, "claimed": 10**12, "weight": 3}]
    assert row["examples"] == 6 and "rejected" not in row


def test_without_a_known_cap_every_vehicle_weighs_the_same() -> None:
    fleet = Fleet(toy_updates(), [1, 2, 3], PLAIN, claims={2: {"examples": 10**12}})
    fleet.examples = []  # the server knows no partition sizes and federation.max_examples is unset

    fleet.run()

    np.testing.assert_allclose(fleet.globals[-1][0], np.full((2, 3), START + (1 + 4 - 2) / 3), rtol=1e-6)


@pytest.mark.parametrize(("metrics", "examples", "reason"), [
    ({"loss": "low"}, None, "metric loss='low' is not a finite number >= 0"),
    ({"loss": float("nan")}, None, "metric loss=nan is not a finite number >= 0"),
    ({"epsilon": -1.0}, None, "metric epsilon=-1.0 is not a finite number >= 0"),
    ({"skipped": "yes"}, None, "metric skipped='yes' is not true or false"),
    ({"note": float("inf")}, None, "metric note=inf is not finite"),
    ({}, -5, "num_examples=-5 is not an integer >= 0"),
    ({}, 0, "num_examples=0 in a reply not marked skipped"),
])
def test_a_reply_with_a_malformed_metric_is_rejected_and_the_run_finishes(
        metrics: dict, examples: int | None, reason: str) -> None:
    # Prepare: vehicle 1 (+4, 2 frames) sends a malformed value, every round of two.
    claim = {"metrics": metrics, **({"examples": examples} if examples is not None else {})}
    fleet = Fleet(toy_updates(), [1, 2, 3], PLAIN, claims={1: claim}, rounds=2)

    # Execute
    fleet.run()

    # Assert: both rounds ran on vehicles 0 and 2 only: (1*1 + 3*-2) / 4 = -1.25 each
    assert [r["round"] for r in fleet.rows] == [0, 1, 2]
    np.testing.assert_allclose(fleet.globals[-1][0], np.full((2, 3), START - 2.5), rtol=1e-6)
    for row in fleet.rows[1:]:
        assert row["rejected"] == [{"vehicle": "101", "partition": 1, "reason": reason}]
        assert row["clients"] == 2 and row["train_loss"] == pytest.approx((1 * 0.0 + 3 * 2.0) / 4)


def test_a_vehicle_claiming_anothers_partition_id_gets_itself_blamed(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: vehicle 2 (node 102) reports partition 0, vehicle 0's, and sends NaN.
    fleet = Fleet(toy_updates(), [1, 2, 3], PLAIN, send={2: lambda p: [np.full_like(a, np.nan) for a in p]},
                  claims={2: {"metrics": {"partition_id": 0}}})

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedseg"):
        fleet.run()

    # Assert: the rejection names node 102 (the claim only as its label); node 100's update is averaged.
    row = fleet.rows[-1]
    assert [(r["vehicle"], r["partition"]) for r in row["rejected"]] == [("102", 0)]
    assert "rejected node 102 (partition 0)" in caplog.text and "node 100" not in caplog.text
    np.testing.assert_allclose(fleet.globals[-1][0], np.full((2, 3), START + 3), rtol=1e-6)  # (1*1 + 2*4) / 3


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
