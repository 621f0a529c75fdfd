"""The run directory of a run that no Hydra entry point started (``flwr run``): same contract as ``fedseg-sim``.

``fedseg-sim`` gets ``.hydra/config.yaml`` and its job log from Hydra; under ``flwr run`` the ServerApp
writes them itself (``server.log`` is the job log), plus ``flwr_app/pyproject.toml``, the flat run
config the apps ran with, so a deployed run leaves the same files as a simulated one.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import tomli_w

from fedseg.config import RunConfig
from fedseg.errors import RunFailed

JOB_LOG = "server.log"


def write_app_config(app_dir: Path, run_config: RunConfig) -> Path:
    """A minimal Flower app whose ``[tool.flwr.app.config]`` is this run's flat config."""
    app_dir.mkdir(parents=True, exist_ok=True)
    project = {
        "project": {"name": "fedseg-run", "version": "0.1.0", "description": "a fedseg run's settings",
                    "license": "Apache-2.0"},
        "tool": {"flwr": {"app": {
            "publisher": "fedseg",
            "components": {"serverapp": "fedseg.server.server_app:app", "clientapp": "fedseg.clients.client_app:app"},
            "config": dict(run_config),
        }}},
    }
    path = app_dir / "pyproject.toml"
    path.write_bytes(tomli_w.dumps(project).encode())
    return path


def prepare_run_dir(out: Path, raw: dict[str, Any], run_config: RunConfig) -> None:
    """Write what Hydra would have written (``.hydra/config.yaml``) and the app config, if absent."""
    import yaml

    config = out / ".hydra" / "config.yaml"
    if not config.exists():
        config.parent.mkdir(parents=True, exist_ok=True)
        body = {k: v for k, v in raw.items() if k != "output_dir"}
        config.write_text(yaml.safe_dump(body, sort_keys=False))
    if not (out / "flwr_app" / "pyproject.toml").exists():
        write_app_config(out / "flwr_app", run_config)


class _StopWithoutTraceback(logging.Filter):
    """Flower logs a ServerApp's exception with its traceback; a run fedseg stopped on purpose
    (``RunFailed``: too few vehicles) has already said why in one line, so only Flower's line stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], RunFailed):
            record.exc_info, record.exc_text = None, None
        return True


def drop_stop_tracebacks() -> None:
    """From now on Flower logs a ``RunFailed`` leaving its ServerApp as its own one line, no traceback."""
    flwr = logging.getLogger("flwr")
    if not any(isinstance(f, _StopWithoutTraceback) for f in flwr.filters):
        flwr.addFilter(_StopWithoutTraceback())


def _outside_hydra(logger: logging.Logger, kind: type[logging.Handler]) -> bool:
    """Whether fedseg must add a handler of ``kind`` (inside a Hydra app, Hydra's handlers do the job)."""
    from hydra.core.hydra_config import HydraConfig

    return not HydraConfig.initialized() and not any(type(h) is kind for h in logger.handlers)


def log_to_console(*, verbose: bool = False) -> None:
    """fedseg's lines to stderr, which ``flwr run --stream`` and the SuperLink's log show.

    As in ``fedseg-sim``, Flower's own INFO lines (every round's full history) only with ``run.verbose``.
    """
    logger = logging.getLogger("fedseg")
    logger.setLevel(logging.INFO)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    if _outside_hydra(logger, logging.StreamHandler):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
        logger.propagate = False  # Flower's root handlers would print every line a second time


def log_to_file(out: Path) -> None:
    """fedseg's lines, with time and source, to ``<out>/server.log`` (the job log Hydra would write)."""
    logger = logging.getLogger("fedseg")
    if _outside_hydra(logger, logging.FileHandler):
        out.mkdir(parents=True, exist_ok=True)
        job_log = logging.FileHandler(out / JOB_LOG)
        job_log.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logger.addHandler(job_log)
