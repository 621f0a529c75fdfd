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
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
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
from flwr.supernode.runtime import run_clientapp
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from fedseg.deploy.approval import INSTALLED_APP, POLICY_ENV, AppPolicy
from fedseg.deploy.worker_link import WORKER_SOCKET_ENV, listen, requests, task_line

LAUNCHER = "fedseg-clientapp"
TASK_POLL_S = 0.1  # FLWR_SUPEREXEC_TASK_POLL_INTERVAL unless set: the SuperExec asks its own SuperNode


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
    parser.add_argument("--no-worker", action="store_true",
                        help="no long-lived worker: every message runs in a process of its own (Flower's model)")
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
    # Flower's documented SuperExec poll (1 s by default): it asks its own SuperNode, on this box.
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(TASK_POLL_S))
    route_tasks_to(command)
    print(f"fedseg-superexec: this vehicle {policy.describe()}", flush=True)
    if policy.installed_only and not args.no_worker:
        os.environ[WORKER_SOCKET_ENV] = start_worker(command)
        print("fedseg-superexec: a long-lived worker runs the installed fedseg's tasks", flush=True)
    from flwr.supercore.cli.flower_superexec import flower_superexec

    sys.argv = ["flower-superexec", *flower_args]
    flower_superexec()


class FleetPolls:
    """The waits of Flower 1.42's SuperNode main loop (``flwr/supernode/start_client_internal.py``), which
    has no setting for them: it sleeps 3 s whenever the SuperLink has no message for it, and 0.5 s between
    looks for its ClientApp's reply. Every message of a round waits for the first (a SecAgg+ round sends
    four), a whole simulated round on the loopback benchmark.

    ``fedseg-supernode`` keeps Flower's 3 s for a vehicle that is idle, and asks every ``active_s`` while
    a message came less than ``window_s`` ago (the next one of a round comes soon: the next SecAgg+ stage,
    the next round); a reply is looked for every ``active_s`` as well (that look is local). An idle fleet
    thus costs the SuperLink what it costs under Flower's default; a vehicle in a round asks ~10 times a
    second.
    """

    IDLE_S = 3.0  # Flower's own idle wait, the literal these stand in for
    REPLY_S = 0.5  # Flower's own wait between looks for the ClientApp's reply

    def __init__(self, active_s: float, window_s: float) -> None:
        self.active_s, self.window_s = active_s, window_s
        self.last_message = -float("inf")

    def sleep(self, seconds: float) -> None:
        """``time.sleep`` as the SuperNode's loop calls it."""
        if seconds == self.IDLE_S and time.monotonic() - self.last_message > self.window_s:
            time.sleep(seconds)
        else:
            time.sleep(min(seconds, self.active_s))

    def __getattr__(self, name: str) -> Any:  # everything else of the time module, unchanged
        return getattr(time, name)

    def install(self) -> None:
        """Take over the SuperNode loop's ``time`` and note each message it receives."""
        from flwr.supernode import start_client_internal as node

        pull = node._pull_and_store_message

        def noted_pull(*args: Any, **kwargs: Any) -> Any:
            run_id = pull(*args, **kwargs)
            if run_id is not None:
                self.last_message = time.monotonic()
            return run_id

        node.time = self  # type: ignore[assignment]
        node._pull_and_store_message = noted_pull


def supernode_main(argv: Sequence[str] | None = None) -> None:
    """``fedseg-supernode``: Flower's ``flower-supernode`` with a vehicle's shorter waits during a round
    (:class:`FleetPolls`); every other argument is flower-supernode's."""
    parser = argparse.ArgumentParser(
        prog="fedseg-supernode", description="Flower's flower-supernode, asking for messages more often during a "
        "round (fedseg-vehicle starts it).", epilog="Other arguments go to flower-supernode.")
    parser.add_argument("--poll-interval", type=float, default=0.1, metavar="S",
                        help="seconds between asks for a message during a round (default 0.1; Flower: 3)")
    parser.add_argument("--active-window", type=float, default=60.0, metavar="S",
                        help="a round is on for S seconds after the last message (default 60); then Flower's 3 s")
    args, flower_args = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if not 0.01 <= args.poll_interval <= FleetPolls.IDLE_S:
        parser.error(f"--poll-interval {args.poll_interval:g}: valid: 0.01 to {FleetPolls.IDLE_S:g} seconds")
    if args.active_window < 0:
        parser.error(f"--active-window {args.active_window:g}: valid: 0 or more seconds")
    FleetPolls(args.poll_interval, args.active_window).install()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


