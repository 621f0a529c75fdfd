"""Flower processes a fedseg command starts (a SuperLink and what it spawns), and how they are all stopped.

Flower detaches some children into sessions of their own (the SuperLink's SuperExec, and through it
the ServerApp or simulation process), so killing a process group misses them. Every process a
command starts therefore carries a tag in its environment, which its children inherit; stopping
means signalling exactly the processes with that tag, found in ``/proc`` (Linux).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

TAG = "FEDSEG_PROCESS_TAG"


def with_this_environment_on_path(env: dict[str, str]) -> dict[str, str]:
    """``env`` with this Python's ``bin`` folder first on ``PATH``.

    Flower's processes start each other by name (the SuperLink its ``flower-superexec``, a SuperNode
    its ``flwr-clientapp``), so a command run as ``/path/to/venv/bin/fedseg-sim`` without activating
    the venv (cron, systemd) would fail to find them, or find another environment's.
    """
    here = str(Path(sys.executable).parent)
    rest = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != here]
    return {**env, "PATH": os.pathsep.join([here, *rest])}


def new_tag() -> str:
    """A tag no other process carries."""
    return uuid.uuid4().hex


def free_port() -> int:
    """A loopback TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float, alive: subprocess.Popen | None = None) -> None:
    """Until something accepts connections on ``port``; ``RuntimeError`` when ``alive`` exits first or
    ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"exited with status {alive.returncode} before listening on port {port}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listened on port {port} within {timeout:g} s")


RAY_NODE = "RAY_NODE_ID"


def _environ(pid: int) -> dict[bytes, bytes] | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone meanwhile, or not ours to read
        return None
    return dict(entry.split(b"=", 1) for entry in raw.split(b"\0") if b"=" in entry)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # /proc/PID/stat's unit of CPU time


class ProcStat(NamedTuple):
    """A process's state (R, S, D, Z, X...), parent, session and CPU seconds so far (user + system), from
    ``/proc/PID/stat``."""

    state: str
    parent: int
    session: int
    cpu_s: float = 0.0

    @property
    def running(self) -> bool:
        """The process exists and is not a zombie (nor dead): there is something left to stop."""
        return self.state not in ("", "Z", "X")


def proc_stat(pid: int) -> ProcStat:
    """``pid``'s :class:`ProcStat`, read from ``/proc/PID/stat`` (which no process title overwrites);
    ``ProcStat("", 0, 0)`` when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return ProcStat(fields[0], int(fields[1]), int(fields[3]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    except (OSError, IndexError, ValueError):
        return ProcStat("", 0, 0)


def running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (nor dead): there is something left to stop."""
    return proc_stat(pid).running


def _node_argument(pid: int) -> str:
    """The Ray node id on ``pid``'s command line (the raylet's ``--node_id=``, an agent's ``--node-id=``), or ""."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    for arg in argv:
        for flag in (b"--node_id=", b"--node-id="):
            if arg.startswith(flag):
                return arg[len(flag):].decode(errors="replace")
    return ""


def tagged_pids(tag: str, variable: str = TAG, ray_nodes: set[str] | None = None,
                sessions: set[int] | None = None) -> list[int]:
    """Processes whose environment carries ``variable=tag`` (this process excluded), those of the Ray nodes
    in ``ray_nodes`` (``RAY_NODE_ID``), and those of the sessions in ``sessions``; the node of every tagged
    Ray process found is added to ``ray_nodes``, and the session of every tagged session leader to
    ``sessions`` (pass a set to follow them: None follows none).

    Why more than the tag: a process that sets its title (Ray's ``ray::DashboardAgent``,
    ``ray::RuntimeEnvAgent``) zeroes the start of its environment as ``/proc`` shows it, and the raylet
    hands its agents their environment in hash order, so which variables survive depends on the names
    in the environment: on one machine the tag and ``RAY_NODE_ID`` both fell in the zeroed part and the
    agents of a SIGTERMed and of a SIGKILLed run outlived it. Two links do not depend on the environment
    surviving: a tagged process's Ray node (``RAY_NODE_ID``, or the raylet's ``--node_id=`` on its command
    line), and above all its session, from ``/proc/PID/stat``. Flower starts the SuperExec, and through it
    the simulation and Ray, in a session of its own; every process in a session a tagged process leads
    descends from it, so it is the command's. A session merely joined (fedseg-sim's own, a terminal's) is
    never followed. Zombies are never listed: there is nothing left to stop."""
    needle, mine = tag.encode(), os.getpid()
    seen: list[tuple[int, dict[bytes, bytes], int]] = []
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or (pid := int(entry.name)) == mine:
            continue
        env, stat = _environ(pid), proc_stat(pid)
        if env is None or not stat.running:
            continue
        if env.get(variable.encode()) == needle:
            pids.append(pid)
            node = env.get(RAY_NODE.encode(), b"").decode() or _node_argument(pid)
            if node and ray_nodes is not None:
                ray_nodes.add(node)
            if stat.session == pid and sessions is not None:
                sessions.add(pid)
        else:
            seen.append((pid, env, stat.session))
    for pid, env, session in seen:  # after every tagged process: a leader may be listed after its members
        node = env.get(RAY_NODE.encode(), b"").decode()
        if (node and ray_nodes and node in ray_nodes) or (sessions and session in sessions):
            pids.append(pid)
    return pids


def stop_tagged(tag: str, grace: float = 10.0, ray_nodes: set[str] | None = None, *,
                sessions: set[int] | None = None, follow_ray_nodes: bool = True) -> set[str]:
    """SIGTERM every process tagged ``tag`` (and of the Ray nodes they run and the sessions they lead:
    :func:`tagged_pids`); SIGKILL those left after ``grace`` s. Returns those Ray nodes (with
    ``ray_nodes``, which it extends; ``sessions`` too).

    ``follow_ray_nodes=False``: not the Ray nodes. A command attached to a Ray cluster it did not start
    (``fedseg-sim ray.address=...``) must never signal that cluster's raylets, agents or workers, whatever
    node id a tagged process may carry (the cluster's processes are in no session a tagged process leads).

    Each phase signals processes that appear while it waits too (Ray's raylet starts workers, and
    restarts its agents, while its driver shuts down), so none is left because it was born after the
    first look; and "none left" must hold on three looks 0.5 s apart, since a process in the middle
    of being started can be unreadable for a moment (on a loaded machine a Ray agent born during the
    teardown outlived a run whose two looks came too soon).
    """
    nodes = ray_nodes if ray_nodes is not None else set[str]()
    led = sessions if sessions is not None else set[int]()
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 15.0)):
        deadline, signalled, empty_looks = time.monotonic() + wait, set[int](), 0
        while True:
            pids = set(tagged_pids(tag, ray_nodes=nodes if follow_ray_nodes else None, sessions=led))
            if not pids:
                empty_looks += 1
                if empty_looks == 3:
                    return nodes
                time.sleep(0.5)
                continue
            empty_looks = 0
            for pid in pids - signalled:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            signalled |= pids
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
    return nodes


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM (a job scheduler's or ``kill``'s stop) raises ``SystemExit(143)``.

    Python's default for SIGTERM is to die at once, without running ``finally`` blocks, so a command
    killed that way would leave its SuperLink and the processes it spawned running. As an exception,
    the signal unwinds through the caller's ``finally: stop_tagged(tag)``. Only the main thread can
    install signal handlers; elsewhere the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
