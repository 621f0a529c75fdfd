"""Experiment tracking: one registry of trackers; ``tracking=wandb`` logs to Weights & Biases.

W&B works with no account and no network in offline mode (``WANDB_MODE=offline``); the run is
stored under ``<run_dir>/wandb`` and can be uploaded later with ``wandb sync``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    def log_round(self, row: dict[str, Any]) -> None: ...
    def log_images(self, name: str, path: Path, step: int) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...


class NullTracker:
    """Tracking off: the run directory's files are the record."""

    def log_round(self, row: dict[str, Any]) -> None:
        pass

    def log_images(self, name: str, path: Path, step: int) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass


class WandbTracker:
    """Logs every metrics row (per-class IoU flattened) and example sheets to one W&B run."""

    def __init__(self, *, run_dir: Path, config: dict[str, Any], name: str, project: str = "fedseg",
                 entity: str | None = None, mode: str | None = None, tags: list[str] | None = None,
                 log_images: bool = True) -> None:
        import wandb

        self._wandb = wandb
        self._images = log_images
        self.run = wandb.init(project=project, entity=entity, mode=mode, dir=str(run_dir), name=name,
                              config=config, tags=list(tags or []), reinit="finish_previous")

    def log_round(self, row: dict[str, Any]) -> None:
        flat = {k: v for k, v in row.items() if v is not None and not isinstance(v, dict)}
        for group in ("per_class_iou", "client_epsilon"):
            for name, value in (row.get(group) or {}).items():
                if value is not None:
                    flat[f"{group}/{name}"] = value
        self.run.log(flat, step=int(row["round"]), commit=True)  # a round is complete: flush it now

    def log_images(self, name: str, path: Path, step: int) -> None:
        if self._images:
            # Rounds are committed as they end, so images go into the run's summary and its next step.
            image = self._wandb.Image(str(path), caption=f"round {step}")
            self.run.summary[name] = image
            self.run.log({name: image})

    def finish(self, summary: dict[str, Any]) -> None:
        for key, value in summary.items():
            if not isinstance(value, dict | list):
                self.run.summary[key] = value
        self.run.finish()


TRACKERS = ("none", "wandb")


def make_tracker(options: dict[str, Any], *, run_dir: Path, config: dict[str, Any], name: str) -> Tracker:
    """Build the tracker named by ``options['name']`` (conf/tracking/*.yaml)."""
    options = dict(options)
    kind = options.pop("name", "none")
    if kind == "none":
        return NullTracker()
    if kind == "wandb":
        return WandbTracker(run_dir=run_dir, config=config, name=name, **options)
    raise ValueError(f"unknown tracking {kind!r}; valid: {list(TRACKERS)}")
