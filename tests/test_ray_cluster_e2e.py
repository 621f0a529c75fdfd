"""End-to-end: ``fedseg-sim ray.address=...`` on a real two-node Ray cluster started on this machine.

The cluster is ``ray start --head`` and ``ray start --address`` processes (not ``ray.cluster_utils.Cluster``:
fedseg-sim is a subprocess and must attach to a cluster outside the test process), on loopback, every
port free-picked so that no other Ray on the machine is touched (never ``ray stop``: it stops every Ray of
this user). Each node carries a tag of the test in its environment, which the raylets' workers inherit, so
the ``finally`` stops exactly the test's processes (:func:`~fedseg.deploy.processes.stop_tagged`).

Where vehicles trained is read from ``/proc`` while the run goes on: a Ray worker running a vehicle's
message is titled ``ray::ClientAppActor.run`` and is a child of its node's raylet, whose command line
names the node (``--node_id=``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedseg.deploy.processes import TAG, free_port, new_tag, proc_stat, stop_tagged, tagged_pids

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


@dataclass
class LocalCluster:
    address: str
    tag: str
    raylets: dict[int, str] = field(default_factory=dict)  # pid -> node id


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _raylets(tag: str) -> dict[int, str]:
    found = {}
    for pid in tagged_pids(tag):
        args = _cmdline(pid)
        if args and Path(args[0]).name == "raylet":
            found[pid] = next(a.split("=", 1)[1] for a in args if a.startswith("--node_id="))
    return found


def _start_node(env: dict[str, str], temp: Path, *role: str) -> None:
    """``ray start`` one node; once more if it timed out registering with the GCS (Ray 2.55 waits a fixed
    30 s, which a worker node on the loaded 2 cores of CI once missed), after killing what the failed
    attempt started (the tagged processes that were not there before it)."""
    ports = ["--node-manager-port", "--object-manager-port", "--metrics-export-port", "--runtime-env-agent-port",
             "--dashboard-agent-grpc-port", "--dashboard-agent-listen-port"]
    before = set(tagged_pids(env[TAG]))
    for attempt in (1, 2):
        args = [str(BIN / "ray"), "start", *role, "--num-cpus=1", "--node-ip-address=127.0.0.1",
                f"--temp-dir={temp}", "--disable-usage-stats", *(f"{flag}={free_port()}" for flag in ports)]
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180, check=False)
        output = done.stdout + done.stderr
        if done.returncode == 0 or attempt == 2 or "timed out during startup" not in output:
            break
        for pid in set(tagged_pids(env[TAG])) - before:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(2)
    assert done.returncode == 0, output[-2000:]


@contextmanager
def two_node_cluster() -> Iterator[LocalCluster]:
    """A head and a worker node, one CPU each; stopped afterwards, with a check that none of it is left."""
    tag, port = new_tag(), free_port()
    # Short: Ray's socket paths live under it (a Unix socket path has at most 107 characters).
    temp = Path(tempfile.mkdtemp(prefix="fr-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env = {**env, TAG: tag, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}
    try:
        _start_node(env, temp, "--head", f"--port={port}", "--include-dashboard=false",
                    f"--ray-client-server-port={free_port()}")
        _start_node(env, temp, f"--address=127.0.0.1:{port}")
        cluster = LocalCluster(f"127.0.0.1:{port}", tag, _raylets(tag))
        assert len(cluster.raylets) == 2, cluster.raylets
        yield cluster
    finally:
        nodes = stop_tagged(tag)
        shutil.rmtree(temp, ignore_errors=True)
        assert not tagged_pids(tag, ray_nodes=nodes), "a Ray process of the test's cluster was left running"


class SpreadWatch(threading.Thread):
    """Until stopped: the nodes on which a worker ran a vehicle's message (``ray::ClientAppActor.run``)."""

    def __init__(self, raylets: dict[int, str]) -> None:
        super().__init__(daemon=True)
        self.raylets, self.nodes, self.done = raylets, set[str](), threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            for pid in (int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()):
                node = self.raylets.get(proc_stat(pid).parent)
                if node and (_cmdline(pid) or [""])[0].startswith("ray::ClientAppActor.run"):
                    self.nodes.add(node)


def test_smoke_run_attaches_to_a_two_node_cluster_spreads_and_leaves_it_running(tmp_path: Path) -> None:
    """On the cluster: vehicles train on both nodes, the run finishes and leaves both nodes running; its
    metrics are those of the same run on one machine."""
    with two_node_cluster() as cluster:
        watch = SpreadWatch(cluster.raylets)
        watch.start()
        run = smoke(tmp_path / "run", f"ray.address={cluster.address}")
        watch.done.set()
        watch.join()
        assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
        assert f"on the Ray cluster at {cluster.address}: 2 nodes, 2 vehicles at once" in run.stdout + run.stderr
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["final"]["round"] == 2
        assert watch.nodes == set(cluster.raylets.values()), f"vehicles trained on {watch.nodes} only"
        # The run stopped what it started and nothing of the cluster: both nodes still run.
        assert all(Path(f"/proc/{pid}").exists() for pid in cluster.raylets), "fedseg-sim stopped the cluster"
        assert _raylets(cluster.tag) == cluster.raylets
    # Where a vehicle trains changes nothing in what it computes: the same run on a Ray of its own.
    alone = smoke(tmp_path / "alone")
    assert alone.returncode == 0, (alone.stdout + alone.stderr)[-3000:]
    assert learned(tmp_path / "run") == learned(tmp_path / "alone")


def smoke(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [str(BIN / "fedseg-sim"), "experiment=smoke", "run.progress=false", f"hydra.run.dir={run_dir}", *overrides],
        env={**env, "FEDSEG_DATA_CACHE": str(run_dir.parent / "cache"), "WANDB_MODE": "offline"},
        capture_output=True, text=True, timeout=900, check=False)


def learned(run_dir: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["round"], r["loss"], r["miou"], r["per_class_iou"], r["bytes_up"]) for r in rows]
