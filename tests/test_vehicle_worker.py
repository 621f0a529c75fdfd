"""A vehicle's processes on the Deployment Engine: the thin per-message launcher, its long-lived worker,
the shorter waits of a round (fedseg.sim.task_shim, fedseg.sim.vehicle_apps, fedseg.deploy.worker_link,
fedseg.server.grids.PollingGrid), and, with real processes, a worker killed mid-run."""

from __future__ import annotations

import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from flwr.common import Context, RecordDict

from fedseg.deploy.worker_link import WorkerLost, WorkerUnavailable, listen, requests, send_task, task_records
from fedseg.sim import task_shim, vehicle_apps
from fedseg.sim.vehicle_apps import FleetPolls


def test_the_launcher_flower_starts_per_message_imports_neither_torch_nor_flower() -> None:
    code = ("import sys, fedseg.sim.task_shim; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'flwr', 'numpy', 'grpc'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _serve_once(path: Path, reply: dict[str, Any] | None, seen: list[dict[str, Any]]) -> threading.Thread:
    server = listen(path)

    def run() -> None:
        for request, answer in requests(server, log=print):
            seen.append(request)
            if reply is not None:
                answer(reply)
            break
        server.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_task_reaches_the_worker_and_its_exit_code_comes_back(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []
    thread = _serve_once(tmp_path / "w.sock", {"exit": 0}, seen)

    reply = send_task(tmp_path / "w.sock", {"address": "127.0.0.1:9094", "token": "ab12", "insecure": True})

    thread.join(5)
    assert reply == {"exit": 0} and seen == [{"address": "127.0.0.1:9094", "token": "ab12", "insecure": True}]
    assert oct((tmp_path / "w.sock").stat().st_mode & 0o777) == "0o600"


def test_no_worker_means_run_it_here_and_a_worker_dying_mid_task_loses_it(tmp_path: Path) -> None:
    with pytest.raises(WorkerUnavailable):
        send_task(tmp_path / "nobody.sock", {"token": "ab12"})
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "stale.sock"))  # a dead worker's socket file: nobody listens
    stale.close()
    with pytest.raises(WorkerUnavailable):
        send_task(tmp_path / "stale.sock", {"token": "ab12"})
    thread = _serve_once(tmp_path / "w.sock", None, [])  # takes the task, ends without answering
    with pytest.raises(WorkerLost):
        send_task(tmp_path / "w.sock", {"token": "ab12"})
    thread.join(5)


FLOWER_ARGS = ["--runtime-api-address", "127.0.0.1:9094", "--token", "ab12", "--insecure", "--parent-pid", "1"]


def test_the_launcher_hands_over_or_runs_the_task_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran_here: list[tuple[list[str], float | None]] = []
    monkeypatch.setattr(vehicle_apps, "clientapp_main", lambda argv, launched_at: ran_here.append((argv, launched_at)))
    # No worker configured, or none answering: the task runs in this process, with Flower's arguments.
    monkeypatch.delenv("FEDSEG_WORKER_SOCKET", raising=False)
    task_shim.main(FLOWER_ARGS)
    monkeypatch.setenv("FEDSEG_WORKER_SOCKET", str(tmp_path / "gone.sock"))
    task_shim.main(FLOWER_ARGS)
    assert [argv for argv, _ in ran_here] == [FLOWER_ARGS, FLOWER_ARGS]
    assert all(at == task_shim.LAUNCHED_AT for _, at in ran_here)
    # A worker answers: its status is the launcher's (Flower's codes: 0-99 success, else failure).
    codes = []
    for worker_exit in (0, 104):
        monkeypatch.setenv("FEDSEG_WORKER_SOCKET", str(tmp_path / f"w{worker_exit}.sock"))
        seen: list[dict[str, Any]] = []
        thread = _serve_once(tmp_path / f"w{worker_exit}.sock", {"exit": worker_exit}, seen)
        with pytest.raises(SystemExit) as ended:
            task_shim.main(FLOWER_ARGS)
        thread.join(5)
        codes.append(ended.value.code)
        assert seen[0]["token"] == "ab12" and seen[0]["address"] == "127.0.0.1:9094" and seen[0]["insecure"]
    assert codes == [0, 1] and len(ran_here) == 2


