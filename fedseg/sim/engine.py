"""The one place that starts Flower's Simulation Engine, through Flower's public path: ``flwr run``.

The run's flat config becomes a Flower app (``<run_dir>/flwr_app/pyproject.toml``, its
``[tool.flwr.app.config]``); ``flwr run`` submits it to a SuperLink in simulation mode that this
module starts for the one run (loopback, a free port, ``FLWR_HOME`` in a temporary folder, runtime
dependency installation off since this environment is the app's) and stops afterwards with every
process it spawned. Not ``flwr run`` against ``:local:``: that SuperLink is a daemon on fixed ports
that outlives the command. The apps' code comes from this environment (the bundle holds only the
config), so the Ray workers import the same ``fedseg`` as this process.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fedseg.config import RunConfig, resolve_device
from fedseg.deploy.outputs import write_app_config
from fedseg.deploy.processes import (
    RAY_NODE,
    TAG,
    free_port,
    new_tag,
    stop_tagged,
    tagged_pids,
    terminate_as_exit,
    wait_for_port,
    with_this_environment_on_path,
)
from fedseg.deploy.watchdog import Watchdog
from fedseg.errors import RunFailed

log = logging.getLogger("fedseg")
BIN = Path(sys.executable).parent
# Flower's own chatter on the stream, shown only with run.verbose: its log lines and the CLI's notes.
_FLOWER_LINE = re.compile(r"^(\x1b\[\d+m)?(INFO|DEBUG)\b|^\d\d/\d\d/\d{4} [\d:]+:(INFO|DEBUG):|^(Using SuperLink|"
                          r"Successfully (started|installed)|Flower App configuration warnings|- Recommended )|"
                          r"default simulated SuperNodes changed")


def _flwr(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)


def _stream(cmd: list[str], env: dict[str, str], verbose: bool) -> tuple[int, list[str]]:
    """Run ``flwr run --stream``; its lines go to fedseg's log (console and job log), Flower's own only
    when ``verbose``. Returns the exit status and every line."""
    lines: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                line = raw.rstrip()
                lines.append(line)
                if line and (verbose or not _FLOWER_LINE.search(line)):
                    log.info(line)
        except BaseException:  # SIGTERM (SystemExit) or Ctrl-C: Popen's exit would wait for `flwr run`, which
            proc.kill()  # streams until the run ends, so the caller's teardown would wait for the whole run
            raise
    return proc.returncode, lines


def _verdict(env: dict[str, str], lines: list[str]) -> None:
    """Raise unless the run finished completed; a fedseg error line becomes a one-line ``RunFailed``."""
    started = [m.group(1) for line in lines if (m := re.search(r"Successfully started run (\d+)", line))]
    if not started:
        raise RuntimeError("flwr run did not start the simulation: " + " | ".join(lines[-5:]))
    listing = _flwr(env, "ls", "sim", "--run-id", started[0], "--format", "json")
    try:
        status = str(json.loads(listing.stdout)["runs"][0]["status"])
    except (ValueError, KeyError, IndexError):
        status = f"unknown ({listing.stdout.strip()[-300:]})"
    if status == "finished:completed":
        return
    errors = [line.split("fedseg: error: ", 1)[1] for line in lines if "fedseg: error: " in line]
    if errors:
        raise RunFailed(errors[-1])
    raise RuntimeError(f"the federated simulation ended {status}; see the log above")


def check_accelerators(device: str, client_gpus: float, *, gpus: int) -> None:
    """Refuse, in one line naming the key, a device and GPU share that Ray cannot give the vehicles.

    ``gpus``: CUDA devices on this machine. Ray starts no vehicle when each wants a GPU share the
    machine lacks, and hides the GPUs (``CUDA_VISIBLE_DEVICES=""``) from a vehicle that reserves none;
    a vehicle that reserves a share sees its GPU as ``cuda:0``. ``device=auto`` means cuda where
    ``gpus`` > 0. Fractional shares put several vehicles on one GPU (0.25: four per GPU).
    """
    if client_gpus > 0 and gpus == 0:
        raise ValueError(f"federation.client_gpus={client_gpus:g}: this machine has no CUDA GPU, so Ray would "
                         "start no vehicle; set federation.client_gpus=0 (and device=cpu or auto)")
    if client_gpus > max(gpus, 1):
        raise ValueError(f"federation.client_gpus={client_gpus:g}: more than this machine's {gpus} GPU(s), so Ray "
                         "would start no vehicle; valid: 0 < client_gpus <= 1 shares one GPU")
    cuda = device.startswith("cuda") or (device == "auto" and gpus > 0)
    if cuda and client_gpus == 0:
        raise ValueError(f"device={device} with federation.client_gpus=0: Ray hides the GPU from vehicles that "
                         "reserve no share of it; set e.g. federation.client_gpus=0.25 (four vehicles per GPU)")
    if device.startswith("cuda:") and device != "cuda:0":
        raise ValueError(f"device={device}: Ray gives each vehicle its GPU as cuda:0; use device=cuda")
    if not cuda and client_gpus > 0:
        raise ValueError(f"federation.client_gpus={client_gpus:g} with device={device}: the vehicles would hold GPU "
                         "shares and train on the CPU; set device=cuda or federation.client_gpus=0")


def check_devices(device: str, client_gpus: float) -> None:
    """``device`` exists here (:func:`~fedseg.config.resolve_device`) and Ray can honour it with
    ``client_gpus`` (:func:`check_accelerators`); a ``ValueError`` naming the key otherwise."""
    import torch

    resolve_device(device)
    check_accelerators(device, client_gpus, gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0)


def ray_environment(env: dict[str, str], ray_address: str | None) -> dict[str, str]:
    """``env`` for the processes of a run: ``RAY_ADDRESS`` exactly when attaching to a cluster (Flower's
    simulation calls ``ray.init()`` with no address, so Ray reads it there), and no inherited ``RAY_NODE_ID``
    (set when fedseg-sim itself runs in a Ray job or task: its children would carry that node's id, and
    :func:`~fedseg.deploy.processes.stop_tagged` stops every process of the Ray nodes its tagged ones name)."""
    env = {k: v for k, v in env.items() if k not in (RAY_NODE, "RAY_ADDRESS")}
    return env if ray_address is None else {**env, "RAY_ADDRESS": ray_address}


def run_federation(run_config: RunConfig, *, num_vehicles: int, client_cpus: int, client_gpus: float,
                   app_dir: Path, verbose: bool = False, ray_cpus: int | None = None,
                   ray_address: str | None = None) -> None:
    """Run the fedseg ServerApp and ``num_vehicles`` virtual ClientApps on Ray; raise if it failed.

    ``ray_cpus``: the CPUs Ray hands out (``None``: the machine's cores); Ray runs ``ray_cpus // client_cpus``
    vehicles at once. ``ray_address``: an existing cluster to run on (:mod:`fedseg.sim.cluster`), whose nodes
    set their own CPUs (so not with ``ray_cpus``) and which the run never stops; None: a Ray of its own."""
    if ray_address is not None and ray_cpus is not None:
        raise ValueError(f"federation.ray_cpus={ray_cpus} with ray.address={ray_address}: set CPUs on the nodes")
    write_app_config(app_dir, run_config)
    home, tag, port = Path(tempfile.mkdtemp(prefix="fedseg-flwr-")), new_tag(), free_port()
    env = with_this_environment_on_path(ray_environment({**os.environ, TAG: tag, "FLWR_HOME": str(home),
                                                         "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DEDUP_LOGS": "0",
                                                         "PYTHONUNBUFFERED": "1"}, ray_address))
    own_ray = ray_address is None  # attached: every Ray process is the cluster's, none is followed or stopped
    # A SIGTERM'd run still stops what it started (the finally below); a SIGKILLed one, its watchdog.
    with terminate_as_exit(), Watchdog(tag, home, follow_ray_nodes=own_ray) as watchdog:
        try:
            with (home / "superlink.log").open("wb") as out:
                link = subprocess.Popen(
                    [str(BIN / "flower-superlink"), "--simulation", "--insecure", "--host", "127.0.0.1", "--port",
                     str(port), "--disable-runtime-dependency-installation"],
                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=app_dir, start_new_session=True)
            try:
                wait_for_port(port, 60, link)
            except RuntimeError as err:  # its log is in the temporary FLWR_HOME, removed below: quote it
                tail = [line for line in (home / "superlink.log").read_text(errors="replace").splitlines()
                        if line.strip()][-3:]
                raise RunFailed(f"the Flower SuperLink did not start ({err}): " + " | ".join(tail)) from None
            (home / "config.toml").write_text(f'[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
            federation = (f"num-supernodes={num_vehicles} client-resources-num-cpus={client_cpus} "
                          f"client-resources-num-gpus={client_gpus} init-args-logging-level='"
                          f"{'INFO' if verbose else 'ERROR'}' init-args-log-to-driver={str(verbose).lower()} "
                          f"verbose={str(verbose).lower()}" + ("" if ray_cpus is None else
                                                              f" init-args-num-cpus={ray_cpus}"))
            code, lines = _stream([str(BIN / "flwr"), "run", str(app_dir), "sim", "--stream",
                                   "--federation-config", federation], env, verbose)
            if code != 0:
                raise RuntimeError(f"flwr run exited with status {code}: " + " | ".join(lines[-5:]))
            _verdict(env, lines)
        finally:
            # Its Ray nodes and the sessions its processes lead, named to the watchdog while the tagged
            # raylets and leaders still show them (attached to a cluster: no Ray node is followed).
            ray_nodes, sessions = set[str](), set[int]()
            tagged_pids(tag, ray_nodes=ray_nodes if own_ray else None, sessions=sessions)
            watchdog.follow(ray_nodes, sessions)
            ray_nodes = stop_tagged(tag, ray_nodes=ray_nodes, sessions=sessions, follow_ray_nodes=own_ray)
            shutil.rmtree(home, ignore_errors=True)
            watchdog.stand_down(ray_nodes, sessions)