PULL_BACKOFF_S = (0.05, 0.5)  # first retry, cap: for objects the SuperNode is still fetching (Flower: 1 s, 10 s)


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab]:
    """Flower's ``run_clientapp.pull_task_input``, retrying objects sooner.

    The SuperNode hands out a task before it has fetched the message's objects from the SuperLink, and
    Flower's pull retries an object it does not have yet after 1 s, doubling to 10 s
    (``PULL_INITIAL_BACKOFF``, ``PULL_BACKOFF_CAP``; no setting). A task started at once, as the worker
    starts it, thus waited up to ~15 s on a UNet-ResNet34 message that arrives in a second or two. The
    SuperNode is on this box: retrying every 0.05 s (doubling to 0.5 s) costs it nothing.
    """
    pull = run_clientapp.pull_and_inflate_object_from_tree
    run_clientapp.pull_and_inflate_object_from_tree = functools.partial(
        pull, initial_backoff=PULL_BACKOFF_S[0], backoff_cap=PULL_BACKOFF_S[1])
    try:
        return run_clientapp.pull_task_input(client)
    finally:
        run_clientapp.pull_and_inflate_object_from_tree = pull


def start_worker(launcher: str) -> str:
    """Start the vehicle's worker (``fedseg-clientapp --serve``) and keep it running: a worker that ends
    is started again (after 1 s, doubling to 60 s while it keeps failing), and it ends with this process
    (``--parent-pid``). Returns its socket, in a new folder only this user can open."""
    folder = Path(tempfile.mkdtemp(prefix="fedseg-worker-"))  # mode 0700
    socket_path = str(folder / "worker.sock")
    cmd = [launcher, "--serve", "--socket", socket_path, "--parent-pid", str(os.getpid())]

    def supervise() -> None:
        pause = 1.0
        while True:
            started = time.monotonic()
            code = subprocess.Popen(cmd).wait()
            pause = 1.0 if time.monotonic() - started > 60 else min(pause * 2, 60.0)
            log(WARNING, "fedseg-superexec: the vehicle's worker ended (status %s); starting it again in %.0f s "
                "(tasks meanwhile run in processes of their own)", code, pause)
            time.sleep(pause)

    threading.Thread(target=supervise, name="fedseg-worker", daemon=True).start()
    return socket_path


def worker_main(argv: Sequence[str] | None = None) -> None:
    """``fedseg-clientapp --serve --socket PATH``: the vehicle's long-lived worker.

    It holds torch, the installed ClientApp and, per run, the vehicle (its frames, its DP-SGD trainer and
    accountant: :data:`fedseg.clients.client_app.worker_app`) and runs the tasks the launchers hand it,
    one at a time, exactly as a launcher would run them itself (:class:`Task`): the message, the
    context (``context.state``: the accountant, SecAgg+'s round state, codec residuals, FedBN) and the
    reply all pass through the SuperNode as before, so a restarted worker continues from what its
    SuperNode and the privacy ledger hold, never from less.
    """
    parser = argparse.ArgumentParser(prog=f"{LAUNCHER} --serve", description=worker_main.__doc__)
    parser.add_argument("--socket", required=True, help="the Unix socket to serve (fedseg-superexec makes it)")
    parser.add_argument("--parent-pid", type=int, help="end when this process (the SuperExec) ends")
    args = parser.parse_args(argv)
    policy = AppPolicy.from_env(os.environ)
    if not policy.installed_only:
        parser.error("the worker runs the installed fedseg only; approved app bundles run one process a task")
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    server = listen(args.socket)  # first: a task handed over during the imports below waits for them
    from fedseg.clients.client_app import worker_app

    log(INFO, "fedseg-clientapp: worker %s serving %s", os.getpid(), args.socket)
    for request, answer in requests(server, log=lambda line: log(WARNING, "fedseg-clientapp: worker: %s", line)):
        task = Task(str(request["address"]), str(request["token"]), insecure=bool(request.get("insecure")),
                    certificates=validate_and_resolve_root_certificates(request.get("root_certificates"),
                                                                        bool(request.get("insecure"))),
                    where="worker", launched_at=request.get("launched_at"))
        try:
            code = task.run(policy, installed=worker_app)
        finally:
            task.finish()
        answer({"exit": code})


def clientapp_main(argv: Sequence[str] | None = None, *, launched_at: float | None = None) -> None:
    """``fedseg-clientapp``'s own path for one task: run in this process, as the vehicle's policy allows
    (:mod:`fedseg.sim.task_shim` takes it when the vehicle's worker cannot)."""
    parser = argparse.ArgumentParser(prog=LAUNCHER, description=clientapp_main.__doc__)
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API")
    add_args_flwr_app_common(parser)
    args = parser.parse_args(argv)
    policy = AppPolicy.from_env(os.environ)
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    task = Task(args.runtime_api_address, try_obtain_flwr_app_token(args), insecure=args.insecure,
                certificates=validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
                where="process", launched_at=launched_at)
    register_signal_handlers(event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE, exit_message="Task stopped.",
                             exit_handlers=[task.finish])
    flwr_exit(code=task.run(policy), event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE)