def test_a_round_asks_often_and_an_idle_vehicle_as_flower_does(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    polls = FleetPolls(active_s=0.1, window_s=60)

    polls.sleep(3)  # idle: no message yet
    polls.last_message = time.monotonic()  # a message came (what install()'s pull wrapper notes)
    polls.sleep(3)
    polls.sleep(0.5)  # between looks for the ClientApp's reply
    polls.last_message = time.monotonic() - 61  # the round is long over
    polls.sleep(3)

    assert slept == [3, 0.1, 0.1, 3]
    assert polls.time() == pytest.approx(time.time(), abs=1)  # the rest of the time module, unchanged


def test_flowers_supernode_loop_still_has_the_waits_fleetpolls_replaces() -> None:
    # fedseg-supernode replaces these by name; a Flower upgrade that renames them must fail here.
    from flwr.supernode import start_client_internal as node

    loop = inspect.getsource(node.start_client_internal)
    assert "time.sleep(3)" in loop and "_pull_and_store_message(" in loop
    assert "time.sleep(0.5)" in inspect.getsource(node._push_messages)
    assert node.time is time
    # The worker's prompt object pulls (vehicle_apps.pull_task_input) replace this name for one call.
    from flwr.supernode.runtime import run_clientapp

    assert "pull_and_inflate_object_from_tree(" in inspect.getsource(run_clientapp.pull_task_input)


class SlowGrid:
    """Replies appear on the third look."""

    def __init__(self) -> None:
        self.looks = 0

    def push_messages(self, messages: Any) -> list[str]:
        return [m for m in messages]

    def pull_messages(self, ids: Any) -> list[Any]:
        self.looks += 1
        if self.looks < 3:
            return []
        return [type("Reply", (), {"metadata": type("M", (), {"reply_to_message_id": i})()})() for i in ids]


def test_the_servers_grid_looks_for_replies_every_tenth_of_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedseg.server.grids import PollingGrid

    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    inner = SlowGrid()
    grid = PollingGrid(inner)  # type: ignore[arg-type]

    replies = list(grid.send_and_receive(["a", "b"]))  # type: ignore[list-item]

    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert inner.looks == 3 and slept == [0.1, 0.1]
    inner.looks = -10**6  # never answers: the timeout ends the wait
    monkeypatch.undo()
    assert list(PollingGrid(inner, interval=0.01).send_and_receive(["a"], timeout=0.05)) == []  # type: ignore[list-item]


def test_the_worker_keeps_a_runs_vehicle_and_drops_it_for_the_next_run(tmp_path: Path) -> None:
    from fedseg.clients import client_app

    flat = _flat(tmp_path)

    def context(run_id: int, state: RecordDict) -> Context:
        return Context(run_id=run_id, node_id=7, node_config={"partition-id": 0, "num-partitions": 2},
                       state=state, run_config=dict(flat))

    first_state, second_state = RecordDict(), RecordDict()
    client_app._kept.clear()
    client_app.kept_client_fn(context(1, first_state))
    kept = next(iter(client_app._kept.values()))
    client_app.kept_client_fn(context(1, second_state))

    assert next(iter(client_app._kept.values())) is kept and kept.state is second_state
    client_app.kept_client_fn(context(2, RecordDict()))
    assert len(client_app._kept) == 1 and next(iter(client_app._kept.values())) is not kept
    client_app._kept.clear()


def _flat(tmp_path: Path) -> dict[str, Any]:
    from fedseg.config import to_run_config

    return to_run_config({
        "data": {"root": str(tmp_path / "data"), "image_size": [32, 32], "frames_per_vehicle": 4,
                 "heldout_frames": 2},
        "model": {"name": "tiny"},
        "federation": {"num_clients": 2, "min_fit_clients": 2, "rounds": 3, "batch_size": 2},
        "privacy": {"name": "none"},
        "output_dir": str(tmp_path / "run"),
    })


# ---------------------------------------------------------------- real processes: SuperLink, 2 SuperNodes, flwr run

def _worker_pid(fleet: Any, name: str) -> int:
    from deploy_fleet import _ancestor

    from fedseg.deploy.processes import tagged_pids

    for pid in tagged_pids(fleet.tag):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--serve" in argv and _ancestor(pid, fleet.procs[name].pid):
            return pid
    raise AssertionError(f"no worker process under {name}")


@pytest.mark.deploy
def test_a_killed_worker_is_started_again_and_the_vehicles_epsilon_goes_on(tmp_path: Path) -> None:
    from deploy_fleet import LocalFleet

    from fedseg.deploy.ledger import PrivacyLedger
    from fedseg.dpsgd import epsilon_of

    fleet = LocalFleet(tmp_path, env_extra={"FEDSEG_DATA_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"})
    try:
        (tmp_path / "server").mkdir()
        fleet.start_superlink("--disable-runtime-dependency-installation", cwd=tmp_path / "server")
        for i in range(2):
            fleet.start_vehicle(f"vehicle_{i}", "--partition-id", str(i), "--num-partitions", "2")
        run = fleet.start_run("experiment=smoke privacy=dpsgd federation.num_clients=2 federation.min_fit_clients=1 "
                              "federation.rounds=4 federation.round_timeout=60 deploy.join_timeout=120")
        deadline = time.monotonic() + 300
        while not any(t["where"] == "worker" and t["type"] == "train" for t in task_records(fleet.log("vehicle_0"))):
            assert time.monotonic() < deadline and run.poll() is None, fleet.log("vehicle_0")[-3000:]
            time.sleep(0.2)
        done_before = len(task_records(fleet.log("vehicle_0")))
        os.kill(_worker_pid(fleet, "vehicle_0"), signal.SIGKILL)  # between tasks, or during the next one

        result = fleet.finish_run(run, timeout=420)

        assert result.status == "finished:completed", result.output[-3000:]
        log = fleet.log("vehicle_0")
        assert "the vehicle's worker ended" in log  # fedseg-superexec noticed and started a new one
        after = task_records(log)[done_before:]
        assert after and after[-1]["where"] == "worker"  # the last round ran in the new worker
        rows = [json.loads(line) for line in
                (tmp_path / "server" / "outputs" / "deploy" / str(result.run_id) / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
        # Vehicle 0's epsilon went on from where it was: its accountant (context.state, through the SuperNode)
        # counted every round its ledger holds for this run, less one the kill took mid-task, never fewer.
        ledger = [r for r in PrivacyLedger(tmp_path / "state" / "fedseg" / "ledger-partition-0.json").records()
                  if r["run"] == str(result.run_id)]
        mechanisms = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in ledger]
        lost = 1 if "the worker ended during the task" in log else 0
        final = rows[-1]["client_epsilon"]["0"]
        assert len(ledger) >= 3
        assert final == pytest.approx(epsilon_of(mechanisms[:len(mechanisms) - lost], rows[-1]["delta"]), rel=1e-6)
    finally:
        fleet.stop()


def test_a_messages_arrays_travel_as_one_and_come_back_byte_for_byte() -> None:
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from fedseg.packing import PACKED, pack_content, unpack_content

    content = RecordDict({
        "weights": ArrayRecord({"conv": Array(np.arange(24, dtype=np.float32).reshape(2, 3, 4)),
                                "steps": Array(np.array(7, dtype=np.int64)), "empty": Array(np.zeros(0, np.float16))}),
        "config": ConfigRecord({"lr": 0.1}), "single": ArrayRecord({"x": Array(np.ones(3))})})

    packed = pack_content(content)
    restored = unpack_content(packed)

    assert len(packed["weights"]) == 1 and PACKED in packed.config_records  # one array on the wire
    assert packed["single"] is content["single"]  # a one-array record is left as it is
    assert restored.object_id == content.object_id  # the same arrays, keys, order and bytes
    assert unpack_content(content) is content and pack_content(RecordDict()).object_id == RecordDict().object_id
