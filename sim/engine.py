"""The one place that starts Flower's Simulation Engine.

``flwr.simulation.run_simulation`` is deprecated in favour of ``flwr run`` and cannot pass a run
config; the simulation is started through Flower's own ``_run_simulation`` with the run config
written as a Flower app config (``<run_dir>/flwr_app/pyproject.toml``), exactly the file ``flwr run``
would read. Should the engine call move (to ``flwr run``), it moves here and nowhere else.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import tomli_w
from flwr.app import Context, RecordDict
from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.telemetry import EventType

from fedseg.config import RunConfig


def write_app_config(app_dir: Path, run_config: RunConfig) -> Path:
    """A minimal Flower app whose ``[tool.flwr.app.config]`` is this run's flat config."""
    app_dir.mkdir(parents=True, exist_ok=True)
    project = {
        "project": {"name": "fedseg-run", "version": "0.1.0"},
        "tool": {"flwr": {"app": {
            "publisher": "fedseg",
            "components": {"serverapp": "server.server_app:app", "clientapp": "clients.client_app:app"},
            "config": dict(run_config),
        }}},
    }
    path = app_dir / "pyproject.toml"
    path.write_bytes(tomli_w.dumps(project).encode())
    return path


def run_federation(run_config: RunConfig, *, num_vehicles: int, client_cpus: int, client_gpus: float,
                   app_dir: Path, verbose: bool = False) -> None:
    """Run the fedseg ServerApp and ``num_vehicles`` virtual ClientApps on Ray; raise if it failed."""
    from clients.client_app import app as client_app
    from server.server_app import app as server_app

    write_app_config(app_dir, run_config)
    # Flower logs every round's full history at INFO; fedseg prints its own one line per round.
    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose else logging.WARNING)
    # Ray workers must import the project packages and must not grab every core each.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    backend = {"client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus},
               "init_args": {"logging_level": logging.ERROR, "log_to_driver": verbose}}
    server_context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                             run_config=dict(run_config))
    result = _run_simulation(
        num_supernodes=num_vehicles,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=client_app,
        server_app=server_app,
        backend_config=backend,  # type: ignore[arg-type]
        server_app_context=server_context,
        app_dir=str(app_dir),
        is_app=True,
        verbose_logging=verbose,
    )
    if result is not None and getattr(result, "success", True) is False:
        raise RuntimeError("the federated simulation failed; see the log above")
