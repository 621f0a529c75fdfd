"""Typed run settings and the one bridge between a Hydra config and Flower's flat run config.

Config is resolved once, at the entry point (``sim/``) or from ``context.run_config`` inside the
Flower apps; everything below takes these typed specs, never a ``DictConfig`` or a ``Context``.

Flower's run config is flat (``"federation.rounds": 5``) and holds only ``str``/``int``/``float``/
``bool``. Values that are none of those (``None``, lists) travel as JSON strings behind a prefix,
so :func:`from_run_config` restores exactly what :func:`to_run_config` was given.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

_JSON_PREFIX = "json:"
RunConfig = dict[str, "str | int | float | bool"]


def to_run_config(cfg: Mapping[str, Any]) -> RunConfig:
    """Flatten a nested (resolved) config into Flower's run config: dotted keys, scalar values."""
    flat: RunConfig = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if "." in str(key):
                raise ValueError(f"config key {name!r} contains '.', which the run config reserves")
            if isinstance(value, Mapping) and value:
                walk(value, name + ".")
            elif isinstance(value, bool | int | float) or (
                isinstance(value, str) and not value.startswith(_JSON_PREFIX)
            ):
                flat[name] = value
            else:  # None, lists, empty mappings, strings that look like our prefix
                flat[name] = _JSON_PREFIX + json.dumps(value)

    walk(cfg, "")
    return flat


def from_run_config(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`to_run_config`: nested dict with the original values."""
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        if isinstance(value, str) and value.startswith(_JSON_PREFIX):
            value = json.loads(value[len(_JSON_PREFIX):])
        node = nested
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


@dataclass(frozen=True)
class DataSpec:
    """Where frames come from and how they become (input, mask) pairs (conf/data/*.yaml)."""

    name: str = "synthetic"
    root: str | None = None
    tagset: str = "carla29"
    task: str = "driving"
    input: str = "rgb"
    image_size: tuple[int, int] = (96, 128)
    frames_per_vehicle: int | None = 48
    heldout_frames: int | None = 32
    partition: str = "vehicle"
    dirichlet_alpha: float = 0.5
    heldout_fraction: float = 0.1


@dataclass(frozen=True)
class ModelSpec:
    """UNet backbone choice (conf/model/*.yaml): ``name`` is a key of fedseg.models.BACKBONES."""

    name: str = "resnet34"
    encoder_weights: str | None = None
    decoder_channels: tuple[int, ...] | None = None


@dataclass(frozen=True)
class FederationSpec:
    """Fleet size, sampling and local training (the ``federation`` block of conf/config.yaml)."""

    num_clients: int = 4
    rounds: int = 5
    fraction_fit: float = 1.0
    min_fit_clients: int = 2
    local_epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-3
    optimizer: str = "adam"
    client_cpus: int = 1
    client_gpus: float = 0.0


@dataclass(frozen=True)
class StrategySpec:
    """Server aggregation (conf/strategy/*.yaml); extra keys go to the Flower strategy."""

    name: str = "fedavg"
    options: dict[str, Any] = field(default_factory=dict)


T = TypeVar("T")


def spec_from(cls: type[T], values: Mapping[str, Any] | None) -> T:
    """Build a spec dataclass from a config block, rejecting unknown keys with the valid ones."""
    values = dict(values or {})
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid: {sorted(names)}")
    for key, value in values.items():
        if isinstance(value, list):  # YAML lists -> tuples, so specs stay hashable and frozen
            values[key] = tuple(value)
    return cls(**values)


@dataclass(frozen=True)
class RunSettings:
    """Everything a run needs, typed; built once from the resolved Hydra config or the run config."""

    data: DataSpec
    model: ModelSpec
    federation: FederationSpec
    strategy: StrategySpec
    seed: int = 0
    device: str = "cpu"
    output_dir: str = "."
    experiment: str = "custom"
    # Feature blocks (privacy, secagg, compression, tracking, run, hardware) stay plain dicts: each
    # feature parses its own block into its own spec where it is used.
    blocks: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> RunSettings:
        strategy = dict(cfg.get("strategy") or {})
        blocks = {k: dict(cfg.get(k) or {}) for k in
                  ("privacy", "secagg", "compression", "tracking", "run", "hardware", "train")}
        return cls(
            data=spec_from(DataSpec, cfg.get("data")),
            model=spec_from(ModelSpec, cfg.get("model")),
            federation=spec_from(FederationSpec, cfg.get("federation")),
            strategy=StrategySpec(name=strategy.pop("name", "fedavg"), options=strategy),
            seed=int(cfg.get("seed", 0)),
            device=str(cfg.get("device", "cpu")),
            output_dir=str(cfg.get("output_dir", ".")),
            experiment=str(cfg.get("experiment_name", "custom")),
            blocks=blocks,
        )


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is passed to torch as is."""
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name
