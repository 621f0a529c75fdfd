"""The fedseg Flower ServerApp: aggregate vehicles' UNet updates, evaluate the global model each round.

Runs unchanged under the Simulation Engine (``fedseg-sim``) and the Deployment Engine (``flwr run``).
The run config is ``fedseg-sim``'s full flat config, or ``overrides`` (the Hydra command line) that
``fedseg.deploy.runconfig`` composes into the same. The server loads only its held-out set, waits
for its vehicles with a limit (``fedseg/server/fleet.py``), and gets its strategy chain and fit workflow
from ``fedseg/server/compose.py``; this file only wires them to the run's evaluator and outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from flwr.common import Context, ndarrays_to_parameters
from flwr.server import Grid, ServerApp

from fedseg.checkpoints import checkpoint_meta, load_initial_weights
from fedseg.config import FederationSpec, from_run_config, resolve_device, spec_block
from fedseg.data import FleetData
from fedseg.deploy.outputs import drop_stop_tracebacks, log_to_console, log_to_file, prepare_run_dir
from fedseg.deploy.runconfig import OVERRIDES_KEY, deploy_spec, expand_run_config
from fedseg.deploy.vehicle import load_heldout
from fedseg.errors import RunFailed
from fedseg.models import build_run_model, get_weights, set_weights, trained_mask
from fedseg.quality import Converged, check_compare
from fedseg.reporting import RunReporter
from fedseg.runlock import JOIN, RunDirLock, RunDirLocked
from fedseg.server.audit import audit_after_run, run_epsilon
from fedseg.server.compose import compose_server
from fedseg.server.fleet import FleetClientManager, wait_for_vehicles
from fedseg.server.resume import ResumePoint, restore
from fedseg.settings import RunSettings
from fedseg.training import statistics_mask

app = ServerApp()
log = logging.getLogger("fedseg")


def make_reporter(settings: RunSettings, raw: dict[str, Any], data: FleetData,
                  point: ResumePoint | None) -> RunReporter:
    """The held-out evaluator and output writer for this run's directory (continuing ``point``)."""
    dp = settings.group_norm
    model = build_run_model(settings.model, data.label_map.num_classes, seed=settings.seed, dp=dp)
    if point is not None:
        set_weights(model, point.weights)
    else:  # model.init: a pretrained global model (public pretraining) instead of the random one
        load_initial_weights(model, settings.model)
    out_dir = Path(settings.output_dir)
    tracker = settings.tracking.build(run_dir=out_dir, config=raw, name=f"{settings.experiment}-{settings.model.name}",
                                      resume_id=point.state.get("tracker_id") if point else None)
    meta = checkpoint_meta(settings.model, settings.data, data.label_map,
                           {"mode": "federated", "dp_model": dp, "strategy": settings.strategy.name,
                            "config": raw})
    return RunReporter(model=model, data=data, out_dir=out_dir, tracker=tracker, meta=meta,
                       total_rounds=settings.federation.rounds, batch_size=max(settings.federation.batch_size, 8),
                       device=resolve_device(settings.device), example_images=settings.run.example_images,
                       resume_after=point.round if point else None, early_stop=settings.early_stop,
                       compare=check_compare(settings.compare, data=raw.get("data") or {}, seed=settings.seed),
                       lr_drops=settings.federation.lr_drops)


def simulation_pool(fed: FederationSpec, *, deployed: bool) -> int | None:
    """The simulation nodes a pooled fleet rides (``federation.sim_nodes``, which only ``fedseg-sim`` sets,
    ``fedseg/vehicle_pool.py``), else None. A deployed vehicle is a real node: the setting is refused there."""
    if fed.sim_nodes is None:
        return None
    if deployed:
        raise ValueError(f"federation.sim_nodes={fed.sim_nodes} pools a fleet on fedseg-sim's simulation nodes; "
                         "a deployed vehicle is a SuperNode of its own: drop the override")
    return fed.pool_size()