class Task:
    """One task of the SuperNode, as Flower's ``run_clientapp`` runs it, with the vehicle's policy asked
    before any shipped code is imported: pull the message, run the app, push the reply, then (``finish``)
    the task's final status. Run by ``fedseg-clientapp`` in a process of its own, or by the vehicle's
    worker (:func:`worker_main`), which keeps the installed ClientApp's vehicles between tasks."""

    def __init__(self, address: str, token: str, *, insecure: bool, certificates: bytes | None, where: str,
                 launched_at: float | None = None) -> None:
        self.retry = make_simple_http_retry_invoker()
        self.client = RuntimeHttpClient.from_server_address(
            server_address=address, insecure=insecure, root_certificates=certificates, retry_invoker=self.retry,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)])
        self.heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(self.client))
        self.outcome: dict[str, Any] = {"context": None, "status": SubStatus.FAILED,
                                        "details": "ClientApp task failed"}
        self.where, self.launched_at, self.finished = where, launched_at, False

    def finish(self) -> None:
        """As Flower's exit handler: the task's final status and context, then stop (once)."""
        if self.finished:
            return
        self.finished = True
        self.retry.max_tries = 1
        push_task_output(client=self.client, context=self.outcome["context"], sub_status=self.outcome["status"],
                         details=self.outcome["details"])
        if self.heartbeat.is_running:
            self.heartbeat.stop()
        self.client.close()

    def run(self, policy: AppPolicy, installed: ClientApp | None = None) -> int:
        """Pull, run and reply; the exit code Flower's ``flwr-clientapp`` would end with. ``installed``: the
        ClientApp to run for the installed fedseg (default: :data:`INSTALLED_APP`)."""
        started = time.time()
        exit_code, reply, message, context = ExitCode.SUCCESS, None, None, None
        timing: dict[str, Any] = {}
        try:
            self.heartbeat.start()
            message, context, run, fab = pull_task_input(self.client)
            self.outcome["context"] = context
            timing["pull_s"] = time.time() - started
            # The task's type as the SuperNode chose it: an agent app's for an agent run, else a ClientApp's.
            task_type = TaskType.AGENT_APP if run.primary_task_type == TaskType.AGENT_APP else TaskType.CLIENT_APP
            if reason := policy.refusal(task_type=task_type, claimed_hash=fab.hash_str, content=fab.content):
                log(ERROR, "fedseg-clientapp: run %s: %s", run.run_id, reason)
                self.outcome["details"] = reason
                reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=f"vehicle {reason}"), reply_to=message)
            else:
                app = _approved_app(policy, run, fab, installed)
                app_started = time.time()
                reply = app(message=message, context=context)
                timing["app_s"] = time.time() - app_started
                self.outcome["status"], self.outcome["details"] = SubStatus.COMPLETED, ""
        except Exception as ex:  # noqa: BLE001 - as Flower's flwr-clientapp: the error goes back as the reply
            log(ERROR, "ClientApp raised an exception", exc_info=ex)
            self.outcome["details"] = f"{type(ex)}:<'{ex}'>"
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=self.outcome["details"]),
                                reply_to=message)
            exit_code = ExitCode.TASK_PROC_EXCEPTION
        finally:
            if reply is not None and context is not None:
                pushed = time.time()
                try:
                    push_message(self.client, reply, context)
                except Exception as ex:  # noqa: BLE001
                    log(ERROR, "Failed to push reply message", exc_info=ex)
                    exit_code = ExitCode.CLIENTAPP_COMMUNICATION_ERROR
                timing["push_s"] = time.time() - pushed
        self._report(message, timing, started)
        return int(exit_code)

    def _report(self, message: Message | None, timing: dict[str, Any], started: float) -> None:
        """One ``fedseg-task {json}`` line on stdout (the vehicle's log): where the task ran and what it cost
        (``launch_s``: from fedseg-clientapp's start to this task's start, the process start and imports when
        it runs in its own process; docs/PERFORMANCE.md "Deployed round vs simulated round")."""
        now = time.time()
        row = {"where": self.where, "type": message.metadata.message_type if message is not None else None,
               "launch_s": None if self.launched_at is None else round(started - self.launched_at, 4),
               **{k: round(v, 4) for k, v in timing.items()},
               "total_s": round(now - (self.launched_at if self.launched_at is not None else started), 4)}
        sys.stdout.write(task_line(row))
        sys.stdout.flush()


def _approved_app(policy: AppPolicy, run: Run, fab: Fab, installed: ClientApp | None = None) -> ClientApp:
    """The ClientApp to run: the installed one (``installed``, the worker's, else :data:`INSTALLED_APP`), or
    (allowlisted) the bundle's, loaded as Flower loads it."""
    if policy.installed_only:
        log(INFO, "fedseg-clientapp: run %s: app bundle %s: running this vehicle's installed %s, not the "
            "bundle's code", run.run_id, fab.hash_str, INSTALLED_APP)
        if installed is not None:
            return installed
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
