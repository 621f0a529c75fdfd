"""A vehicle knows only itself: its node config, and the loading of only its own frames.

A SuperNode's ``--node-config`` names the vehicle's data in one of two ways:

* ``data-root=DIR``: a CARLA-format folder on the box: ``DIR/CameraRGB`` + ``DIR/CameraSeg``, or
  ``DIR/<vehicle>/...`` with one vehicle folder (several: pick one with ``vehicle=NAME``). The vehicle
  trains on every frame there (a ``heldout``/``val``/``test`` folder is never trained on) and checks
  each file once, with the errors of ``data=carla``. ``partition-id``, if given, is then only the
  vehicle's number (seeds, privacy state file).
* ``partition-id=i num-partitions=n``: share ``i`` of the run's data (the embedded synthetic fleet,
  or ``data.root``), split as ``fedseg-sim`` splits it; ``n`` must equal ``federation.num_clients``.

Optionally ``hardware=<profile>`` (``conf/hardware``; sets the training threads to the profile's) or
``threads=N``. The vehicle's own privacy (:mod:`fedseg.deploy.floor`): ``ledger=FILE`` (its lifetime
ledger; ``fedseg-vehicle`` always sets one, and a node config with ``ledger`` or ``data-root`` is a deployed
vehicle, whose DP-SGD noise comes from the OS's entropy), ``require-dp=true``, ``min-noise-multiplier=X``,
``max-epsilon-per-run=E``, ``lifetime-epsilon=E``.

The server loads only its held-out set (:func:`load_heldout`). Neither builds the
fleet: a vehicle of the synthetic fleet renders its own frames the first time it is built (then
they are cached on disk), and the server's partition sizes follow from the config.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedseg.config import DataSpec
from fedseg.data import FleetData, FleetFrames, fleet_frames, get_data_source, make_dataset
from fedseg.data.carla import HELDOUT_NAMES, SegmentationDataset, discover, validate
from fedseg.data.frames import Frame
from fedseg.deploy.floor import PrivacyFloor, VehicleOwnedTrainer
from fedseg.deploy.ledger import PrivacyLedger
from fedseg.errors import DataError
from fedseg.labels import build_label_map
from fedseg.privacy import LocalTrainer
from fedseg.search.hardware import HARDWARE_PROFILES
from fedseg.settings import RunSettings

if TYPE_CHECKING:
    from flwr.app import Context


@dataclass(frozen=True)
class NodeSpec:
    """What ``--node-config`` says about this vehicle (keys with dashes, as Flower spells them)."""

    partition_id: int | None = None
    num_partitions: int | None = None
    data_root: str | None = None
    vehicle: str | None = None
    hardware: str | None = None
    threads: int | None = None
    ledger: str | None = None
    require_dp: bool = False
    min_noise_multiplier: float | None = None
    max_epsilon_per_run: float | None = None
    lifetime_epsilon: float | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSpec:
        """Parse a node config; an unknown key or a wrong type is a one-line ``ValueError``."""
        names = {f.name.replace("_", "-"): f.name for f in fields(cls)}
        unknown = sorted(set(node_config) - set(names))
        if unknown:
            raise ValueError(f"unknown node config keys {unknown}; valid: {sorted(names)}")
        values: dict[str, Any] = {}
        for key, value in node_config.items():
            if key in _FLOOR_NUMBERS or key == "require-dp":
                values[names[key]] = _floor_value(key, value)
                continue
            numeric = key in ("partition-id", "num-partitions", "threads")
            if numeric and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"node config {key}={value!r}: expected an integer >= 0")
            values[names[key]] = value if numeric else str(value)
        spec = cls(**values)
        if spec.hardware is not None and spec.hardware not in HARDWARE_PROFILES:
            raise ValueError(f"node config hardware={spec.hardware}: valid: {list(HARDWARE_PROFILES)}")
        return spec

    @property
    def owns_privacy(self) -> bool:
        """A deployed vehicle (a ledger or its own data-root): its floor, its ledger, noise from the OS."""
        return self.ledger is not None or self.data_root is not None

    def privacy_floor(self) -> PrivacyFloor:
        return PrivacyFloor(require_dp=self.require_dp, min_noise_multiplier=self.min_noise_multiplier,
                            max_epsilon_per_run=self.max_epsilon_per_run, lifetime_epsilon=self.lifetime_epsilon)

    def guard(self, trainer: LocalTrainer, *, run: int, server_round: int, num_examples: int,
              run_privacy: str) -> LocalTrainer:
        """``trainer`` under this vehicle's own privacy if it owns it (deployment), else ``trainer`` itself."""
        if not self.owns_privacy:
            return trainer  # simulation: seeded noise, the run's settings
        ledger = PrivacyLedger(Path(self.ledger).expanduser()) if self.ledger is not None else None
        return VehicleOwnedTrainer(trainer, self.privacy_floor(), ledger, run=run, server_round=server_round,
                                   num_examples=num_examples, run_privacy=run_privacy)

    def vehicle_id(self, fallback: int) -> int:
        """The vehicle's number: its ``partition-id``, else ``fallback`` (e.g. Flower's node id)."""
        return self.partition_id if self.partition_id is not None else fallback

    def torch_threads(self, default: int) -> int:
        """``threads``, else the hardware profile's threads, else ``default``."""
        if self.threads:
            return self.threads
        if self.hardware is not None:
            return HARDWARE_PROFILES[self.hardware].threads
        return max(1, default)


