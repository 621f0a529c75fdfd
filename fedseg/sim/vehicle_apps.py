"""The vehicle's SuperExec (``fedseg-superexec``) and the launcher it starts for every task (``fedseg-clientapp``).

Flower's SuperNode turns each message into a task; a SuperExec acquires it and starts a process by
name (``flwr-clientapp --token ...``, ``flwr-agentapp`` for an agent run) which pulls the message,
the run and its app bundle, unpacks the bundle, puts it first on ``sys.path`` and imports its code.
``fedseg-superexec`` is Flower's SuperExec with one change: every task type starts this environment's
``fedseg-clientapp`` (an absolute path, so no ``PATH`` can redirect it). The launcher pulls the task
like ``flwr-clientapp`` and, before any shipped code is imported, asks the vehicle's
:class:`~fedseg.deploy.approval.AppPolicy`: run the installed fedseg, run the approved bundle, or
refuse in one logged line and reply an error, so the server's round sees the vehicle refused.

``fedseg-vehicle`` starts ``fedseg-superexec`` beside the SuperNode (``--isolation process``); to keep
the ClientApp from the node's private key, run it as another user instead (docs/GUIDE.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.args import add_args_flwr_app_common, try_obtain_flwr_app_token
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore import log
from flwr.supercore.constant import TaskType
from flwr.supercore.exit import ExitCode, flwr_exit, register_signal_handlers
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.superexec.executor import subprocess_executor
from flwr.supercore.telemetry import EventType
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedseg.deploy.approval import INSTALLED_APP, POLICY_ENV, AppPolicy

LAUNCHER = "fedseg-clientapp"


def launcher_path() -> str:
    """``fedseg-clientapp`` of this environment (beside the running Python), else the one on PATH."""
    beside = Path(sys.executable).with_name(LAUNCHER)
    found = str(beside) if beside.exists() else shutil.which(LAUNCHER)
    if not found:
        raise FileNotFoundError(f"{LAUNCHER} not found; reinstall fedseg in this environment")
    return found


def route_tasks_to(command: str) -> None:
    """Flower's subprocess executor starts ``command`` for every task type (its table of commands by task
    type is the one hook it has; ``--plugin-type`` is ignored in Flower 1.42)."""
    for task_type in TaskType:
        subprocess_executor.TASK_TYPE_TO_COMMAND[task_type] = command


def superexec_main(argv: Sequence[str] | None = None) -> None:
    """``fedseg-superexec``: Flower's SuperExec for a vehicle, starting only fedseg's launcher."""
    parser = argparse.ArgumentParser(
        prog="fedseg-superexec", description=superexec_main.__doc__,
        epilog="Other arguments go to flower-superexec (e.g. --runtime-api-address 127.0.0.1:9094 --insecure).")
    parser.add_argument("--allow-app", action="append", default=[], metavar="SHA256",
                        help="run app bundles with this sha256 (repeat); none: run the installed fedseg")
    parser.add_argument("--allow-apps", action="append", default=[], type=Path, metavar="FILE",
                        help="file of approved bundle hashes, one a line (# comments)")
    args, flower_args = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if any(a == "--executor" or a.startswith("--executor=") for a in flower_args):
            raise ValueError("--executor: fedseg-superexec starts tasks as local processes only")
        if any(a.startswith("--allow-runtime-dependency") for a in flower_args):
            raise ValueError("--allow-runtime-dependency-installation: a vehicle installs nothing a run names")
        policy = AppPolicy.from_args(args.allow_app, args.allow_apps)
        command = launcher_path()
    except (ValueError, FileNotFoundError) as err:
        print(f"fedseg-superexec: error: {err}", file=sys.stderr)
        sys.exit(2)
    os.environ[POLICY_ENV] = policy.to_env()  # inherited by every launcher this SuperExec starts
    route_tasks_to(command)
    print(f"fedseg-superexec: this vehicle {policy.describe()}", flush=True)
    from flwr.supercore.cli.flower_superexec import flower_superexec

    sys.argv = ["flower-superexec", *flower_args]
    flower_superexec()


def clientapp_main() -> None:
    """``fedseg-clientapp``: one task, run only as the vehicle's policy allows (started by fedseg-superexec)."""
    parser = argparse.ArgumentParser(prog=LAUNCHER, description=clientapp_main.__doc__)
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API")
    add_args_flwr_app_common(parser)
    args = parser.parse_args()
    policy = AppPolicy.from_env(os.environ)
    run_task(args.runtime_api_address, try_obtain_flwr_app_token(args), policy, insecure=args.insecure,
             certificates=validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
             parent_pid=args.parent_pid)


