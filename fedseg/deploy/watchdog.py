"""The processes a command starts die with it, however it ends: a watchdog that outlives only the command.

A command's ``finally`` stops what it started (``stop_tagged``), and SIGTERM and Ctrl-C reach that
``finally``; SIGKILL (the OOM killer, a scheduler's hard kill) and an unhandled SIGHUP (a closed
terminal) do not. Flower runs its SuperLink's SuperExec and the simulation in sessions of their own,
and Ray its raylet, gcs_server and workers below those, so killing the command's process group
leaves them all training and writing the run directory.

Why a watchdog and not ``PR_SET_PDEATHSIG`` or Flower's ``--parent-pid``: the death signal reaches
only the direct child (the SuperLink, whose own children would stay), and fires when the *thread*
that started it ends; ``--parent-pid`` is taken by some of Flower's processes and by none of Ray's.
Every one of them carries the command's tag, though (``fedseg/deploy/processes.py``), so all that was
missing is a process that calls ``stop_tagged(tag)`` when the command cannot.

:class:`Watchdog` starts ``python -m fedseg.deploy.watchdog TAG [PATH...]`` before anything else, in a
session of its own (a kill of the command's group misses it), untagged (``stop_tagged`` misses it),
its stdin the read end of a pipe whose write end only the command holds: the descriptor is
close-on-exec and ``subprocess`` closes the rest, so no other child keeps it open. When the command
dies, whatever killed it, the kernel closes that end; the watchdog's read returns, with no polling
and no pid that could be reused, and it stops the tagged processes and removes ``PATH``\\ s (the
run's temporary Flower home). A command that ends normally has done both itself and says ``done``
(:meth:`Watchdog.stand_down`); the watchdog then only looks a few more times (:data:`LAST_LOOKS`) for a
tagged straggler (on a loaded machine a Ray agent can appear after the command's own sweep ended) and
stops any it finds, while the command exits without waiting for it. Before its sweep the command names
its Ray nodes and the sessions its processes lead (:meth:`Watchdog.follow`), so a kill in mid-sweep
still leaves the watchdog able to find the agents it had not reached yet.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Self

from fedseg.deploy.processes import TAG, stop_tagged, tagged_pids

DONE = b"done"
LAST_LOOKS = 6  # after "done": looks 0.5 s apart for a tagged straggler


class Watchdog:
    """A watchdog for the processes tagged ``tag`` (and ``remove``, folders it deletes) while this process lives.

    ``follow_ray_nodes=False``: it stops the tagged processes only, never those of a Ray node one of them
    runs on (a command attached to a cluster it did not start; :func:`~fedseg.deploy.processes.stop_tagged`)."""

    def __init__(self, tag: str, *remove: Path, follow_ray_nodes: bool = True) -> None:
        env = {k: v for k, v in os.environ.items() if k != TAG}  # untagged: the command's own stop spares it
        flags = [] if follow_ray_nodes else ["--no-ray-nodes"]
        self.proc = subprocess.Popen([sys.executable, "-m", "fedseg.deploy.watchdog", *flags, tag,
                                      *map(str, remove)], stdin=subprocess.PIPE, env=env, start_new_session=True)

    def follow(self, ray_nodes: set[str], sessions: Iterable[int] = ()) -> None:
        """Tell the watchdog the command's Ray nodes and the sessions its processes lead
        (:func:`~fedseg.deploy.processes.tagged_pids` fills both sets) before the command's own sweep
        begins: Ray agents whose ``/proc`` environment lost the tag are found only through those, and once
        the sweep has stopped the tagged raylet and session leaders a kill of the command in mid-sweep would
        otherwise leave the watchdog no way to find them."""
        self._send(b"".join([*(b"node " + n.encode() + b"\n" for n in sorted(ray_nodes)),
                             *(b"session %d\n" % s for s in sorted(sessions))]))

    def stand_down(self, ray_nodes: set[str] | None = None, sessions: Iterable[int] = ()) -> None:
        """The command stopped its processes itself (``ray_nodes``, ``sessions``: the Ray nodes and sessions
        its sweep met, :func:`~fedseg.deploy.processes.stop_tagged`): the watchdog takes its last looks and
        exits on its own (in its own session: the command does not wait for it)."""
        self.follow(set(), sessions)
        self._send(b" ".join([DONE, *(n.encode() for n in sorted(ray_nodes or ()))]) + b"\n")
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        self.proc.returncode = 0  # not waited for: no ResourceWarning, and no zombie once this command exits

    def _send(self, lines: bytes) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError, ValueError):  # a watchdog gone, or its pipe closed: nothing to tell
            self.proc.stdin.write(lines)
            self.proc.stdin.flush()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
                 ) -> None:
        """Without :meth:`stand_down` (the command's own cleanup was cut short), closing the pipe sets the
        watchdog to work, as the command's death would."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


def watch(tag: str, remove: list[str], *, follow_ray_nodes: bool = True) -> None:
    """Wait for the command's end; unless it said ``done``, stop what it started (with the Ray nodes it
    named and the sessions its processes lead: :meth:`Watchdog.follow`) and remove ``remove``. Each line the
    command writes is ``node ID``, ``session SID`` or, last, ``done [ID ...]``; the pipe's end (the
    command's, however it died) ends the wait."""
    nodes: set[str] | None = set() if follow_ray_nodes else None
    sessions: set[int] = set()
    for line in sys.stdin.buffer:
        words = [w.decode() for w in line.split()]
        if words[:1] == ["node"] and nodes is not None:
            nodes.update(words[1:])
        elif words[:1] == ["session"]:
            sessions.update(int(w) for w in words[1:] if w.isdigit())
        elif words[:1] == [DONE.decode()]:
            if nodes is not None:
                nodes.update(words[1:])
            for _ in range(LAST_LOOKS):
                if tagged_pids(tag, ray_nodes=nodes, sessions=sessions):
                    stop_tagged(tag, ray_nodes=nodes, sessions=sessions, follow_ray_nodes=follow_ray_nodes)
                time.sleep(0.5)
            return
    stop_tagged(tag, ray_nodes=nodes, sessions=sessions, follow_ray_nodes=follow_ray_nodes)
    for path in remove:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedseg.deploy.watchdog", description=__doc__.splitlines()[0])
    parser.add_argument("tag", help="the command's process tag (FEDSEG_PROCESS_TAG)")
    parser.add_argument("remove", nargs="*", help="folders to delete after stopping")
    parser.add_argument("--no-ray-nodes", dest="follow_ray_nodes", action="store_false",
                        help="stop the tagged processes only, not the Ray nodes they run on (an attached cluster)")
    args = parser.parse_args(argv)
    watch(args.tag, args.remove, follow_ray_nodes=args.follow_ray_nodes)


if __name__ == "__main__":
    main()
