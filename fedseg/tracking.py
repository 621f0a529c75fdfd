"""Experiment tracking: one registry of trackers (``TRACKERS``); ``tracking=wandb`` logs to Weights & Biases.

W&B works with no account and no network in offline mode (``WANDB_MODE=offline``); the run is
stored under ``<run_dir>/wandb`` and can be uploaded later with ``wandb sync``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from fedseg.config import parse_choice


class Tracker(Protocol):
    run_id: str | None  # what a resumed run passes back to continue the same tracked run

    def log_round(self, row: dict[str, Any]) -> None: ...
    def log_images(self, name: str, path: Path, step: int) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...


class NullTracker:
    """Tracking off: the run directory's files are the record."""

    run_id: str | None = None

    def log_round(self, row: dict[str, Any]) -> None:
        pass

    def log_images(self, name: str, path: Path, step: int) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass


class WandbTracker:
    """Logs every metrics row (per-class IoU flattened) and example sheets to one W&B run."""

    def __init__(self, *, run_dir: Path, config: dict[str, Any], name: str, project: str = "fedseg",
                 entity: str | None = None, mode: Literal["online", "offline", "disabled"] | None = None,
                 tags: list[str] | None = None, log_images: bool = True, resume_id: str | None = None) -> None:
        import wandb

        self._wandb = wandb
        self._images = log_images
        self.run = wandb.init(project=project, entity=entity, mode=mode, dir=str(run_dir), name=name,
                              config=config, tags=list(tags or []), reinit="finish_previous",
                              id=resume_id, resume="allow" if resume_id else None)
        self.run_id: str | None = self.run.id

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


@dataclass(frozen=True)
class NoTracking:
    """``tracking=none``: the run directory's files are the record."""

    name: ClassVar[str] = "none"

    def build(self, *, run_dir: Path, config: dict[str, Any], name: str, resume_id: str | None = None) -> Tracker:
        return NullTracker()


@dataclass(frozen=True)
class WandbSpec:
    """``tracking=wandb`` (conf/tracking/wandb.yaml): one W&B run per fedseg run."""

    name: ClassVar[str] = "wandb"

    project: str = "fedseg"
    entity: str | None = None
    mode: Literal["online", "offline", "disabled"] | None = None  # None: W&B's own default / WANDB_MODE
    tags: tuple[str, ...] = ()
    log_images: bool = True

    def build(self, *, run_dir: Path, config: dict[str, Any], name: str, resume_id: str | None = None) -> Tracker:
        """The tracker; ``resume_id`` continues that W&B run (a resumed fedseg run)."""
        return WandbTracker(run_dir=run_dir, config=config, name=name, project=self.project,
                            entity=self.entity, mode=self.mode, tags=list(self.tags),
                            log_images=self.log_images, resume_id=resume_id)


TrackingSpec = NoTracking | WandbSpec
# The tracker registry, mirrored one to one by conf/tracking/*.yaml.
TRACKERS: dict[str, type[TrackingSpec]] = {"none": NoTracking, "wandb": WandbSpec}


def parse_tracking(block: Mapping[str, Any] | None) -> TrackingSpec:
    """The ``tracking`` block as its registry spec."""
    return parse_choice(TRACKERS, block, key="tracking", default="none")
