"""``fedseg-sim`` on an existing Ray cluster: which one (``ray.address``, else ``$RAY_ADDRESS``), and whether
every node of it can run the run's vehicles.

Flower 1.42 has no key for a cluster address: its simulation calls ``ray.init()`` with no address
(``flwr/server/superlink/fleet/vce/backend/raybackend.py``), so Ray's own discovery decides, and with
``RAY_ADDRESS`` in the simulation process's environment (:func:`fedseg.sim.engine.run_federation` puts it
there) it connects to that cluster. Its actor pool is sized once, at start, from ``ray.nodes()``: on each
node, its CPUs // ``federation.client_cpus`` vehicles (and its GPUs // ``client_gpus``), so the vehicles
spread over the nodes alive then.

A vehicle runs wherever Ray places it, importing ``fedseg`` from that node's Python environment, so before
anything starts :func:`check_cluster` runs a small task pinned to each alive node that reports its Python,
``fedseg``, ``flwr``, ``torch`` and ``ray`` versions and whether the run's data is reachable there (the
embedded synthetic frames are rendered per node into ``data.root``: it must be writable; a user's
frames, ``data=carla``, read from ``data.root``: it must be there), and fails in one line naming the first
node that differs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedseg.config import DataSpec, RaySpec, check_ray_address
from fedseg.errors import RunFailed

PACKAGES = ("fedseg", "flwr", "torch", "ray")
log = logging.getLogger("fedseg")
_REPORT = "fedseg-nodes: "  # the probe's one line of JSON on stdout, among whatever Ray prints


def attach_address(spec: RaySpec, *, ray_cpus: int | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The cluster to attach to: ``ray.address``, else ``$RAY_ADDRESS`` (Ray's convention), else None (a Ray
    of the run's own). A one-line ``ValueError`` for a malformed address, or with ``federation.ray_cpus``:
    an existing cluster's CPUs are set where its nodes start (``ray start --num-cpus``), and Ray refuses
    ``num_cpus`` from a driver that connects; ignoring it instead would run more vehicles at once than asked."""
    environ = os.environ if environ is None else environ
    key = "ray.address" if spec.address else "RAY_ADDRESS"
    address = spec.address or environ.get("RAY_ADDRESS") or None
    if address is None:
        return None
    check_ray_address(address, key=key)
    if ray_cpus is not None:
        raise ValueError(f"federation.ray_cpus={ray_cpus} with {key}={address}: an existing cluster's CPUs are set "
                         "on its nodes (ray start --num-cpus=N); drop federation.ray_cpus")
    return address


def node_facts(data_root: str | None, *, data_read: bool) -> dict[str, str]:
    """What a node must share with the driver: versions (Python's major.minor; ``torch`` without its build
    tag: a GPU node's ``+cu124`` and a CPU head's ``+cpu`` are the same code), and ``data``: ``ok`` or why
    the run's data is not usable here. Runs on each node, so it imports only the standard library."""
    import importlib.metadata
    import platform
    from pathlib import Path

    facts = {"python": ".".join(platform.python_version_tuple()[:2])}  # pickles cross patch releases, not minor
    for package in PACKAGES:
        try:
            facts[package] = importlib.metadata.version(package).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            facts[package] = "not installed"
    facts["data"] = "ok"
    if data_root is not None:
        root = Path(data_root).expanduser()
        if data_read and not root.is_dir():
            facts["data"] = f"data.root={data_root} is not a folder here (it must be reachable on every node)"
        elif not data_read:
            existing = next(p for p in (root, *root.parents) if p.exists())
            if not os.access(existing, os.W_OK):
                facts["data"] = f"data.root={data_root} cannot be written here ({existing}): synthetic frames are " \
                                "rendered on each node; set FEDSEG_DATA_CACHE to a writable folder"
    return facts


@dataclass(frozen=True)
class NodeReport:
    """One alive node of the cluster and what :func:`node_facts` found there (``error``: why it found nothing)."""

    node_id: str
    ip: str
    cpus: float
    gpus: float
    facts: dict[str, str]
    error: str = ""

    @property
    def name(self) -> str:
        return f"node {self.ip} ({self.node_id[:12]})"


