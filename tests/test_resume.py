"""Resume: a run continued after round k ends exactly where the uninterrupted run ends, rows once each."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from toy_fleet import Fleet, toy_updates

from fedseg.checkpoints import read_checkpoint, save_checkpoint
from fedseg.deploy.processes import proc_stat, tagged_pids
from fedseg.runlock import RunDirLock
from fedseg.runlog import RunLog

PLAIN = {"name": "none"}


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_resumed_run_matches_the_uninterrupted_one(strategy: str, tmp_path: Path) -> None:
    # Prepare: the uninterrupted 3-round run, and the same run stopped after round 1 with its state saved
    # the way the reporter saves what the round recorder hands it (a weights-only checkpoint).
    full = Fleet(toy_updates(), [1, 2, 3], PLAIN, strategy=strategy, rounds=3).run()
    first = Fleet(toy_updates(), [1, 2, 3], PLAIN, strategy=strategy, rounds=1).run()
    state = first.resume
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


# ---- end to end: fedseg-sim killed with SIGKILL mid-run, then `fedseg-sim resume=DIR` ----

def _kill_all(mark: str) -> None:
    for _ in range(20):
        pids = tagged_pids(mark, variable="FEDSEG_TEST_MARK")  # Flower detaches some children
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)


def _checkpoint_round(run_dir: Path) -> int:
    try:
        return int(read_checkpoint(run_dir / "checkpoints" / "global.pt")["round"])
    except (FileNotFoundError, ValueError):
        return -1


def _client_epsilon(run_dir: Path) -> dict[str, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows[-1].get("client_epsilon") or {}


def _kill_after_round_2_and_resume(run_dir: Path, cache: Path, rounds: int, *overrides: str
                                   ) -> tuple[dict[str, float], subprocess.CompletedProcess]:
    """A smoke run of ``rounds`` rounds, killed (SIGKILL, the whole tree) once round 2's checkpoint exists,
    then ``fedseg-sim resume=RUN_DIR``: (the vehicles' epsilons at the kill, the resume call)."""
    mark = uuid.uuid4().hex
    exe = Path(sys.executable).with_name("fedseg-sim")
    env = {**os.environ, "FEDSEG_DATA_CACHE": str(cache), "FEDSEG_TEST_MARK": mark}
    args = [str(exe), "experiment=smoke", f"federation.rounds={rounds}", *overrides, "run.progress=false"]
    proc = subprocess.Popen([*args, f"hydra.run.dir={run_dir}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while _checkpoint_round(run_dir) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        killed_at = _checkpoint_round(run_dir)
        before = _client_epsilon(run_dir)
    finally:
        _kill_all(mark)
        proc.wait(timeout=30)
    assert 2 <= killed_at < rounds, f"the run was not caught mid-way (checkpoint round {killed_at})"
    resumed = subprocess.run([str(exe), f"resume={run_dir}"], env={**env, "FEDSEG_TEST_MARK": uuid.uuid4().hex},
                             capture_output=True, text=True, timeout=600, check=False)
    return before, resumed


def _resumed_as_itself_with_no_lower_epsilon(run_dir: Path, rounds: int, before: dict[str, float]) -> None:
    """A DP-SGD smoke run resumed to its end: its own config kept (not the resume call's), and every
    vehicle's epsilon kept by partition (node ids are new in the resumed process), none lower."""
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert saved.experiment_name == "smoke" and saved.federation.rounds == rounds and saved.resume is None
    after = _client_epsilon(run_dir)
    assert set(before) == set(after) == {"0", "1", "2"}, (before, after)
    assert all(after[v] >= before[v] for v in before), (before, after)


@pytest.mark.e2e
def test_a_pooled_run_killed_after_round_2_resumes_to_round_4_with_each_row_once(tmp_path: Path) -> None:
    # Under DP-SGD and pooled (fedseg/vehicle_pool.py): a new node carries each vehicle after the resume,
    # and the vehicles' accountants continue from disk. (A run on its own nodes: the SIGKILL test below.)
    run_dir = tmp_path / "run"

    before, resumed = _kill_after_round_2_and_resume(run_dir, tmp_path / "cache", 4, "privacy=dpsgd",
                                                     "federation.sim_nodes=3")

    # Rounds 0..4 exactly once; the run's own config kept; epsilon never went down.
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rounds = [json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2, 3, 4]
    _resumed_as_itself_with_no_lower_epsilon(run_dir, 4, before)


@pytest.mark.e2e
def test_secaggplus_run_killed_after_round_2_resumes_with_each_round_once(tmp_path: Path) -> None:
    # Under SecAgg+ the fit workflow is SecAggPlusFit and the outermost strategy, once resumed, is the
    # round offset: the workflow must still find the round's outcome (it once looked for the secure
    # sum by type on the strategy Flower hands it, and a resumed run stopped with a TypeError).
    # Smoke rounds are short: another may end before the kill lands, so 6 rounds, not 3.
    run_dir = tmp_path / "run"

    _, resumed = _kill_after_round_2_and_resume(run_dir, tmp_path / "cache", 6, "secagg=secaggplus")

    # Rounds 0..6 exactly once, the last aggregated by SecAgg+ (its row carries the protocol's entry).
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert rows[-1]["secagg"]["survivors"] == 3 and not rows[-1]["secagg"]["failed"]


@pytest.mark.e2e
def test_sim_stopped_with_sigterm_exits_nonzero_and_leaves_no_flower_process(tmp_path: Path) -> None:
    # Prepare: a smoke run signalled like `kill PID` (only fedseg-sim itself) once round 1 is saved,
    # i.e. while its SuperLink, SuperExec, simulation process and Ray workers are all up.
    run_dir, mark = tmp_path / "run", uuid.uuid4().hex
    exe = Path(sys.executable).with_name("fedseg-sim")
    env = {**os.environ, "FEDSEG_DATA_CACHE": str(tmp_path / "cache"), "FEDSEG_TEST_MARK": mark}
    log = tmp_path / "stderr.log"  # a file, not a pipe: nobody reads it while the run goes on
    err = log.open("w")
    proc = subprocess.Popen([str(exe), "experiment=smoke", "federation.rounds=20", "run.progress=false",
                             f"hydra.run.dir={run_dir}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=err)
    try:
        deadline = time.monotonic() + 300
        while _checkpoint_round(run_dir) < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, f"the run ended before it could be stopped: {log.read_text()[-2000:]}"
        running = tagged_pids(mark, variable="FEDSEG_TEST_MARK")
        # Execute
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        # Assert: a failure exit, and nothing it started outlives it (a SIGKILLed process may take the
        # kernel a while to tear down on a loaded machine, so "left" means still there after 30 s;
        # tagged_pids never lists a zombie: its environment is gone)
        deadline = time.monotonic() + 30
        while (left := tagged_pids(mark, variable="FEDSEG_TEST_MARK")) and time.monotonic() < deadline:
            time.sleep(0.5)
        left_running = [_cmdline(pid) for pid in left]  # named before the clean-up below kills them
    finally:
        _kill_all(mark)
        if proc.poll() is None:
            proc.kill()
        err.close()
    assert len(running) >= 3, running  # the SuperLink and what it spawned were up when the signal came
    assert code == 128 + signal.SIGTERM
    assert left_running == [], f"processes left running after SIGTERM: {left_running}"


def _cmdline(pid: int) -> str:
    try:
        return (f"{pid} [{proc_stat(pid).state}]: "
                + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
    except OSError:
        return f"{pid}: (gone)"


@pytest.mark.e2e
def test_sim_killed_with_sigkill_takes_its_processes_along_and_resumes_each_round_once(tmp_path: Path) -> None:
    # Prepare: a smoke run under DP-SGD killed like the OOM killer or a scheduler's hard kill would
    # (SIGKILL to its process group, which cannot be caught) once round 1's row is written, with its
    # Flower and Ray processes up: Flower runs the SuperExec and the simulation in sessions of their own.
    run_dir, mark = tmp_path / "run", uuid.uuid4().hex
    exe = Path(sys.executable).with_name("fedseg-sim")
    env = {**os.environ, "FEDSEG_DATA_CACHE": str(tmp_path / "cache"), "FEDSEG_TEST_MARK": mark}
    log = tmp_path / "stderr.log"
    with log.open("w") as err:
        proc = subprocess.Popen([str(exe), "experiment=smoke", "federation.rounds=6", "privacy=dpsgd",
                                 "run.progress=false", f"hydra.run.dir={run_dir}"], env=env,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while max(_rounds(run_dir), default=-1) < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, f"the run ended before it could be killed: {log.read_text()[-2000:]}"
        running = tagged_pids(mark, variable="FEDSEG_TEST_MARK")
        # Execute
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        killed = time.monotonic()
        while (left := tagged_pids(mark, variable="FEDSEG_TEST_MARK")) and time.monotonic() - killed < 15:
            time.sleep(0.2)
        gone_after = time.monotonic() - killed
        left_running = [_cmdline(pid) for pid in left]  # named before the clean-up below kills them
        rows_then, before = _rounds(run_dir), _client_epsilon(run_dir)
        time.sleep(3)
        rows_later = _rounds(run_dir)
    finally:
        _kill_all(mark)
    print(f"{len(running)} processes at the kill; the last gone {gone_after:.1f} s after it")

    # Assert: nothing the run started (the watchdog included) outlived it by 15 s, and nothing wrote
    # the run directory after; then the resume finishes every round exactly once, as the run it was,
    # its vehicles' accountants continued from disk.
    assert len(running) >= 4, running  # the SuperLink, its SuperExec, the simulation, Ray, the watchdog
    assert left_running == [], f"processes left 15 s after SIGKILL: {left_running}"
    assert rows_later == rows_then, (rows_then, rows_later)
    resumed = subprocess.run([str(exe), f"resume={run_dir}"], env={**env, "FEDSEG_TEST_MARK": uuid.uuid4().hex},
                             capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _rounds(run_dir) == [0, 1, 2, 3, 4, 5, 6]
    _resumed_as_itself_with_no_lower_epsilon(run_dir, 6, before)


@pytest.mark.e2e
@pytest.mark.parametrize("resume", [False, True])
def test_a_second_sim_on_a_live_run_directory_is_refused_in_one_line_naming_its_pid(resume: bool,
                                                                                    tmp_path: Path) -> None:
    # Prepare: the run directory of a live run (its lock held by this process), resumable as far as
    # fedseg-sim's first look goes.
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("experiment_name: smoke\n")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "global.pt").write_bytes(b"the live run's")
    exe = Path(sys.executable).with_name("fedseg-sim")
    args = [f"resume={run_dir}"] if resume else ["experiment=smoke", f"hydra.run.dir={run_dir}"]

    # Execute
    with RunDirLock.acquire(run_dir):
        refused = subprocess.run([str(exe), *args, "run.progress=false"], capture_output=True, text=True,
                                 timeout=300, check=False, env={**os.environ, "FEDSEG_DATA_CACHE": str(tmp_path)})

    # Assert: status 1, one line naming the directory and this process's pid, nothing written there.
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines() == [
        (f"fedseg-sim: error: {run_dir} is in use by a live run (pid {os.getpid()}, lock run.lock): wait for it "
         "to end or stop it, or choose another directory")]
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "flwr_app").exists()


def _rounds(run_dir: Path) -> list[int]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line)["round"] for line in lines if line.endswith("}")]