def run_task(address: str, token: str, policy: AppPolicy, *, insecure: bool, certificates: bytes | None,
             parent_pid: int | None) -> None:
    """Flower's ``run_clientapp`` with the vehicle's policy asked before any shipped code is imported."""
    if parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(parent_pid)
    retry = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=certificates, retry_invoker=retry,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)])
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    outcome: dict[str, Any] = {"context": None, "status": SubStatus.FAILED, "details": "ClientApp task failed"}

    def on_exit() -> None:  # as Flower's: final status and context, then stop
        retry.max_tries = 1
        push_task_output(client=client, context=outcome["context"], sub_status=outcome["status"],
                         details=outcome["details"])
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()

    register_signal_handlers(event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE, exit_message="Task stopped.", exit_handlers=[on_exit])
    exit_code, reply, message, context = ExitCode.SUCCESS, None, None, None
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        outcome["context"] = context
        # The task's type as the SuperNode chose it: an agent app's for an agent run, else a ClientApp's.
        task_type = TaskType.AGENT_APP if run.primary_task_type == TaskType.AGENT_APP else TaskType.CLIENT_APP
        if reason := policy.refusal(task_type=task_type, claimed_hash=fab.hash_str, content=fab.content):
            log(ERROR, "fedseg-clientapp: run %s: %s", run.run_id, reason)
            outcome["details"] = reason
            reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=f"vehicle {reason}"), reply_to=message)
        else:
            reply = _approved_app(policy, run, fab)(message=message, context=context)
            outcome["status"], outcome["details"] = SubStatus.COMPLETED, ""
    except Exception as ex:  # noqa: BLE001 - as Flower's flwr-clientapp: the error goes back as the reply
        log(ERROR, "ClientApp raised an exception", exc_info=ex)
        outcome["details"] = f"{type(ex)}:<'{ex}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=outcome["details"]),
                            reply_to=message)
        exit_code = ExitCode.TASK_PROC_EXCEPTION
    finally:
        if reply is not None and context is not None:
            try:
                push_message(client, reply, context)
            except Exception as ex:  # noqa: BLE001
                log(ERROR, "Failed to push reply message", exc_info=ex)
                exit_code = ExitCode.CLIENTAPP_COMMUNICATION_ERROR
    flwr_exit(code=exit_code, event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE)


def _approved_app(policy: AppPolicy, run: Run, fab: Fab) -> ClientApp:
    """The ClientApp to run: the installed one, or (allowlisted) the bundle's, loaded as Flower loads it."""
    if policy.installed_only:
        log(INFO, "fedseg-clientapp: run %s: app bundle %s: running this vehicle's installed %s, not the "
            "bundle's code", run.run_id, fab.hash_str, INSTALLED_APP)
        from fedseg.clients.client_app import app  # here, not above: an approved bundle brings its own

        return app
    log(INFO, "fedseg-clientapp: run %s: app bundle %s is approved: running its code", run.run_id, fab.hash_str)
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn

    install_from_fab(fab.content, skip_prompt=True)
    # The launcher itself is installed fedseg: forget it, so the bundle's own fedseg (first on sys.path
    # once loaded) is what its ClientApp imports, as under flwr-clientapp.
    for name in [m for m in sys.modules if m == "fedseg" or m.startswith("fedseg.")]:
        del sys.modules[name]
    load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    return load(run.fab_id, run.fab_version, fab.hash_str)
