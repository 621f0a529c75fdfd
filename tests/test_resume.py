"""Resume: a run continued after round k ends exactly where the uninterrupted run ends, rows once each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from toy_fleet import Fleet, toy_updates

from fedseg.checkpoints import read_checkpoint, save_checkpoint
from fedseg.runlog import RunLog
from server.resume import resume_state

PLAIN = {"name": "none"}


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_resumed_run_matches_the_uninterrupted_one(strategy: str, tmp_path: Path) -> None:
    # Prepare: the uninterrupted 3-round run, and the same run stopped after round 1 with its state saved
    # the way the reporter saves it (a weights-only checkpoint).
    full = Fleet(toy_updates(), [1, 2, 3], PLAIN, strategy=strategy, rounds=3).run()
    first = Fleet(toy_updates(), [1, 2, 3], PLAIN, strategy=strategy, rounds=1).run()
    assert first.parts.base is not None
    state = resume_state(first.parts.base, first.parts.recorder, tracker_id=None)
    save_checkpoint(tmp_path / "global.pt", torch.nn.Linear(1, 1), {"backbone": "x", "num_classes": 1,
                                                                     "round": 1, "resume": state})
    saved = read_checkpoint(tmp_path / "global.pt")

    # Execute: continue after round 1 from what the checkpoint holds.
    resumed = Fleet(toy_updates(), [1, 2, 3], PLAIN, strategy=strategy, rounds=3).run(
        start_round=1, initial=first.globals[-1], state=saved["resume"])

    # Assert: same final model (FedAdam's moments were restored, not restarted); rounds 2 and 3 only.
    for a, b in zip(resumed.globals[-1], full.globals[-1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert [r["round"] for r in resumed.rows] == [2, 3]


def test_fedadam_without_its_moments_would_not_match() -> None:
    # The test above can fail: restarting FedAdam's moments gives another model.
    full = Fleet(toy_updates(), [1, 2, 3], PLAIN, strategy="fedadam", rounds=3).run()
    first = Fleet(toy_updates(), [1, 2, 3], PLAIN, strategy="fedadam", rounds=1).run()

    fresh = Fleet(toy_updates(), [1, 2, 3], PLAIN, strategy="fedadam", rounds=3).run(
        start_round=1, initial=first.globals[-1])

    assert not np.allclose(fresh.globals[-1][0], full.globals[-1][0])


def test_run_log_resumed_after_round_k_keeps_rows_up_to_k_once(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    for r in range(4):  # rounds 0..3 written; the checkpoint of round 3 never was (killed in between)
        log.log_round({"round": r, "loss": 1.0})

    resumed = RunLog(tmp_path, resume_after=2)
    resumed.log_round({"round": 3, "loss": 0.5})

    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and rows[-1]["loss"] == 0.5
