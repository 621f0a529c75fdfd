"""The fedseg Flower ServerApp: aggregate vehicles' UNet updates, evaluate the global model each round.

Runs unchanged under the Simulation Engine (``fedseg-sim``) and the Deployment Engine (``flwr run``).
The strategy chain and fit workflow come from ``server/compose.py`` (one order, documented there);
this file only builds the run's evaluator/reporter and hands both to Flower.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flwr.common import Context, ndarrays_to_parameters
from flwr.server import Grid, ServerApp

from fedseg.checkpoints import checkpoint_meta
from fedseg.config import from_run_config, resolve_device, spec_block
from fedseg.data import cached_fleet
from fedseg.models import build_run_model, get_weights, set_weights
from fedseg.reporting import RunReporter
from fedseg.settings import RunSettings
from server.compose import compose_server

app = ServerApp()


def make_reporter(settings: RunSettings, raw: dict[str, Any]) -> RunReporter:
    """The held-out evaluator and output writer for this run's directory."""
    fed = settings.federation
    data = cached_fleet(settings.data, fed.num_clients, settings.seed)
    dp = settings.privacy.dp_model
    model = build_run_model(settings.model, data.label_map.num_classes, seed=settings.seed, dp=dp)
    out_dir = Path(settings.output_dir)
    tracker = settings.tracking.build(run_dir=out_dir, config=raw,
                                      name=f"{settings.experiment}-{settings.model.name}")
    meta = checkpoint_meta(settings.model, settings.data, data.label_map,
                           {"mode": "federated", "dp_model": dp, "strategy": settings.strategy.name,
                            "config": raw})
    return RunReporter(model=model, data=data, out_dir=out_dir, tracker=tracker, meta=meta,
                       total_rounds=fed.rounds, batch_size=max(fed.batch_size, 8),
                       device=resolve_device(settings.device), example_images=settings.run.example_images)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``federation.rounds`` rounds and write the run-output contract."""
    logging.getLogger("fedseg").setLevel(logging.INFO)
    raw = from_run_config(context.run_config)
    settings = RunSettings.from_config(raw)
    reporter = make_reporter(settings, raw)

    def evaluate_fn(server_round: int, arrays: list, config: dict) -> tuple[float, dict]:
        set_weights(reporter.model, arrays)
        return reporter.evaluate()

    parts = compose_server(
        settings, on_round=reporter.record, evaluate_fn=evaluate_fn,
        initial_parameters=ndarrays_to_parameters(get_weights(reporter.model)),
        partition_sizes=[len(d) for d in reporter.data.clients])
    parts.run(grid, context, settings.federation.rounds)
    reporter.finish({
        "experiment": settings.experiment,
        "clients": settings.federation.num_clients,
        "client_epsilon": parts.recorder.client_epsilon or None,
        "privacy": spec_block(settings.privacy),
        "secagg": spec_block(settings.secagg),
        "compression": spec_block(settings.compression),
    })
