"""fedseg-sim on an existing Ray cluster (fedseg/sim/cluster.py): which cluster, the per-node check's one
line, and a run's cleanup that never reaches the cluster's own processes. The run on a real two-node
cluster is tests/test_ray_cluster_e2e.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedseg.config import RaySpec, parse_spec
from fedseg.deploy.processes import RAY_NODE, new_tag, stop_tagged
from fedseg.deploy.watchdog import Watchdog
from fedseg.sim.cluster import NodeReport, attach_address, first_difference, node_facts
from fedseg.sim.engine import ray_environment

HERE = {"python": "3.11", "fedseg": "0.1.0", "flwr": "1.42.0", "torch": "2.14.1", "ray": "2.55.1"}


def node(ip: str, **facts: str) -> NodeReport:
    """A node whose id is its IP's last number, 56 hex digits as Ray's (10.0.0.6: 0606...)."""
    return NodeReport(node_id=f"{int(ip.rsplit('.', 1)[1]):02d}" * 28, ip=ip, cpus=1, gpus=0,
                      facts={**HERE, "data": "ok", **facts})


# ---- which cluster ---------------------------------------------------------------------------------

def test_the_config_key_wins_over_ray_address_and_neither_means_a_ray_of_its_own() -> None:
    env = {"RAY_ADDRESS": "10.0.0.9:6379"}
    assert attach_address(RaySpec("10.0.0.5:6379"), ray_cpus=None, environ=env) == "10.0.0.5:6379"
    assert attach_address(RaySpec(), ray_cpus=None, environ=env) == "10.0.0.9:6379"
    assert attach_address(RaySpec(), ray_cpus=None, environ={}) is None
    assert attach_address(RaySpec(), ray_cpus=4, environ={"RAY_ADDRESS": ""}) is None  # empty: unset


def test_ray_cpus_with_a_cluster_is_refused_in_one_line_naming_both() -> None:
    with pytest.raises(ValueError, match=r"^federation.ray_cpus=2 with ray.address=10.0.0.5:6379: .*"
                                         r"ray start --num-cpus=N\); drop federation.ray_cpus$"):
        attach_address(RaySpec("10.0.0.5:6379"), ray_cpus=2, environ={})
    with pytest.raises(ValueError, match=r"^federation.ray_cpus=2 with RAY_ADDRESS=auto: "):
        attach_address(RaySpec(), ray_cpus=2, environ={"RAY_ADDRESS": "auto"})


@pytest.mark.parametrize(("address", "message"), [
    ("10.0.0.5", "ray.address='10.0.0.5': expected HOST:PORT of the cluster's head"),
    ("10.0.0.5:port", "ray.address='10.0.0.5:port': expected HOST:PORT"),
    (":6379", "ray.address=':6379': expected HOST:PORT"),
    ("10.0.0.5:70000", "ray.address='10.0.0.5:70000': expected HOST:PORT"),
    ("ray://10.0.0.5:10001", "ray.address=ray://10.0.0.5:10001: Ray Client addresses are not supported"),
])
def test_a_malformed_address_is_one_line_naming_the_key(address: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        parse_spec(RaySpec, {"address": address}, key="ray")
    assert parse_spec(RaySpec, {"address": "[::1]:6379"}, key="ray").address == "[::1]:6379"
    with pytest.raises(ValueError, match=r"^RAY_ADDRESS='10.0.0.5': expected HOST:PORT"):
        attach_address(RaySpec(), ray_cpus=None, environ={"RAY_ADDRESS": "10.0.0.5"})
    with pytest.raises(ValueError, match=r"unknown ray keys \['adress'\]; valid: \['address'\]"):
        parse_spec(RaySpec, {"adress": "10.0.0.5:6379"}, key="ray")


# ---- the per-node check ------------------------------------------------------------------------------

def test_every_node_like_this_environment_passes() -> None:
    assert first_difference(HERE, [node("10.0.0.5"), node("10.0.0.6")], address="10.0.0.5:6379") is None


def test_the_first_node_that_differs_is_named_with_what_differs() -> None:
    nodes = [node("10.0.0.5"), node("10.0.0.6", fedseg="0.0.9", torch="2.13.0"), node("10.0.0.7", flwr="1.41.0")]
    assert first_difference(HERE, nodes, address="10.0.0.5:6379") == (
        "ray.address=10.0.0.5:6379: node 10.0.0.6 (060606060606) has fedseg 0.0.9 (here 0.1.0), torch 2.13.0 "
        "(here 2.14.1); install the same Python environment and fedseg version on every node")


def test_a_node_without_fedseg_or_data_or_answer_is_named() -> None:
    missing = node("10.0.0.6", fedseg="not installed")
    assert "node 10.0.0.6 (060606060606) has fedseg not installed (here 0.1.0)" in str(
        first_difference(HERE, [missing], address="h:1"))
    no_data = node("10.0.0.7", data="data.root=/data/carla is not a folder here (it must be reachable on every node)")
    assert first_difference(HERE, [node("10.0.0.5"), no_data], address="h:1") == (
        "ray.address=h:1: node 10.0.0.7 (070707070707): data.root=/data/carla is not a folder here (it must be "
        "reachable on every node)")
    silent = NodeReport("ab" * 28, "10.0.0.8", 4, 0, {}, error="did not answer within 60 s")
    assert first_difference(HERE, [silent], address="h:1") == \
        "ray.address=h:1: node 10.0.0.8 (abababababab): did not answer within 60 s"
    assert first_difference(HERE, [], address="h:1") == "ray.address=h:1: the cluster has no alive node"


def test_node_facts_report_versions_and_whether_the_data_is_usable(tmp_path: Path) -> None:
    facts = node_facts(str(tmp_path / "cache" / "synthetic"), data_read=False)  # rendered: a writable ancestor
    assert set(facts) == {"python", "fedseg", "flwr", "torch", "ray", "data"} and facts["data"] == "ok"
    assert "+" not in facts["torch"]  # a GPU node's +cu124 build is the same torch as a CPU head's
    assert facts["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert node_facts(str(tmp_path), data_read=True)["data"] == "ok"
    assert node_facts(str(tmp_path / "carla"), data_read=True)["data"] == \
        f"data.root={tmp_path / 'carla'} is not a folder here (it must be reachable on every node)"


# ---- the run's processes, and the cluster's ---------------------------------------------------------

def test_attached_runs_carry_ray_address_and_no_inherited_node_id() -> None:
    inherited = {"PATH": "/bin", RAY_NODE: "ab" * 28, "RAY_ADDRESS": "10.0.0.9:6379"}
    assert ray_environment(inherited, None) == {"PATH": "/bin"}
    assert ray_environment(inherited, "10.0.0.5:6379") == {"PATH": "/bin", "RAY_ADDRESS": "10.0.0.5:6379"}


def _sleeper(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env=env)


def _alive(proc: subprocess.Popen) -> bool:
    return proc.poll() is None


@pytest.mark.parametrize("via_watchdog", [False, True], ids=["own-stop", "watchdog"])
def test_an_attached_run_stops_its_processes_and_spares_the_clusters(via_watchdog: bool) -> None:
    """A tagged process that names a cluster node (as a run started from a Ray job would) is stopped; the
    cluster's own process on that node (untagged: a raylet's worker) lives on. Following the node (a run
    with a Ray of its own) would have stopped it too."""
    tag, cluster_node = new_tag(), os.urandom(28).hex()
    ours = _sleeper({**os.environ, "FEDSEG_PROCESS_TAG": tag, RAY_NODE: cluster_node})
    theirs = _sleeper({**os.environ, RAY_NODE: cluster_node})
    try:
        if via_watchdog:  # the command died without standing it down: the watchdog stops the tagged ones
            with Watchdog(tag, follow_ray_nodes=False) as watchdog:
                pass
            watchdog.proc.wait(timeout=60)
        else:
            assert stop_tagged(tag, grace=5, follow_ray_nodes=False) == set()
        ours.wait(timeout=10)
        time.sleep(0.5)
        assert _alive(theirs), "the cluster's process was stopped"
        assert stop_tagged(tag, grace=5) == set()  # nothing tagged is left to lead to the node
        assert _alive(theirs)
    finally:
        for proc in (ours, theirs):
            proc.kill()
            proc.wait()
