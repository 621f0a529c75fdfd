"""``RunSettings``: a whole run, typed, parsed once from the resolved Hydra config or Flower's run config.

Every block is parsed by :func:`fedseg.config.parse_spec` (one error path: unknown key, wrong type,
out-of-range value, each naming the key, the value and what is valid); the pluggable blocks pick
their spec from their kind's registry (``PRIVACY``, ``SECAGG``, ``CODECS``, ``TRACKERS``), so code
further down receives ``settings.privacy`` as a ``DPSpec`` (say) and never compares names.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_args

from fedseg.compression import CompressionSpec, NoCompression, parse_compression
from fedseg.config import (
    DataSpec,
    EarlyStopSpec,
    FederationSpec,
    ModelSpec,
    RunConfig,
    RunOptions,
    StrategySpec,
    TrainSpec,
    from_run_config,
    parse_spec,
)
from fedseg.data import get_data_source
from fedseg.data.partition import PARTITIONS
from fedseg.labels import build_label_map
from fedseg.models import get_backbone
from fedseg.privacy import DPSpec, GradSampleMode, NoPrivacy, PrivacySpec, parse_privacy
from fedseg.secagg import NoSecAgg, SecAggSpec, parse_secagg
from fedseg.tracking import NoTracking, TrackingSpec, parse_tracking
from fedseg.training import OPTIMIZERS


@dataclass(frozen=True)
class RunSettings:
    """Everything a run needs, typed; built once at the entry point or once per run in each app."""

    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    federation: FederationSpec = field(default_factory=FederationSpec)
    strategy: StrategySpec = field(default_factory=StrategySpec)
    privacy: PrivacySpec = field(default_factory=NoPrivacy)
    secagg: NoSecAgg | SecAggSpec = field(default_factory=NoSecAgg)
    compression: CompressionSpec = field(default_factory=NoCompression)
    tracking: TrackingSpec = field(default_factory=NoTracking)
    run: RunOptions = field(default_factory=RunOptions)
    train: TrainSpec = field(default_factory=TrainSpec)
    early_stop: EarlyStopSpec = field(default_factory=EarlyStopSpec)
    compare: str | None = None  # another run's directory: plots/time_to_accuracy.png shows both runs
    seed: int = 0
    device: str = "cpu"
    output_dir: str = "."
    experiment: str = "custom"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> RunSettings:
        """Parse a resolved (nested) config; blocks it lacks take their defaults."""
        return cls(
            data=parse_spec(DataSpec, cfg.get("data"), key="data"),
            model=parse_spec(ModelSpec, cfg.get("model"), key="model"),
            federation=parse_spec(FederationSpec, cfg.get("federation"), key="federation"),
            strategy=StrategySpec.from_block(cfg.get("strategy")),
            privacy=parse_privacy(cfg.get("privacy")),
            secagg=parse_secagg(cfg.get("secagg")),
            compression=parse_compression(cfg.get("compression")),
            tracking=parse_tracking(cfg.get("tracking")),
            run=parse_spec(RunOptions, cfg.get("run"), key="run"),
            train=parse_spec(TrainSpec, cfg.get("train"), key="train"),
            early_stop=parse_spec(EarlyStopSpec, cfg.get("early_stop"), key="early_stop"),
            compare=None if cfg.get("compare") is None else str(cfg["compare"]),
            seed=_integer("seed", cfg.get("seed", 0)),
            device=str(cfg.get("device", "cpu")),
            output_dir=str(cfg.get("output_dir", ".")),
            experiment=str(cfg.get("experiment_name", "custom")),
        )

    def __post_init__(self) -> None:
        if self.federation.lr_schedule == "plateau" and self.early_stop.window is None:
            raise ValueError("federation.lr_schedule=plateau drops the lr where early_stop's rule fires: set "
                             "early_stop.window (e.g. early_stop.window=5)")
        if self.model.norm == "batch" and self.privacy.dp_model:
            raise ValueError(f"model.norm=batch cannot train under privacy={self.privacy.name} (BatchNorm mixes "
                             "frames, and noised running statistics wreck a model); valid: auto, group")

    @property
    def group_norm(self) -> bool:
        """Whether the run's UNet is the DP-compatible (GroupNorm) form: ``model.norm``, or the privacy mode."""
        return self.model.norm == "group" or (self.model.norm == "auto" and self.privacy.dp_model)

    @classmethod
    def from_run_config(cls, run_config: RunConfig) -> RunSettings:
        """Parse Flower's flat run config (what the apps receive)."""
        return cls.from_config(from_run_config(run_config))


def _integer(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}={value!r}: expected an integer")  # noqa: TRY004  (a user error)
    return value


@functools.lru_cache(maxsize=8)
def _parsed(items: tuple[tuple[str, Any], ...]) -> RunSettings:
    return RunSettings.from_run_config(dict(items))


def settings_of(run_config: Mapping[str, Any]) -> RunSettings:
    """The run's settings, parsed once per run config per process (apps and mods call this per message)."""
    return _parsed(tuple(sorted(run_config.items())))


def check_choices(settings: RunSettings) -> None:
    """Check every name the registries must know, and what the model needs of the data, before a run
    starts (a ValueError naming the key, the value and the valid choices)."""
    backbone = get_backbone(settings.model.name)
    get_data_source(settings.data.name)
    build_label_map(settings.data.tagset, settings.data.task)
    for key, value, valid in (("data.partition", settings.data.partition, PARTITIONS),
                              ("federation.optimizer", settings.federation.optimizer, OPTIMIZERS)):
        if value not in valid:
            raise ValueError(f"{key}={value}: valid: {sorted(valid)}")
    trainable = getattr(settings.privacy, "trainable", "all")
    if trainable != "all" and settings.model.init is None:
        logging.getLogger("fedseg").warning(
            f"fedseg: privacy.trainable={trainable} and no model.init: the vehicles will train only "
            f"{trainable} of a randomly initialised model. Pretrain on public data first (README, 'Privacy': "
            "fedseg-train experiment=dp_pretrain, then model.init=<its checkpoints/global.pt>), or set "
            "privacy.trainable=all")
    mode = settings.privacy.grad_sample_mode if isinstance(settings.privacy, DPSpec) else None
    if mode in backbone.unsupported_grad_sample_modes:
        modes = [m for m in get_args(GradSampleMode) if m not in backbone.unsupported_grad_sample_modes]
        raise ValueError(f"privacy.grad_sample_mode={mode} cannot give model {settings.model.name} per-sample "
                         f"gradients (Opacus); valid for it: {modes}")
    factor = 2**backbone.encoder_depth
    if any(side % factor for side in settings.data.image_size):
        raise ValueError(f"data.image_size={list(settings.data.image_size)} must be multiples of {factor} for "
                         f"model {settings.model.name} (its encoder halves the image "
                         f"{backbone.encoder_depth} times)")
