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
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

_JSON_PREFIX = "json:"
RunConfig = dict[str, "str | int | float | bool"]


def conf_dir() -> Path:
    """fedseg's Hydra configs: ``fedseg/conf`` inside an installed wheel; the top-level ``conf/`` beside
    this package in a checkout (an editable install) or a Flower app bundle built from one."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"{package / 'conf' / 'config.yaml'}: missing, and no conf/ beside {package}: "
                            "reinstall fedseg (its wheel ships the configs)")


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


# ---- one spec parser, one error path -------------------------------------------------------------

def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None) -> Any:
    """A dataclass field whose numeric value :func:`parse_spec` checks against these bounds."""
    limits = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return field(default=default, metadata={"bounds": limits})


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BOUND_OK = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b,
             "lt": lambda v, b: v < b}


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


class _Mismatch(Exception):
    """A value that does not have a field's type (caught by parse_spec, which names the key)."""


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (int -> float, list -> tuple); raises ``_Mismatch`` if it is not one."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (types.UnionType, typing.Union):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is typing.Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _Mismatch
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(args) != len(value):
            raise _Mismatch
        return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"parse_spec: unsupported field type {tp!r}")


def _check_bounds(key: str, value: Any, limits: Mapping[str, float]) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    failed = [f"{_BOUND_TEXT[k]} {b:g}" for k, b in limits.items() if not _BOUND_OK[k](value, b)]
    if failed or (isinstance(value, float) and math.isnan(value)):
        valid = " and ".join(f"{_BOUND_TEXT[k]} {b:g}" for k, b in limits.items())
        raise ValueError(f"{key}={value!r} is out of range: must be {valid}")


T = TypeVar("T")


def parse_spec(cls: type[T], values: Mapping[str, Any] | None, *, key: str | None = None) -> T:
    """Build the frozen dataclass ``cls`` from a config block: the one place settings are checked.

    Errors (all ``ValueError``, one line) name the key, the value and what is valid: unknown keys
    (listing the valid ones), a value of the wrong type (``federation.rounds='abc'``), a number out of
    the range its field declares with :func:`bounded`, and whatever ``cls.__post_init__`` rejects.
    """
    key = cls.__name__ if key is None else key  # "": top-level keys (a primary config of its own)
    values = dict(values or {})
    names = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown {key or 'top-level'} keys {unknown}; valid: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        where = f"{key}.{name}" if key else name
        try:
            values[name] = _coerce(value, hints[name])
        except _Mismatch:
            raise ValueError(f"{where}={value!r}: expected {_type_name(hints[name])}") from None
        _check_bounds(where, values[name], names[name].metadata.get("bounds", {}))
    return cls(**values)


def parse_choice(registry: Mapping[str, type[T]], block: Mapping[str, Any] | None, *, key: str,
                 default: str) -> T:
    """The spec named by ``block['name']`` in ``registry``, built from the rest of the block."""
    values = dict(block or {})
    name = values.pop("name", default)
    if name not in registry:
        raise ValueError(f"{key}={name}: valid: {list(registry)}")
    return parse_spec(registry[name], values, key=key)


def spec_block(spec: Any) -> dict[str, Any]:
    """A spec back as its config block (``name`` first, as in conf/): for summaries and run configs."""
    name = getattr(spec, "name", None)
    body = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(spec).items()}
    return {"name": name, **body} if name is not None else body


# ---- the core blocks ------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataSpec:
    """Where frames come from and how they become (input, mask) pairs (conf/data/*.yaml)."""

    name: str = "synthetic"
    root: str | None = None
    tagset: str = "carla29"
    task: str = "driving"
    input: Literal["rgb", "seg"] = "rgb"
    image_size: tuple[int, int] = (96, 128)
    frames_per_vehicle: int | None = bounded(48, ge=1)
    heldout_frames: int | None = bounded(32, ge=1)
    partition: str = "vehicle"
    dirichlet_alpha: float = bounded(0.5, gt=0)
    heldout_fraction: float = bounded(0.1, gt=0, lt=1)


# Which parameters local training updates (``privacy.trainable``; fedseg.models.set_trainable).
TrainablePart = Literal["all", "decoder", "norm", "head"]


