"""The local link between a vehicle's per-message launcher and its long-lived worker (standard library only).

Flower 1.42's SuperExec starts a process for every message (``fedseg-clientapp``); importing torch, smp
and Flower and building the vehicle costs seconds each time. The vehicle's worker is one process that
keeps them: the launcher hands it the task (the SuperNode's Runtime API address and the task's token)
over a Unix socket and waits for its exit code. The socket lives in a folder only the vehicle's app
user can open (mode 0700, made by ``fedseg-superexec``), and the worker also refuses a peer of another
user (``SO_PEERCRED``). One JSON line each way; nothing here imports more than the standard library, so
the launcher stays a thin process (docs/ARCHITECTURE.md "The vehicle's processes").
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

WORKER_SOCKET_ENV = "FEDSEG_WORKER_SOCKET"  # set by fedseg-superexec for the launchers it starts
CONNECT_TIMEOUT_S = 2.0


TASK_LINE = "fedseg-task "  # a task's record in the vehicle's log: this prefix, then one JSON object


def task_line(record: dict[str, Any]) -> str:
    """A task's record as its log line. Written with one ``write`` (:func:`print` writes the line and its
    newline apart, unbuffered as the vehicle's processes are, so another process's output could land
    between them): every process of a vehicle shares its log."""
    return f"{TASK_LINE}{json.dumps(record)}\n"


def task_records(log: str) -> list[dict[str, Any]]:
    """Every task record in a vehicle's log, in order (text around one on its line, and anything that is
    not a record, skipped)."""
    decoder = json.JSONDecoder()
    records = []
    for line in log.splitlines():
        if TASK_LINE not in line:
            continue
        try:
            record, _ = decoder.raw_decode(line.split(TASK_LINE, 1)[1])
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class WorkerUnavailable(OSError):
    """No worker answers on the socket (not started, restarting, or gone): run the task in-process."""


class WorkerLost(OSError):
    """The worker took the task and ended before answering (killed, crashed): the task is lost."""


def send_task(path: str | Path, request: dict[str, Any]) -> dict[str, Any]:
    """Hand one task to the worker at ``path`` and wait for its answer (as long as the task takes)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as err:
            raise WorkerUnavailable(f"{path}: {err.strerror or err}") from None
        sock.settimeout(None)  # training takes what it takes; the worker's end closes the socket
        with sock.makefile("rb") as stream:
            line = stream.readline()
        if not line:
            raise WorkerLost(f"{path}: the worker ended during the task")
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise WorkerLost(f"{path}: unreadable answer {line[:80]!r}")
        return reply
    finally:
        sock.close()


def listen(path: str | Path) -> socket.socket:
    """A listening socket at ``path`` (a stale one from a dead worker is replaced), owner-only."""
    path = Path(path)
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chmod(path, 0o600)
    server.listen(8)
    return server


def peer_uid(conn: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket (Linux ``SO_PEERCRED``)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def requests(server: socket.socket, *, log: Callable[[str], None]) -> Iterator[tuple[dict[str, Any],
                                                                                     Callable[[dict[str, Any]], None]]]:
    """The tasks handed to ``server``, one at a time (a SuperNode runs one message at a time), each with
    the function that answers it. A peer of another user, or a line that is not a task, is logged and
    dropped."""
    while True:
        conn, _ = server.accept()
        with conn:
            if (uid := peer_uid(conn)) != os.getuid():
                log(f"refused a connection from user {uid}: the worker serves only its own user")
                continue
            with conn.makefile("rb") as stream:
                line = stream.readline()
            try:
                request = json.loads(line)
                if not isinstance(request, dict) or not request.get("token"):
                    raise ValueError("no token")
            except ValueError as err:
                log(f"dropped an unreadable task request ({err})")
                continue

            def answer(reply: dict[str, Any], conn: socket.socket = conn) -> None:
                try:
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:  # the launcher is gone (its SuperExec stopped); the task is done anyway
                    pass

            yield request, answer