def first_difference(driver: Mapping[str, str], nodes: Sequence[NodeReport], *, address: str) -> str | None:
    """One line naming the first node that cannot run this run's vehicles, and what differs; None if all can."""
    if not nodes:
        return f"ray.address={address}: the cluster has no alive node"
    for node in nodes:
        if node.error:
            return f"ray.address={address}: {node.name}: {node.error}"
        if node.facts.get("data", "ok") != "ok":
            return f"ray.address={address}: {node.name}: {node.facts['data']}"
        differs = [f"{key} {node.facts.get(key, 'unknown')} (here {value})" for key, value in driver.items()
                   if key != "data" and node.facts.get(key) != value]
        if differs:
            return (f"ray.address={address}: {node.name} has {', '.join(differs)}; install the same Python "
                    "environment and fedseg version on every node")
    return None


def check_cluster(address: str, data: DataSpec, *, client_cpus: int, timeout: float = 60.0) -> list[NodeReport]:
    """Probe every alive node of the cluster at ``address`` (:func:`node_facts`, in a subprocess: Ray's driver
    state stays out of ``fedseg-sim``) and return them; a one-line ``ValueError`` naming the first node that
    differs from this environment, ``RunFailed`` if the cluster does not answer within ``timeout`` s."""
    from fedseg.data import get_data_source

    if address != "auto":  # Ray itself would retry a dead address for minutes
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except OSError as err:
            raise RunFailed(f"ray.address={address}: nothing answers there ({err}); start the cluster's head with "
                            f"ray start --head --port={port}") from None
    data_read = get_data_source(data.name).check_files  # a user's frames are read; the synthetic ones rendered
    request = json.dumps({"address": address, "data_root": data.root, "data_read": data_read, "timeout": timeout})
    try:
        done = subprocess.run([sys.executable, "-m", "fedseg.sim.cluster", request], capture_output=True, text=True,
                              timeout=timeout + 30, check=False)  # connecting has its own wait, before the tasks'
    except subprocess.TimeoutExpired:
        raise RunFailed(f"ray.address={address}: no answer from the cluster within {timeout + 30:g} s") from None
    reports = [line[len(_REPORT):] for line in done.stdout.splitlines() if line.startswith(_REPORT)]
    if done.returncode != 0 or not reports:
        tail = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()][-1:]
        raise RunFailed(f"ray.address={address}: could not reach the cluster: {' '.join(tail) or done.returncode}")
    nodes = [NodeReport(**node) for node in json.loads(reports[0])]
    problem = first_difference(node_facts(None, data_read=data_read), nodes, address=address)
    if problem:
        raise ValueError(problem)
    slots = sum(int(n.cpus // client_cpus) for n in nodes)  # as Flower sizes its actor pool (per node)
    log.info(f"fedseg-sim: on the Ray cluster at {address}: {len(nodes)} nodes, {slots} vehicles at once "
             f"({client_cpus} CPU each)")
    return nodes


def _probe(address: str, data_root: str | None, data_read: bool, timeout: float) -> list[dict]:
    """Connect to the cluster and run :func:`node_facts` on each alive node, pinned there (no CPU reserved:
    a busy node answers too)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, include_dashboard=False)
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        # Run as ``__main__``, node_facts travels by value: a node without fedseg still answers.
        remote: Any = ray.remote(num_cpus=0, max_retries=0)  # Ray's stubs type functions of no arguments only
        task = remote(node_facts)
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                               ).remote(data_root, data_read=data_read) for n in nodes]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        out = []
        for node, ref in zip(nodes, refs, strict=True):
            facts, error = {}, f"did not answer within {timeout:g} s"
            if ref in ready:
                try:
                    facts, error = ray.get(ref), ""
                except Exception as err:  # noqa: BLE001 - reported as that node's one line
                    error = "the check failed there: " + (str(err).strip().splitlines() or [type(err).__name__])[-1]
            resources = node["Resources"]
            out.append({"node_id": str(node["NodeID"]), "ip": str(node["NodeManagerAddress"]),
                        "cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0), "facts": facts,
                        "error": error})
        return out
    finally:
        ray.shutdown()


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    print(_REPORT + json.dumps(_probe(args["address"], args["data_root"], args["data_read"], args["timeout"])),
          flush=True)
