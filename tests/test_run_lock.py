"""One writer per run directory (fedseg/runlock.py), and a watchdog that outlives only its command
(fedseg/deploy/watchdog.py); the end-to-end SIGKILL test is in tests/test_resume.py."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fedseg.deploy.processes import TAG, proc_stat, running, tagged_pids
from fedseg.deploy.watchdog import Watchdog
from fedseg.runlock import JOIN, LOCK_FILE, RunDirLock, RunDirLocked

# A process that takes the lock, starts a child that could inherit it (close_fds=False), prints the
# child's pid and dies by SIGKILL: the lock it leaves is stale, and the child must not hold it.
DIES_HOLDING = """
import os, signal, subprocess, sys
from pathlib import Path
from fedseg.runlock import RunDirLock
lock = RunDirLock.acquire(Path(sys.argv[1]))
child = subprocess.Popen(["sleep", "60"], close_fds=False, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
print(os.getpid(), child.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_held_lock_refuses_a_second_holder_in_one_line_naming_the_pid(tmp_path: Path) -> None:
    with RunDirLock.acquire(tmp_path), pytest.raises(RunDirLocked) as refused:
        RunDirLock.acquire(tmp_path)  # another open file: flock refuses it, even in this process

    message = str(refused.value)
    assert f"pid {os.getpid()}" in message and str(tmp_path) in message and "\n" not in message
    RunDirLock.acquire(tmp_path).release()  # released: free again
    assert (tmp_path / LOCK_FILE).read_text() == ""  # a clean release leaves no holder behind


def test_the_refusal_names_the_live_holders_not_an_exited_one_still_unreaped(tmp_path: Path) -> None:
    exited = subprocess.Popen(["true"])  # never waited for: a zombie, which kill(pid, 0) still finds
    deadline = time.monotonic() + 10
    while running(exited.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        with RunDirLock.acquire(tmp_path), pytest.raises(RunDirLocked) as refused:
            (tmp_path / LOCK_FILE).write_text(f"{exited.pid} its-token\n{os.getpid()} ours\n")
            RunDirLock.acquire(tmp_path)
    finally:
        exited.wait()

    assert f"(pid {os.getpid()}, lock" in str(refused.value)


def test_a_lock_left_by_a_killed_process_is_taken_over_and_no_child_inherits_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: a process dies by SIGKILL holding the lock, its child still running.
    out = subprocess.run([sys.executable, "-c", DIES_HOLDING, str(tmp_path)], capture_output=True, text=True,
                         timeout=60, check=False)
    dead, child = map(int, out.stdout.split())
    try:
        # Execute
        with caplog.at_level(logging.WARNING, logger="fedseg"), RunDirLock.acquire(tmp_path):
            holder = (tmp_path / LOCK_FILE).read_text()
    finally:
        os.kill(child, signal.SIGKILL)

    # Assert: taken over (the dead holder named), the file now names this process.
    assert out.returncode == -signal.SIGKILL
    assert f"taking over the lock left by pid {dead} (no longer running)" in caplog.text
    assert holder.split()[0] == str(os.getpid())


def test_the_started_serverapp_joins_its_runs_lock_and_keeps_newcomers_out(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(JOIN, raising=False)
    owner = RunDirLock.acquire(tmp_path)
    owner.share()  # fedseg-sim, before it starts Flower: the token goes into its environment

    joined = RunDirLock.join(tmp_path, os.environ[JOIN])  # the ServerApp, with the environment it inherited
    owner.release()  # fedseg-sim is gone; its ServerApp still writes
    with pytest.raises(RunDirLocked, match=f"pid {os.getpid()}"):
        RunDirLock.acquire(tmp_path)
    with pytest.raises(RunDirLocked):
        RunDirLock.join(tmp_path, "another run's token")  # another run's ServerApp: not its lock
    joined.release()

    assert not joined.owner
    RunDirLock.join(tmp_path, "stale token").release()  # nobody holds it: a deployed ServerApp takes it


def _sleeper(tag: str) -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"], env={**os.environ, TAG: tag}, start_new_session=True)


def test_the_watchdog_stops_the_tagged_processes_when_its_command_is_killed(tmp_path: Path) -> None:
    # Prepare: a command (a Python process) with a watchdog and a tagged process in a session of its own.
    tag, home = uuid.uuid4().hex, tmp_path / "home"
    home.mkdir()
    code = (f"import sys, time; from pathlib import Path; from fedseg.deploy.watchdog import Watchdog\n"
            f"w = Watchdog({tag!r}, Path({str(home)!r})); print(w.proc.pid, flush=True); time.sleep(60)")
    command = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert command.stdout is not None
    watchdog = int(command.stdout.readline())
    tagged = _sleeper(tag)

    # Execute
    command.kill()
    command.wait()
    deadline = time.monotonic() + 15
    while (tagged.poll() is None or running(watchdog)) and time.monotonic() < deadline:
        time.sleep(0.2)

    # Assert: the tagged process stopped, the folder removed, and the watchdog gone after its work.
    assert tagged.poll() is not None and not tagged_pids(tag)
    assert not home.exists()
    assert not running(watchdog)


def test_a_command_killed_mid_sweep_leaves_its_watchdog_the_ray_nodes_it_named() -> None:
    # Prepare: a command names its Ray node to its watchdog; its sweep then stops the tagged raylet, but the
    # command is killed before it reaches the node's agent, whose /proc environment shows no tag.
    tag, node = uuid.uuid4().hex, uuid.uuid4().hex
    code = (f"import sys, time; from fedseg.deploy.watchdog import Watchdog\n"
            f"w = Watchdog({tag!r}); w.follow({{{node!r}}}); print(w.proc.pid, flush=True); time.sleep(60)")
    command = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert command.stdout is not None
    watchdog = int(command.stdout.readline())
    raylet = subprocess.Popen(["sleep", "60"], env={**os.environ, TAG: tag, "RAY_NODE_ID": node})
    agent = subprocess.Popen(["sleep", "60"], env={**os.environ, "RAY_NODE_ID": node})
    try:
        raylet.kill()
        raylet.wait()

        # Execute
        command.kill()
        command.wait()

        # Assert: the watchdog found the agent through the node the command named, then exited.
        assert agent.wait(15) is not None
        deadline = time.monotonic() + 10
        while running(watchdog) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not running(watchdog)
    finally:
        if agent.poll() is None:
            agent.kill()
        agent.wait()


def test_a_tagged_raylet_names_its_node_on_its_command_line_and_its_untagged_agents_stop_with_it() -> None:
    from fedseg.deploy.processes import stop_tagged

    tag, node = uuid.uuid4().hex, uuid.uuid4().hex
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_NODE_ID"}
    raylet = subprocess.Popen([*sleep, f"--node_id={node}"], env={**env, TAG: tag})  # no RAY_NODE_ID, as Ray's
    agent = subprocess.Popen(sleep, env={**env, "RAY_NODE_ID": node})  # its tag unreadable
    try:
        assert stop_tagged(tag, grace=2) == {node}
        assert raylet.wait(5) is not None and agent.wait(5) is not None
    finally:
        for proc in (raylet, agent):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_a_watchdog_stood_down_removes_nothing_stops_a_late_straggler_and_exits(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    with Watchdog(tag, tmp_path) as watchdog:
        watchdog.stand_down()  # the command's own cleanup ran; it exits without waiting
    pid = watchdog.proc.pid
    straggler = _sleeper(tag)  # born after that cleanup, as a late Ray agent can be on a loaded machine
    try:
        deadline = time.monotonic() + 10
        while (straggler.poll() is None or running(pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert straggler.poll() is not None  # stopped by the watchdog's last looks
        assert not running(pid) and tmp_path.exists()  # then it exited; the folder was the command's to remove
    finally:
        if straggler.poll() is None:
            straggler.kill()
        straggler.wait()


def test_a_ray_process_whose_tag_is_unreadable_is_stopped_with_its_node() -> None:
    # A Ray agent that set its title can show /proc an environment without the tag but with its node's id.
    from fedseg.deploy.processes import stop_tagged

    tag, node, other = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex
    tagged = subprocess.Popen(["sleep", "60"], env={**os.environ, TAG: tag, "RAY_NODE_ID": node})
    agent = subprocess.Popen(["sleep", "60"], env={**os.environ, "RAY_NODE_ID": node})
    stranger = subprocess.Popen(["sleep", "60"], env={**os.environ, "RAY_NODE_ID": other})  # another run's Ray
    try:
        nodes = stop_tagged(tag, grace=2)
        assert nodes == {node}
        assert tagged.wait(5) is not None and agent.wait(5) is not None and stranger.poll() is None
    finally:
        for proc in (tagged, agent, stranger):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


# A tagged session leader (as Flower's SuperExec is) that starts an untagged child in its session, as the
# raylet starts an agent whose title zeroed the tag out of its /proc environment; prints the child's pid.
LEADS_AN_UNTAGGED_CHILD = f"""
import os, subprocess, sys, time
env = {{k: v for k, v in os.environ.items() if k != {TAG!r}}}
child = subprocess.Popen(["sleep", "60"], env=env)
print(child.pid, flush=True)
time.sleep(60)
"""


def _leader_and_untagged_child(tag: str) -> tuple[subprocess.Popen, int]:
    leader = subprocess.Popen([sys.executable, "-c", LEADS_AN_UNTAGGED_CHILD], env={**os.environ, TAG: tag},
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert leader.stdout is not None
    return leader, int(leader.stdout.readline())


def test_an_untagged_process_in_a_session_a_tagged_process_leads_stops_with_it_and_a_joined_one_does_not() -> None:
    from fedseg.deploy.processes import stop_tagged

    # Prepare: a tagged leader with an untagged child in its session, and a tagged process that merely
    # joined this test's session (as fedseg-sim's `flwr run` joins a terminal's) beside an untagged one.
    tag = uuid.uuid4().hex
    leader, child = _leader_and_untagged_child(tag)
    joined = subprocess.Popen(["sleep", "60"], env={**os.environ, TAG: tag})
    bystander = subprocess.Popen(["sleep", "60"])  # this test's session, untagged: never the command's
    try:
        sessions: set[int] = set()
        # Execute
        stop_tagged(tag, grace=2, sessions=sessions)

        # Assert: the leader's session followed and its untagged child stopped; the joined session not.
        assert sessions == {leader.pid}
        assert leader.wait(5) is not None and joined.wait(5) is not None
        assert not running(child)
        assert bystander.poll() is None
    finally:
        for proc in (leader, joined, bystander):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_a_command_killed_mid_sweep_leaves_its_watchdog_the_sessions_it_named() -> None:
    # Prepare: a command names the session its tagged leader leads; its sweep then stops the leader, but
    # the command is killed before it reaches the leader's untagged child, whose session still says whose.
    tag = uuid.uuid4().hex
    leader, child = _leader_and_untagged_child(tag)
    code = (f"import sys, time; from fedseg.deploy.watchdog import Watchdog\n"
            f"w = Watchdog({tag!r}); w.follow(set(), {{{leader.pid}}}); print(w.proc.pid, flush=True); "
            f"time.sleep(60)")
    command = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert command.stdout is not None
    watchdog = int(command.stdout.readline())
    try:
        leader.kill()
        leader.wait()

        # Execute
        command.kill()
        command.wait()

        # Assert: the watchdog found the child through the session the command named, then exited.
        deadline = time.monotonic() + 15
        while (running(child) or running(watchdog)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not running(child)
        assert not running(watchdog)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_a_sigterm_between_flwr_run_lines_stops_the_stream_without_waiting_for_the_run() -> None:
    """`kill PID` of fedseg-sim lands while `flwr run --stream` is silent (a long round): the stream
    stops at once, so the command's teardown runs, instead of Popen waiting for the run to end."""
    from fedseg.deploy.processes import terminate_as_exit
    from fedseg.sim.engine import _stream

    # Prepare: a stand-in for `flwr run --stream`: one line, then 60 s of silence (a round in flight).
    silent = [sys.executable, "-c", "import time; print('round 1', flush=True); time.sleep(60)"]
    timer = subprocess.Popen([sys.executable, "-c", f"import os, time; time.sleep(1.5); os.kill({os.getpid()}, 15)"])
    started = time.monotonic()
    # Execute
    with pytest.raises(SystemExit) as stopped, terminate_as_exit():
        _stream(silent, dict(os.environ), verbose=False)
    # Assert: the signal's exit status, seconds after the signal rather than at the stand-in's end.
    timer.wait(timeout=10)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert time.monotonic() - started < 20


def test_proc_stat_reads_a_processs_cpu_seconds_and_nothing_for_one_that_is_gone() -> None:
    busy = subprocess.Popen([sys.executable, "-c", ("import time\nend = time.process_time() + 0.5\n"
                             "while time.process_time() < end: pass\ntime.sleep(30)")])
    try:
        deadline = time.monotonic() + 20
        while proc_stat(busy.pid).cpu_s < 0.5 and time.monotonic() < deadline:
            time.sleep(0.1)
        stat = proc_stat(busy.pid)
        assert stat.running and stat.parent == os.getpid()
        assert 0.5 <= stat.cpu_s < 10  # its half second of spinning, and its start-up
    finally:
        busy.kill()
        busy.wait()
    assert proc_stat(busy.pid) == ("", 0, 0, 0.0)  # reaped: gone