_FLOOR_NUMBERS = ("min-noise-multiplier", "max-epsilon-per-run", "lifetime-epsilon")


def _floor_value(key: str, value: Any) -> bool | float:
    """A privacy-floor value: ``require-dp`` a boolean, the bounds numbers > 0 (one-line ``ValueError``)."""
    if key == "require-dp":
        if not isinstance(value, bool):
            raise ValueError(f"node config require-dp={value!r}: expected true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"node config {key}={value!r}: expected a number > 0")
    return float(value)


def vehicle_id(context: Context) -> int:
    """The vehicle's number (its seeds, its privacy and residual files): its node config's
    ``partition-id``, else Flower's node id folded into 31 bits (an edge box with its own data-root)."""
    return NodeSpec.from_node_config(context.node_config).vehicle_id(context.node_id % 2**31)


@dataclass(frozen=True)
class VehicleData:
    """One vehicle's training frames and the number of classes its model predicts."""

    dataset: SegmentationDataset
    num_classes: int


def own_frames(root: Path, vehicle: str | None = None) -> list[Frame]:
    """The frames of the one vehicle folder under ``root`` (``DataError`` naming what is wrong)."""
    sources = discover(root)
    is_camera_folder = (root / "CameraRGB").is_dir() or (root / "CameraSeg").is_dir()
    if not is_camera_folder:  # a folder of vehicles: a held-out split is never trained on
        sources = {name: frames for name, frames in sources.items() if name.lower() not in HELDOUT_NAMES}
    if vehicle is not None:
        if vehicle not in sources:
            raise DataError(f"{root}: no vehicle folder {vehicle!r}; found {sorted(sources)}")
        return sources[vehicle]
    if len(sources) != 1:
        raise DataError(f"{root}: holds {len(sources)} vehicle folders ({', '.join(sorted(sources))}); "
                        "name this vehicle's with --node-config vehicle=NAME")
    return next(iter(sources.values()))


@functools.lru_cache(maxsize=2)
def _fleet(spec: DataSpec, num_clients: int, seed: int) -> FleetFrames:
    """The run's fleet, described once per process: a Ray actor builds many vehicles, and a folder's
    listing or an ``iid``/``dirichlet`` split (which names the whole fleet's frames) is done once."""
    return fleet_frames(spec, num_clients=num_clients, seed=seed)


def _partition(spec: DataSpec, num_clients: int, seed: int, partition_id: int) -> list[Frame]:
    """Share ``partition_id`` of the run's data, split exactly as ``fedseg-sim`` splits it, made ready
    (the synthetic fleet renders this vehicle's frames only, if not cached yet)."""
    if not 0 <= partition_id < num_clients:
        raise ValueError(f"partition-id {partition_id} outside 0..{num_clients - 1}")
    fleet = _fleet(spec, num_clients, seed)
    frames = fleet.client(partition_id)
    fleet.ready(frames)
    return frames


def load_vehicle(settings: RunSettings, node: NodeSpec, default_partition: int = 0) -> VehicleData:
    """This vehicle's frames only (once per process): its own folder, or its share of the run's data.

    Files are checked once here when they come from a user's folder (``data-root``, or ``data=carla``):
    a bad one stops the vehicle with the file's name before it trains.
    """
    return _load_vehicle(settings.data, settings.federation.num_clients, settings.seed, node, default_partition)


@functools.lru_cache(maxsize=4)  # keyed on what it reads of the settings (a Ray actor builds many vehicles)
def _load_vehicle(spec: DataSpec, num_clients: int, seed: int, node: NodeSpec,
                  default_partition: int) -> VehicleData:
    if node.data_root is not None:
        frames, check = own_frames(Path(node.data_root).expanduser(), node.vehicle), True
    else:
        if node.num_partitions is not None and node.num_partitions != num_clients:
            raise ValueError(f"node config num-partitions={node.num_partitions} but the run has "
                             f"federation.num_clients={num_clients}; they must agree")
        frames = _partition(spec, num_clients, seed, node.vehicle_id(default_partition))
        check = get_data_source(spec.name).check_files
    if check:
        validate(frames, spec.tagset)
    label_map = build_label_map(spec.tagset, spec.task)
    return VehicleData(make_dataset(spec, frames, label_map), label_map.num_classes)


def load_heldout(settings: RunSettings) -> tuple[FleetData, list[int] | None]:
    """The server's data: only the held-out set (``clients`` empty), and the vehicles' partition sizes.

    The sizes (SecAgg+'s default ``max_weight`` needs them) come from the config for the synthetic
    fleet and from listing files for a folder; they are ``None`` when the server's ``data.root``
    holds only a held-out folder (the vehicles' frames are elsewhere).
    """
    spec, fed = settings.data, settings.federation
    fleet = fleet_frames(spec, num_clients=fed.num_clients, seed=settings.seed)
    heldout = fleet.heldout()
    fleet.ready(heldout)
    if get_data_source(spec.name).check_files:
        validate(heldout, spec.tagset)
    label_map = build_label_map(spec.tagset, spec.task)
    return FleetData([], make_dataset(spec, heldout, label_map), label_map), fleet.sizes()
