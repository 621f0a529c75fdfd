"""Experiment tracking: one registry of trackers (``TRACKERS``); ``tracking=wandb`` logs to Weights & Biases.

What a W&B user expects of a run: every metrics row as a step; a few held-out frames each round as
segmentation overlays (prediction and ground truth masks, one toggle per class name); the final
checkpoint as a ``model`` artifact carrying its backbone, classes and mIoU; and the runs of one
Hydra multirun (``-m``) in one group (the entry point sets ``tracking.group`` to the sweep).

W&B works with no account and no network in offline mode (``WANDB_MODE=offline``); the run is
stored under ``<run_dir>/wandb`` and can be uploaded later with ``wandb sync``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import numpy as np

from fedseg.config import parse_choice
from fedseg.labels import IGNORE_INDEX


@dataclass(frozen=True)
class Predictions:
    """A few held-out frames of one round: what a segmentation overlay shows."""

    images: np.ndarray  # (N, H, W, 3) uint8 camera frames
    labels: np.ndarray  # (N, H, W) uint8 ground truth class ids, IGNORE_INDEX where unlabelled
    preds: np.ndarray  # (N, H, W) the model's class ids
    class_names: tuple[str, ...]  # class id -> name


class Tracker(Protocol):
    run_id: str | None  # what a resumed run passes back to continue the same tracked run
    logs_predictions: bool  # whether log_predictions wants frames (the reporter predicts them only then)

    def log_round(self, row: dict[str, Any]) -> None: ...
    def log_predictions(self, predictions: Predictions, step: int) -> None: ...
    def log_model(self, path: Path, metadata: dict[str, Any]) -> None: ...
    def log_plot(self, key: str, path: Path) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...


class NullTracker:
    """Tracking off: the run directory's files are the record."""

    run_id: str | None = None
    logs_predictions = False

    def log_round(self, row: dict[str, Any]) -> None:
        pass

    def log_predictions(self, predictions: Predictions, step: int) -> None:
        pass

    def log_model(self, path: Path, metadata: dict[str, Any]) -> None:
        pass

    def log_plot(self, key: str, path: Path) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass


class WandbTracker:
    """Logs every metrics row (per-class IoU flattened), held-out overlays and the final model to one W&B run."""

    def __init__(self, *, run_dir: Path, config: dict[str, Any], name: str, project: str = "fedseg",
                 entity: str | None = None, mode: Literal["online", "offline", "disabled"] | None = None,
                 group: str | None = None, tags: list[str] | None = None, log_images: bool = True,
                 log_model: bool = True, resume_id: str | None = None) -> None:
        import wandb

        self._wandb = wandb
        self.logs_predictions = log_images
        self._log_model = log_model
        self.run = wandb.init(project=project, entity=entity, mode=mode, dir=str(run_dir), name=name,
                              group=group, config=config, tags=list(tags or []), reinit="finish_previous",
                              id=resume_id, resume="allow" if resume_id else None)
        self.run_id: str | None = self.run.id

    def log_round(self, row: dict[str, Any]) -> None:
        flat = {k: v for k, v in row.items() if v is not None and not isinstance(v, dict)}
        for group in ("per_class_iou", "client_epsilon"):
            for name, value in (row.get(group) or {}).items():
                if value is not None:
                    flat[f"{group}/{name}"] = value
        self.run.log(flat, step=int(row["round"]), commit=True)  # a round is complete: flush it now

    def log_predictions(self, predictions: Predictions, step: int) -> None:
        """Each frame with its prediction and ground truth as W&B masks, so the UI toggles them per class.

        Logged uncommitted at ``step``: the round's row (:meth:`log_round`) commits the step with it.
        """
        classes = dict(enumerate(predictions.class_names))
        images = [self._wandb.Image(image, caption=f"held-out frame {i}, round {step}", masks={
            "prediction": {"mask_data": pred, "class_labels": classes},
            "ground_truth": {"mask_data": label, "class_labels": classes | {IGNORE_INDEX: "unlabelled"}},
        }) for i, (image, label, pred) in enumerate(zip(predictions.images, predictions.labels, predictions.preds))]
        self.run.log({"predictions": images}, step=step, commit=False)

    def log_model(self, path: Path, metadata: dict[str, Any]) -> None:
        """The checkpoint at ``path`` as the run's ``model`` artifact (a resumed run adds a version)."""
        if self._log_model:
            artifact = self._wandb.Artifact(f"model-{self.run.id}", type="model", metadata=metadata)
            artifact.add_file(str(path), name=path.name)
            self.run.log_artifact(artifact, aliases=["latest"])

    def log_plot(self, key: str, path: Path) -> None:
        """The image at ``path`` (a plot the run drew) under ``key``, after the run's last round."""
        self.run.log({key: self._wandb.Image(str(path))})

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
    group: str | None = None  # None: a run of its own; a Hydra multirun's entry point sets its sweep
    tags: tuple[str, ...] = ()
    log_images: bool = True  # held-out overlays each round
    log_model: bool = True  # the final checkpoint as a model artifact

    def build(self, *, run_dir: Path, config: dict[str, Any], name: str, resume_id: str | None = None) -> Tracker:
        """The tracker; ``resume_id`` continues that W&B run (a resumed fedseg run)."""
        return WandbTracker(run_dir=run_dir, config=config, name=name, project=self.project,
                            entity=self.entity, mode=self.mode, group=self.group, tags=list(self.tags),
                            log_images=self.log_images, log_model=self.log_model, resume_id=resume_id)


TrackingSpec = NoTracking | WandbSpec
# The tracker registry, mirrored one to one by conf/tracking/*.yaml.
TRACKERS: dict[str, type[TrackingSpec]] = {"none": NoTracking, "wandb": WandbSpec}


def parse_tracking(block: Mapping[str, Any] | None) -> TrackingSpec:
    """The ``tracking`` block as its registry spec."""
    return parse_choice(TRACKERS, block, key="tracking", default="none")
