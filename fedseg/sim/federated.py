"""``fedseg-sim``: a federated run of the configured fleet in Flower's Simulation Engine.

    fedseg-sim                                  # UNet-ResNet34, 4 vehicles, embedded synthetic scenes
    fedseg-sim experiment=smoke                 # tiny run for checks (< 3 min on 2 CPU cores)
    fedseg-sim strategy=fedprox federation.rounds=20 data=carla data.root=/data/carla
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from fedseg.config import RaySpec, parse_spec, to_run_config
from fedseg.data import describe_sizes, fleet_frames
from fedseg.quality import check_compare
from fedseg.runlock import RunDirLock
from fedseg.server.compose import check_composition
from fedseg.settings import RunSettings, check_choices
from fedseg.sim._cli import CONF_DIR, check_start_file, resolve, user_errors
from fedseg.sim.cluster import attach_address, check_cluster
from fedseg.sim.engine import check_devices, run_federation

log = logging.getLogger("fedseg")


@user_errors("fedseg-sim")
def run(cfg: DictConfig) -> dict:
    raw = resolve(cfg)
    if raw.get("resume"):
        raw = resumed_config(Path(raw["resume"]))
    # One writer per run directory (fedseg/runlock.py): held from before fedseg writes there until
    # every process the run started has stopped, and shared with its ServerApp.
    with RunDirLock.acquire(Path(raw["output_dir"])) as lock:
        lock.share()
        return federate(raw)


def federate(raw: dict[str, Any]) -> dict:
    """Check the run ``raw`` describes, run it in the Simulation Engine and return its summary."""
    settings = RunSettings.from_config(raw)
    check_choices(settings)
    check_start_file(settings, resume=raw.get("resume"))  # a bad model.init or resume: one line, nothing started
    check_compare(settings.compare, data=raw.get("data") or {}, seed=settings.seed)  # likewise a bad compare=
    fed = settings.federation
    ray_address = attach_address(parse_spec(RaySpec, raw.get("ray"), key="ray"), ray_cpus=fed.ray_cpus)
    check_devices(settings.device, fed.client_gpus)  # before data and Ray: Ray would wait or hide the GPU
    # A user's folder is listed and every file decoded here, so bad frames fail before any vehicle
    # starts, naming the file. The synthetic fleet is only described: each vehicle renders (and
    # caches) its own frames when first sampled, so start-up does not grow with the fleet.
    fleet = fleet_frames(settings.data, num_clients=fed.num_clients, seed=settings.seed, check=True,
                         progress=settings.run.progress)
    sizes = fleet.sizes()
    check_composition(settings, sizes)  # impossible combinations fail here, before Ray starts
    if ray_address:  # each node can run the vehicles (same environment, data reachable), or one line naming it
        check_cluster(ray_address, settings.data, client_cpus=fed.client_cpus)
    # A fleet larger than a round's sample rides a pool of simulation nodes (fedseg/vehicle_pool.py); the
    # resolved count travels in the run config, where it tells the server and the vehicles to pool.
    pool = fed.pool_size()
    raw = {**raw, "federation": {**raw["federation"], "sim_nodes": pool}}
    log.info(f"fedseg-sim: {fed.num_clients} vehicles ({describe_sizes(sizes)}), {len(fleet.heldout())} held-out, "
             f"{settings.model.name}, {fed.rounds} rounds -> {settings.output_dir}"
             + (f"; {pool} simulation nodes carry them" if pool else ""))
    out = Path(settings.output_dir)
    if not settings.run.verbose:
        keep_flower_off_the_console()
    run_federation(to_run_config(raw), num_vehicles=pool or fed.num_clients, client_cpus=fed.client_cpus,
                   client_gpus=fed.client_gpus, app_dir=out / "flwr_app", verbose=settings.run.verbose,
                   ray_cpus=fed.ray_cpus, ray_address=ray_address)
    summary = json.loads((out / "summary.json").read_text())
    final = summary["final"]
    log.info(f"fedseg-sim: done: round {final['round']} mIoU {final['miou']:.3f} "
             f"(best {summary['best_miou']:.3f} at round {summary['best_round']}); outputs in {out}")
    return summary


def resumed_config(run_dir: Path) -> dict[str, Any]:
    """The config a run directory was started with, to continue it there after its last round."""
    run_dir = run_dir.expanduser().resolve()
    saved, checkpoint = run_dir / ".hydra" / "config.yaml", run_dir / "checkpoints" / "global.pt"
    if not saved.is_file():
        raise FileNotFoundError(f"resume={run_dir}: no .hydra/config.yaml there (not a fedseg-sim run directory)")
    if not checkpoint.is_file():
        raise FileNotFoundError(f"resume={run_dir}: no checkpoints/global.pt (the run stopped before its "
                                "first round was recorded): start it anew")
    container = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    assert isinstance(container, dict)
    raw = {str(k): v for k, v in container.items()}
    log.info(f"fedseg-sim: resuming {run_dir} with the config it was started with")
    return {**raw, "output_dir": str(run_dir), "resume": str(run_dir)}


def keep_flower_off_the_console() -> None:
    """Flower's own log lines (a failing vehicle's traceback among them) go to the job log only.

    The console keeps fedseg's lines: a round's failures are one warning naming the first error, and
    a run that cannot go on ends in one error line. ``run.verbose=true`` shows Flower's lines too.
    """
    from flwr.common.logger import console_handler

    console_handler.setLevel(logging.CRITICAL + 1)
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.addFilter(lambda record: not record.name.startswith("flwr"))


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
