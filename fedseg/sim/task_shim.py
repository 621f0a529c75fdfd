"""``fedseg-clientapp``: what the vehicle's SuperExec starts for every message, kept thin.

Flower's SuperExec starts one process per message. This one imports no torch and no Flower: it hands
the task (the SuperNode's Runtime API address and the task's token) to the vehicle's long-lived worker
(:func:`fedseg.sim.vehicle_apps.worker_main`, started by ``fedseg-superexec``) and exits with its
status. Where no worker answers (none configured, starting, restarting after a crash, or an app
bundle the owner approved, which only ever runs in a process of its own), it runs the task itself,
as before: :func:`fedseg.sim.vehicle_apps.clientapp_main`. A worker that dies during a task loses that
task (the SuperNode replies an error when its token expires); the next one starts a new worker.

``fedseg-clientapp --serve SOCKET`` is the worker itself.
"""

from __future__ import annotations

import time

LAUNCHED_AT = time.time()  # before any other import: what the launch costs is measured from here

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fedseg.deploy.worker_link import WORKER_SOCKET_ENV, WorkerLost, WorkerUnavailable, send_task


def _task_args(argv: Sequence[str]) -> argparse.Namespace:
    """The arguments Flower's SuperExec passes (subprocess executor), read without importing Flower."""
    parser = argparse.ArgumentParser(prog="fedseg-clientapp", add_help=False)
    parser.add_argument("--runtime-api-address")
    parser.add_argument("--token")
    parser.add_argument("--token-file")
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates")
    args, _ = parser.parse_known_args(list(argv))
    return args


def _token(args: argparse.Namespace) -> str | None:
    if args.token:
        return str(args.token).strip() or None
    if args.token_file and Path(args.token_file).expanduser().is_file():
        return Path(args.token_file).expanduser().read_text(encoding="utf-8").strip() or None
    return None  # --token-stdin and anything unusual: the in-process path, Flower's own parsing


def main(argv: Sequence[str] | None = None) -> None:
    """Hand the task to the vehicle's worker, or run it here when none answers."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve"]:
        from fedseg.sim.vehicle_apps import worker_main

        worker_main(argv[1:])
        return
    args = _task_args(argv)
    socket_path, token = os.environ.get(WORKER_SOCKET_ENV), _token(args)
    if socket_path and token and args.runtime_api_address:
        request = {"address": args.runtime_api_address, "token": token, "insecure": bool(args.insecure),
                   "root_certificates": args.root_certificates, "launched_at": LAUNCHED_AT}
        try:
            reply = send_task(socket_path, request)
        except WorkerUnavailable as err:
            print(f"fedseg-clientapp: no vehicle worker ({err}): running this task in its own process",
                  file=sys.stderr, flush=True)
        except WorkerLost as err:
            print(f"fedseg-clientapp: {err}; the SuperNode reports the task failed, and the next task "
                  "meets a restarted worker", file=sys.stderr, flush=True)
            sys.exit(1)
        else:
            code = int(reply.get("exit", 1))
            sys.exit(0 if 0 <= code < 100 else 1)  # as flwr_exit: codes 0-99 are success
    from fedseg.sim.vehicle_apps import clientapp_main

    clientapp_main(argv, launched_at=LAUNCHED_AT)


if __name__ == "__main__":
    main()