@dataclass(frozen=True)
class ModelSpec:
    """UNet backbone choice (conf/model/*.yaml): ``name`` is a key of fedseg.models.BACKBONES."""

    name: str = "resnet34"
    encoder_weights: str | None = None
    decoder_channels: tuple[int, ...] | None = None
    encoder_depth: int | None = None  # encoder stages feeding the decoder; None: the registry's (fedseg-search)
    # The initial global model: a checkpoint (``<run dir>/checkpoints/global.pt`` of fedseg-train or
    # fedseg-sim, e.g. public pretraining) whose weights replace the random initialisation.
    init: str | None = None
    # Normalization layers: "batch" (the registry's BatchNorm), "group" (GroupNorm, the DP-compatible
    # form: per-frame gradients need it), "auto" (group where the privacy mode needs it, else batch).
    norm: Literal["auto", "batch", "group"] = "auto"


# Per-frame augmentations a run may list in federation.augment (fedseg.training applies them).
Augmentation = Literal["hflip", "scale", "color"]
AUGMENTATIONS: tuple[Augmentation, ...] = typing.get_args(Augmentation)


@dataclass(frozen=True)
class FederationSpec:
    """Fleet size, sampling and local training (the ``federation`` block of conf/config.yaml)."""

    num_clients: int = bounded(4, ge=1)
    rounds: int = bounded(5, ge=1)
    fraction_fit: float = bounded(1.0, gt=0, le=1)
    min_fit_clients: int = bounded(2, ge=1)
    local_epochs: int = bounded(1, ge=1)
    batch_size: int = bounded(8, ge=1)
    lr: float = bounded(1e-3, gt=0)
    optimizer: str = "adam"
    client_cpus: int = bounded(1, ge=1)
    client_gpus: float = bounded(0.0, ge=0)
    # CPUs Ray may hand out (its num_cpus; None: the machine's cores). Ray runs ray_cpus // client_cpus
    # vehicles at once: above the core count, more vehicles train at once than there are cores.
    ray_cpus: int | None = bounded(None, ge=1)
    # Seconds the server waits for a round's replies; a vehicle silent that long counts as failed.
    round_timeout: float | None = bounded(None, gt=0)
    # An update whose norm exceeds this many times the round's lower median is rejected (None: off).
    max_norm_ratio: float | None = bounded(10.0, gt=1)
    # The most frames one vehicle's reply may weigh (its self-reported count is clipped to it); None:
    # the largest partition the server knows, else every vehicle weighs the same (fedseg/server/replies.py).
    max_examples: int | None = bounded(None, ge=1)
    # The vehicles' lr across rounds (fedseg.training.scheduled_lr; fedseg-train follows it by epoch):
    # constant, cosine from lr down to lr * lr_final, step (lr * lr_final for the last third), or plateau
    # (lr * lr_final from where early_stop's rule first fires; the run stops where it fires again).
    lr_schedule: Literal["constant", "cosine", "step", "plateau"] = "constant"
    lr_final: float = bounded(0.1, gt=0, le=1)
    # Per-frame training augmentation, vehicles and fedseg-train alike (fedseg.training.AUGMENTATIONS).
    augment: tuple[Augmentation, ...] = ()
    # BatchNorm kept on each vehicle across rounds (fedseg/clients/client_app.py): none; stats (running
    # mean/var, SiloBN); affine (stats and the BN weight/bias, FedBN). The server evaluates with the
    # frame-weighted mean of what the vehicles send.
    local_norm: Literal["none", "stats", "affine"] = "none"
    # An equal global batch (Goyal et al. 2017; Lin et al. 2020): each vehicle trains at batch_size split
    # over the vehicles a round samples, so a round's K vehicles together take batch_size frames a step,
    # as fedseg-train does, and K times the steps of batch_size each (``local_batch_size``).
    equal_global_batch: bool = False
    # fedseg-sim only: simulation nodes carrying the fleet (fedseg/vehicle_pool.py). None: one per vehicle
    # when every vehicle trains each round, else as many as a round samples; a number: that many, pooled.
    sim_nodes: int | None = bounded(None, ge=1)

    @property
    def lr_drops(self) -> int:
        """Times ``early_stop``'s rule drops the lr before it stops the run (``lr_schedule=plateau``: once)."""
        return int(self.lr_schedule == "plateau")

    @property
    def local_batch_size(self) -> int:
        """Frames a vehicle's step takes: ``batch_size``, or its share of it under ``equal_global_batch``."""
        return max(1, self.batch_size // self.vehicles_per_round) if self.equal_global_batch else self.batch_size

    @property
    def vehicles_per_round(self) -> int:
        """Vehicles Flower's FedAvg family samples each round: ``max(int(n * fraction), min_fit)``."""
        return max(int(self.num_clients * self.fraction_fit), self.min_fit_clients)

    def pool_size(self) -> int | None:
        """``fedseg-sim``'s simulation nodes when they carry a pooled fleet, else None (one node per vehicle).

        A ``ValueError`` naming ``federation.sim_nodes`` when a round's vehicles would not fit or it
        exceeds the fleet."""
        if self.sim_nodes is None:
            return self.vehicles_per_round if self.vehicles_per_round < self.num_clients else None
        if not self.vehicles_per_round <= self.sim_nodes <= self.num_clients:
            raise ValueError(f"federation.sim_nodes={self.sim_nodes}: a round samples {self.vehicles_per_round} "
                             f"of {self.num_clients} vehicles, each on its own node; valid: "
                             f"{self.vehicles_per_round}..{self.num_clients}, or null")
        return self.sim_nodes


@dataclass(frozen=True)
class StrategySpec:
    """Server aggregation (conf/strategy/*.yaml); ``options`` go to the Flower strategy as they are."""

    name: str = "fedavg"
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_block(cls, block: Mapping[str, Any] | None) -> StrategySpec:
        options = dict(block or {})
        return cls(name=str(options.pop("name", "fedavg")), options=options)


@dataclass(frozen=True)
class RunOptions:
    """How a run reports itself (the ``run`` block)."""

    progress: bool = True
    example_images: int = bounded(4, ge=0)
    verbose: bool = False


@dataclass(frozen=True)
class TrainSpec:
    """``fedseg-train`` (the ``train`` block): epochs of the centralized baseline."""

    epochs: int | None = bounded(None, ge=1)  # None: rounds x local_epochs of the federated run


@dataclass(frozen=True)
class EarlyStopSpec:
    """Stop at convergence (the ``early_stop`` block), fedseg-sim by round and fedseg-train by epoch alike
    (:func:`fedseg.quality.converged_at`)."""

    # Stop once held-out mIoU has not risen more than min_delta above the best before the last `window`
    # rounds (epochs); None: run every round. federation.rounds / train.epochs stay the cap.
    window: int | None = bounded(None, ge=1)
    min_delta: float = bounded(0.005, ge=0)
    # What `window` counts: rounds (fedseg-sim) and epochs (fedseg-train), or sequential optimizer steps
    # (fleet time: a round's busiest vehicle's steps, an epoch's steps), the same work in both tools.
    unit: Literal["round", "step"] = "round"


def check_ray_address(address: str, *, key: str) -> None:
    """``address`` names a Ray cluster's head as Ray's own drivers do (``HOST:PORT``, or ``auto``: the one
    started on this machine); a one-line ``ValueError`` naming ``key`` otherwise. A Ray Client address
    (``ray://``) is refused: Flower's simulation calls ``ray.init`` with arguments Ray Client does not take,
    and its driver must run on a node of the cluster."""
    host, _, port = address.rpartition(":")
    if "://" in address:
        raise ValueError(f"{key}={address}: Ray Client addresses are not supported; run fedseg-sim on a node of "
                         "the cluster (the head) with its GCS address, e.g. HEAD:6379")
    if address != "auto" and not (host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{key}={address!r}: expected HOST:PORT of the cluster's head (e.g. 10.0.0.5:6379) or auto")


@dataclass(frozen=True)
class RaySpec:
    """Where the simulation runs (the ``ray`` block): ``address`` of an existing Ray cluster, or None."""

    address: str | None = None

    def __post_init__(self) -> None:
        if self.address is not None:
            check_ray_address(self.address, key="ray.address")


DEVICES = ("cpu", "cuda", "cuda:N", "auto")


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cpu``, ``cuda`` and ``cuda:N`` as they are,
    if this machine has that device (else a one-line ``ValueError`` naming ``device``)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if name == "cpu":
        return name
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"device={name!r}; valid: {list(DEVICES)}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(index or 0) >= count:
        raise ValueError(f"device={name}: this machine has {count} CUDA device(s) (torch "
                         f"{torch.__version__}, torch.cuda.is_available()={torch.cuda.is_available()}); "
                         "use device=cpu or device=auto")
    return name