def _stop(err: Exception) -> RunFailed:
    """A run that cannot go on: one line in the log (Flower's traceback of it is dropped)."""
    log.error(f"fedseg: error: {err}")
    return err if isinstance(err, RunFailed) else RunFailed(str(err))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``federation.rounds`` rounds and write the run-output contract, its directory locked throughout."""
    with contextlib.ExitStack() as held:
        serve(grid, context, held)


def serve(grid: Grid, context: Context, held: contextlib.ExitStack) -> None:
    """:func:`main`'s run; ``held`` keeps the output directory's lock (``fedseg/runlock.py``) until it returns."""
    drop_stop_tracebacks()
    log_to_console()
    try:  # settings, held-out data, start file: a mistake in any stops the run in one line, naming it
        run_config = expand_run_config(context.run_config, context.run_id)
        raw = from_run_config(run_config)
        if raw.get("resume"):  # continue that run in its own directory (fedseg/server/resume.py)
            raw["output_dir"] = raw["resume"]
        settings, deploy = RunSettings.from_config(raw), deploy_spec(raw)
        out, fed = Path(settings.output_dir), settings.federation
        pool = simulation_pool(fed, deployed=OVERRIDES_KEY in context.run_config)
        held.enter_context(RunDirLock.join(out, os.environ.get(JOIN)))  # shared with fedseg-sim's, if it started us
        log_to_console(verbose=settings.run.verbose)
        log_to_file(out)
        prepare_run_dir(out, raw, run_config)
        log.info(f"fedseg: run {context.run_id}: {settings.experiment}, {settings.model.name}, {fed.rounds} "
                 f"rounds, {fed.num_clients} vehicles -> {out.resolve()}")
        data, sizes = load_heldout(settings)
        point = ResumePoint(out) if raw.get("resume") else None
        # Under flwr run no entry point checked model.init first: a bad file is one line here too.
        reporter = make_reporter(settings, raw, data, point)
    except (ValueError, FileNotFoundError, RunDirLocked) as err:
        raise _stop(err) from None
    start = point.round if point else 0

    def evaluate_fn(server_round: int, arrays: list, config: dict) -> tuple[float, dict]:
        set_weights(reporter.model, arrays)
        return reporter.evaluate()

    converged: int | None = None  # early_stop's round, if the run converged
    try:
        joined = wait_for_vehicles(grid, wanted=pool or fed.num_clients, minimum=fed.min_fit_clients,
                                   timeout=deploy.join_timeout)
        # The strategy waits for (and central DP accounts for) the fleet that joined; a pooled fleet is
        # whole whatever its nodes (a round larger than the nodes that joined stops, naming sim_nodes).
        joined = fed.num_clients if pool else joined
        fleet = dataclasses.replace(settings, federation=dataclasses.replace(fed, num_clients=joined))
        parts = compose_server(fleet, on_round=reporter.record, evaluate_fn=evaluate_fn,
                               initial_parameters=ndarrays_to_parameters(get_weights(reporter.model)),
                               partition_sizes=sizes, start_round=start, statistics=statistics_mask(reporter.model),
                               trained=trained_mask(reporter.model, getattr(settings.privacy, "trainable", "all")),
                               lr_dropped=reporter.lr_dropped)
        if point is not None:
            log.info(f"fedseg: resuming after round {start} of {fed.rounds}")
            restore(point.state, parts.base, parts.recorder, parts.recorder.adaptive_clipping())
        parts.run(grid, context, fed.rounds - start,
                  client_manager=FleetClientManager(minimum=fed.min_fit_clients, timeout=deploy.join_timeout),
                  pooled_fleet=fed.num_clients if pool else None, seed=None if point else settings.seed)
    except Converged as done:  # early_stop: held-out mIoU stopped improving
        log.info(f"fedseg: {done}")
        converged = done.round
    except (RunFailed, ValueError) as err:  # too few vehicles joined or answered; an impossible combination
        reporter.finish({"experiment": settings.experiment, "stopped": str(err)})  # the rounds run so far
        raise _stop(err) from None
    audit = (audit_after_run(fleet, data, out, run_epsilon=run_epsilon(parts.recorder, fed.rounds))
             if settings.privacy.audit else {})
    reporter.finish({
        "experiment": settings.experiment,
        "clients": joined,
        "client_epsilon": parts.recorder.client_epsilon or None,
        "privacy": spec_block(settings.privacy),
        "secagg": spec_block(settings.secagg),
        "compression": spec_block(settings.compression),
        "converged_round": converged,
        **audit,  # privacy.audit: audit_epsilon beside the accountant's (fedseg/server/audit.py)
    })
