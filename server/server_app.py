"""The fedseg Flower ServerApp: aggregate vehicles' UNet updates, evaluate the global model each round.

Runs unchanged under the Simulation Engine (``fedseg-sim``) and the Deployment Engine
(``flwr run``). It uses Flower's ``LegacyContext`` + ``DefaultWorkflow`` because Flower's SecAgg+
(``SecAggPlusWorkflow``) and its DP strategy wrappers live on that path (DESIGN.md); features are
added by wrapping the strategy and swapping the fit workflow, never by branching inside them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.common import Context, ndarrays_to_parameters
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.workflow import DefaultWorkflow

from fedseg.checkpoints import checkpoint_meta
from fedseg.config import RunSettings, from_run_config, resolve_device
from fedseg.data import cached_fleet
from fedseg.models import build_run_model, get_weights, set_weights
from fedseg.privacy import uses_dp_model
from fedseg.reporting import RunReporter
from fedseg.tracking import make_tracker
from server.secagg import build_fit_workflow, wrap_strategy
from server.strategy import (
    RoundRecorder,
    build_strategy,
    central_accounting,
    mean_train_loss,
    wrap_privacy,
)

app = ServerApp()


def make_reporter(settings: RunSettings, raw: dict[str, Any]) -> RunReporter:
    """The held-out evaluator and output writer for this run's directory."""
    fed, run = settings.federation, settings.blocks.get("run", {})
    data = cached_fleet(settings.data, fed.num_clients, settings.seed)
    dp = uses_dp_model(settings.blocks.get("privacy", {}).get("name", "none"))
    model = build_run_model(settings.model, data.label_map.num_classes, seed=settings.seed, dp=dp)
    out_dir = Path(settings.output_dir)
    tracker = make_tracker(settings.blocks.get("tracking", {}), run_dir=out_dir, config=raw,
                           name=f"{settings.experiment}-{settings.model.name}")
    meta = checkpoint_meta(settings.model, settings.data, data.label_map, {"mode": "federated", "dp_model": dp,
                                                            "strategy": settings.strategy.name,
                                                            "config": raw})
    return RunReporter(model=model, data=data, out_dir=out_dir, tracker=tracker, meta=meta,
                       total_rounds=fed.rounds, batch_size=max(fed.batch_size, 8),
                       device=resolve_device(settings.device),
                       example_images=int(run.get("example_images", 4)),
                       progress=bool(run.get("progress", True)))


def make_strategy(settings: RunSettings, reporter: RunReporter) -> RoundRecorder:
    """Flower's configured strategy, evaluating server-side, wrapped by the round recorder."""
    fed = settings.federation

    def evaluate_fn(server_round: int, arrays: list, config: dict) -> tuple[float, dict]:
        set_weights(reporter.model, arrays)
        return reporter.evaluate()

    def fit_config(server_round: int) -> dict[str, Any]:
        return {"server_round": server_round, "local_epochs": fed.local_epochs}

    strategy = build_strategy(
        settings.strategy.name,
        settings.strategy.options,
        fraction_fit=fed.fraction_fit,
        fraction_evaluate=0.0,  # evaluation is server-side, on the held-out set
        min_fit_clients=fed.min_fit_clients,
        min_available_clients=fed.num_clients,
        min_evaluate_clients=0,
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=fit_config,
        initial_parameters=ndarrays_to_parameters(get_weights(reporter.model)),
        fit_metrics_aggregation_fn=mean_train_loss,
    )
    return RoundRecorder(wrap_privacy(strategy, settings), on_round=reporter.record,
                         central_dp=central_accounting(settings))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``federation.rounds`` rounds and write the run-output contract."""
    raw = from_run_config(context.run_config)
    settings = RunSettings.from_config(raw)
    reporter = make_reporter(settings, raw)
    strategy = make_strategy(settings, reporter)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=settings.federation.rounds),
                           strategy=wrap_strategy(strategy, settings))
    DefaultWorkflow(fit_workflow=build_fit_workflow(settings))(grid, legacy)
    reporter.finish({
        "experiment": settings.experiment,
        "clients": settings.federation.num_clients,
        "client_epsilon": strategy.client_epsilon or None,
        "privacy": settings.blocks.get("privacy", {}),
        "secagg": settings.blocks.get("secagg", {}),
    })
