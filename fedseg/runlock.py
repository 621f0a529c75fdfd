"""One writer per run directory: an advisory lock on ``<run dir>/run.lock``, held by the live run.

``fedseg-sim`` takes it before it writes anything of its own (a new run, or ``resume=DIR``), and a
deployed ServerApp holds it on its output directory for its lifetime; a second command on a locked
directory stops with one line naming the live run's pid. The lock is ``flock(2)``: the kernel drops
it when its holder dies, however it died, so a lock left by a killed run is taken over (the file
still names the dead holder, which is logged). The descriptor is opened close-on-exec, so no child
process inherits it: a survivor of a dead run cannot keep its directory locked.

In simulation the ServerApp runs in a process Flower starts for ``fedseg-sim`` (through its
SuperLink and SuperExec), which cannot be handed the descriptor, so it joins instead: ``fedseg-sim``
takes the lock exclusively, then shares it (:meth:`RunDirLock.share`: a shared ``flock`` and a token
in the environment, ``FEDSEG_RUN_LOCK``), and the ServerApp whose token matches the file's holds it
shared too (:meth:`RunDirLock.join`). A newcomer needs it exclusively, which it cannot get while
either holds it: a ServerApp orphaned by a killed ``fedseg-sim`` keeps the directory locked until it
is stopped as well (``fedseg/deploy/watchdog.py``).

Hydra writes its own files (``.hydra/``, the job log) before any fedseg code runs, so a new run
started with the ``hydra.run.dir`` of a live one is refused only after Hydra wrote there.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Self

from fedseg.deploy.processes import running
from fedseg.errors import RunFailed

LOCK_FILE = "run.lock"
JOIN = "FEDSEG_RUN_LOCK"  # the environment entry a ServerApp started for a locked run joins it with
log = logging.getLogger("fedseg")


class RunDirLocked(RunFailed):
    """Another live process holds the run directory; ``str(e)`` is one line naming its pid."""


def _holders(fd: int) -> list[tuple[int, str]]:
    """``(pid, token)`` of each line of the lock file (an owner's line, then joiners')."""
    text = os.pread(fd, 4096, 0).decode(errors="replace")
    pairs = []
    for line in text.splitlines():
        pid, _, token = line.partition(" ")
        if pid.isdigit():
            pairs.append((int(pid), token.strip()))
    return pairs


def _refusal(path: Path, fd: int) -> RunDirLocked:
    """The one line a newcomer gets: the directory, the live holders' pids, what to do."""
    deadline = time.monotonic() + 1.0
    while not (holders := _holders(fd)) and time.monotonic() < deadline:  # the holder is writing its pid
        time.sleep(0.05)
    live = [pid for pid, _ in holders if running(pid)] or [pid for pid, _ in holders]
    who = f"pid {', '.join(map(str, dict.fromkeys(live)))}" if live else "a process that recorded no pid"
    return RunDirLocked(f"{path.parent} is in use by a live run ({who}, lock {path.name}): wait for it to end "
                        "or stop it, or choose another directory")


class RunDirLock:
    """The held lock of one run directory; release it with ``with`` or :meth:`release`."""

    def __init__(self, path: Path, fd: int, token: str, *, owner: bool) -> None:
        self.path, self.fd, self.token, self.owner = path, fd, token, owner

    @classmethod
    def _open(cls, run_dir: Path) -> tuple[Path, int]:
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_FILE
        return path, os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    @classmethod
    def acquire(cls, run_dir: Path) -> RunDirLock:
        """Hold ``run_dir`` exclusively; :class:`RunDirLocked` naming the holder's pid if a live process holds it."""
        path, fd = cls._open(run_dir)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            refusal = _refusal(path, fd)
            os.close(fd)
            raise refusal from None
        stale = [pid for pid, _ in _holders(fd)]  # a holder that released cleanly left the file empty
        if stale:
            log.warning(f"fedseg: {run_dir}: taking over the lock left by pid {', '.join(map(str, stale))} "
                        "(no longer running)")
        token = uuid.uuid4().hex
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {token}\n".encode(), 0)
        return cls(path, fd, token, owner=True)

    @classmethod
    def join(cls, run_dir: Path, token: str | None) -> RunDirLock:
        """The lock of the process started for a locked run: shared with its starter when ``token``
        (its ``FEDSEG_RUN_LOCK``) is the lock's, else :meth:`acquire`'s (a deployed ServerApp)."""
        if token:
            path, fd = cls._open(run_dir)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # a newcomer holds it exclusively: the starter is gone
                refusal = _refusal(path, fd)
                os.close(fd)
                raise refusal from None
            holders = _holders(fd)
            if holders and holders[0][1] == token:
                os.pwrite(fd, f"{os.getpid()} {token}\n".encode(), os.fstat(fd).st_size)
                return cls(path, fd, token, owner=False)
            os.close(fd)
        return cls.acquire(run_dir)

    def share(self) -> None:
        """Let the processes this one starts hold the lock too (:meth:`join`).

        The token goes into this process's environment, which every process it starts inherits
        (through Flower's SuperLink and SuperExec to the ServerApp, as the process tag does). The lock
        goes from exclusive to shared; if a newcomer slips in between (``flock`` converts in two
        steps), this run stops here, before it started anything."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _refusal(self.path, self.fd) from None
        os.environ[JOIN] = self.token

    def release(self) -> None:
        """Unlock. The owner first empties the file, so the next holder knows it was released, not left,
        unless a process it started still holds it shared (that one's pid stays for a newcomer to read)."""
        if self.fd < 0:
            return
        if self.owner:
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
                 ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunDirLock({str(self.path)!r}, owner={self.owner})"
