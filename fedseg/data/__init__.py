"""Datasets: the embedded synthetic CARLA-like fleet and real CARLA-format folders.

Both end in the same loader (:mod:`fedseg.data.carla`): the synthetic generator writes CARLA's
camera format to a cache folder, so the code path that trains on embedded data is the one that
trains on a real CARLA collection. Each source is one entry of ``DATA_SOURCES``, named like its
``conf/data/<name>.yaml``; a new source is a function returning its :class:`FleetFrames` plus one
entry there. A fleet is described without reading a frame (:func:`fleet_frames`); a process makes
ready only the frames it uses (a vehicle its own, the server its held-out set), so the synthetic
fleet is rendered one vehicle at a time, as vehicles are first sampled (:mod:`fedseg.data.fleets`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedseg.config import DataSpec
from fedseg.data.carla import SegmentationDataset, load_fleet, validate
from fedseg.data.fleets import FleetFrames, LazySyntheticFleet, ListedFleet
from fedseg.data.frames import Frame
from fedseg.data.synthetic import FORMAT_VERSION, SyntheticFleet
from fedseg.errors import DataError
from fedseg.labels import LabelMap, build_label_map

__all__ = ["DATA_SOURCES", "DataSource", "FleetData", "FleetFrames", "describe_sizes",
           "fleet_frames", "get_data_source", "load_data", "make_dataset"]


@dataclass
class FleetData:
    """One dataset per vehicle plus the server's held-out set, sharing one label map."""

    clients: list[SegmentationDataset]
    heldout: SegmentationDataset
    label_map: LabelMap


@dataclass(frozen=True)
class DataSource:
    """One ``data.name`` (``conf/data/<name>.yaml``): how its fleet's frames are found or made."""

    frames: Callable[[DataSpec, int, int], FleetFrames]  # (spec, num_clients, seed) -> the fleet, unread
    check_files: bool  # decode every file up front (user data can be broken; generated data cannot)


def _carla_frames(spec: DataSpec, num_clients: int, seed: int) -> FleetFrames:
    """A CARLA-format tree the user points ``data.root`` at, listed (cheap) and split."""
    if not spec.root:
        raise DataError("data=carla needs data.root=DIR (a folder of <vehicle>/CameraRGB|CameraSeg)")
    root = Path(spec.root).expanduser()
    fleet = load_fleet(root, num_clients=num_clients, partition=spec.partition, alpha=spec.dirichlet_alpha,
                       heldout_fraction=spec.heldout_fraction, seed=seed, heldout_only=True)
    return ListedFleet(root, fleet, num_clients)


def _synthetic_frames(spec: DataSpec, num_clients: int, seed: int) -> FleetFrames:
    """The synthetic fleet, cached under a folder keyed by what shapes a vehicle's frames.

    The fleet size is not in the key: vehicle ``i``'s frames are the same in every fleet, so fleets
    of 10 and of 10,000 vehicles share the frames of vehicles 0-9.
    """
    per_vehicle, size = int(spec.frames_per_vehicle or 48), (int(spec.image_size[0]), int(spec.image_size[1]))
    params = {"format_version": FORMAT_VERSION, "frames_per_vehicle": per_vehicle, "image_size": list(size),
              "tagset": spec.tagset, "seed": seed}
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    base = Path(spec.root or Path.home() / ".cache" / "fedseg" / "synthetic").expanduser()
    frames = SyntheticFleet(base / f"lazy-{key}", per_vehicle, size, spec.tagset, seed)
    return LazySyntheticFleet(frames, num_clients, int(spec.heldout_frames or 32), partition=spec.partition,
                              alpha=spec.dirichlet_alpha, seed=seed)


# One entry per conf/data/<name>.yaml (a test keeps the two in step).
DATA_SOURCES: dict[str, DataSource] = {
    "synthetic": DataSource(_synthetic_frames, check_files=False),  # valid by construction
    "carla": DataSource(_carla_frames, check_files=True),
}


def get_data_source(name: str) -> DataSource:
    """The registered source ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
    if name not in DATA_SOURCES:
        raise ValueError(f"unknown dataset {name!r}; valid: {list(DATA_SOURCES)}")
    return DATA_SOURCES[name]


def fleet_frames(spec: DataSpec, *, num_clients: int, seed: int, check: bool = False,
                 progress: bool = False) -> FleetFrames:
    """``spec``'s fleet of ``num_clients`` vehicles, described without generating a frame.

    With ``check``, a source whose files can be broken (a user's folder) has every file of the fleet
    decoded now, so bad data fails at start, naming the file, instead of crashing a vehicle mid-round.
    """
    source = get_data_source(spec.name)
    fleet = source.frames(spec, num_clients, seed)
    if check and source.check_files:
        frames = [f for i in range(num_clients) for f in fleet.client(i)] + fleet.heldout()
        validate(frames, spec.tagset, progress=progress)
    return fleet


def make_dataset(spec: DataSpec, frames: Sequence[Frame], label_map: LabelMap) -> SegmentationDataset:
    """``frames`` as ``spec`` feeds them to a model (input variant, image size)."""
    size = (int(spec.image_size[0]), int(spec.image_size[1]))
    return SegmentationDataset(frames, label_map, input_variant=spec.input, image_size=size)


def load_data(spec: DataSpec, *, num_clients: int, seed: int, progress: bool = True,
              check: bool = True) -> FleetData:
    """Every vehicle's dataset and the held-out set, made ready (rendered) and, with ``check``, validated.

    For what needs the whole fleet in one process (``fedseg-train``, ``-search``, ``-export``); a
    federated run loads each vehicle's frames in that vehicle and the held-out set in the server.
    Without ``check`` a frame that fails to load raises the same ``DataError`` naming it when read.
    """
    fleet = fleet_frames(spec, num_clients=num_clients, seed=seed, check=check, progress=progress)
    clients, heldout = [fleet.client(i) for i in range(num_clients)], fleet.heldout()
    fleet.ready([f for frames in clients for f in frames] + heldout, progress=progress)
    label_map = build_label_map(spec.tagset, spec.task)
    return FleetData([make_dataset(spec, frames, label_map) for frames in clients],
                     make_dataset(spec, heldout, label_map), label_map)


def describe_sizes(sizes: Sequence[int] | None) -> str:
    """Partition sizes in a few words, whatever the fleet size ("8 frames each", "3-9 frames, 48 in all")."""
    if not sizes:
        return "frames unknown here"
    low, high = min(sizes), max(sizes)
    return f"{low} frames each" if low == high else f"{low}-{high} frames, {sum(sizes)} in all"
