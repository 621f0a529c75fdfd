"""What every Hydra entry point shares: config resolution once, and errors a user can act on."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedseg.checkpoints import check_start_checkpoint
from fedseg.config import conf_dir
from fedseg.errors import DataError, RunFailed
from fedseg.labels import build_label_map
from fedseg.settings import RunSettings

CONF_DIR = str(conf_dir())


def resolve(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers, with the Hydra run directory as ``output_dir``; under a
    multirun (``-m``), a tracker's unset ``group`` is the sweep directory, so its runs are one group."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert isinstance(container, dict)
    resolved = {str(key): value for key, value in container.items()}
    hydra = HydraConfig.get()
    resolved["output_dir"] = hydra.runtime.output_dir
    tracking = resolved.get("tracking")
    if hydra.mode == RunMode.MULTIRUN and isinstance(tracking, dict) and "group" in tracking \
            and not tracking["group"]:
        tracking["group"] = str(hydra.sweep.dir)
    return resolved


def check_start_file(settings: RunSettings, *, resume: str | None = None) -> None:
    """The checkpoint the run starts from (``resume=DIR``'s, else ``model.init``) against the run's model
    and data: a mismatch is one line naming the file, before any frame is rendered or Ray starts."""
    if resume:
        path, key = Path(resume).expanduser() / "checkpoints" / "global.pt", "resume"
    elif settings.model.init:
        path, key = Path(settings.model.init), "model.init"
    else:
        return
    check_start_checkpoint(path, key=key, model=settings.model, data=settings.data,
                           label_map=build_label_map(settings.data.tagset, settings.data.task),
                           group_norm=settings.group_norm)


def user_errors(prog: str) -> Callable:
    """Turn bad input (data, config values) into one line on stderr and exit status 2, a failed run
    (``RunFailed``: e.g. too few vehicles answered a round) into one line and exit status 1; no traceback.

    Programming errors still raise with their traceback: only errors a user can act on are caught.
    """
    from omegaconf.errors import MissingMandatoryValue

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            logging.captureWarnings(True)  # warnings reach the job log too, not only stderr
            # Opacus reports every hooked layer at INFO: thousands of lines a run, none actionable.
            logging.getLogger("opacus").setLevel(logging.WARNING)
            try:
                return fn(*args, **kwargs)
            except (DataError, ValueError, KeyError, FileNotFoundError, MissingMandatoryValue) as err:
                msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                if isinstance(err, MissingMandatoryValue) and getattr(err, "full_key", None):
                    msg = f"{err.full_key} is required (set it on the command line: {err.full_key}=...)"
                logging.getLogger(prog).debug("user error", exc_info=True)
                print(f"{prog}: error: {msg}", file=sys.stderr)
                sys.exit(2)
            except RunFailed as err:
                logging.getLogger(prog).debug("run failed", exc_info=True)
                print(f"{prog}: error: {err}", file=sys.stderr)
                sys.exit(1)

        return run

    return wrap
