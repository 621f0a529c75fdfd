"""Datasets: the embedded synthetic CARLA-like fleet and real CARLA-format folders.

Both end in the same loader (:mod:`fedseg.data.carla`): the synthetic generator writes CARLA's
camera format to a cache folder, so the code path that trains on embedded data is the one that
trains on a real CARLA collection. Each source is one entry of ``DATA_SOURCES``, named like its
``conf/data/<name>.yaml``; a new source is a function returning its tree plus one entry there.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedseg.config import DataSpec
from fedseg.data.carla import DataError, SegmentationDataset, load_fleet, validate
from fedseg.data.synthetic import generate_fleet
from fedseg.labels import LabelMap, build_label_map

__all__ = ["DATA_SOURCES", "DataError", "DataSource", "FleetData", "cached_fleet", "dataset_root",
           "get_data_source", "load_data"]


@dataclass
class FleetData:
    """One dataset per vehicle plus the server's held-out set, sharing one label map."""

    clients: list[SegmentationDataset]
    heldout: SegmentationDataset
    label_map: LabelMap


@dataclass(frozen=True)
class DataSource:
    """One ``data.name`` (``conf/data/<name>.yaml``): where its CARLA-format tree comes from."""

    root: Callable[[DataSpec, int, int, bool], Path]  # (spec, num_clients, seed, progress) -> tree
    check_files: bool  # load_data(check=True) decodes every file up front (user data can be broken)


def _carla_root(spec: DataSpec, num_clients: int, seed: int, progress: bool) -> Path:
    """A CARLA-format tree the user points ``data.root`` at."""
    if not spec.root:
        raise DataError("data=carla needs data.root=DIR (a folder of <vehicle>/CameraRGB|CameraSeg)")
    return Path(spec.root).expanduser()


def _synthetic_root(spec: DataSpec, num_clients: int, seed: int, progress: bool) -> Path:
    """The synthetic fleet for these parameters, generated once under a folder keyed by them."""
    params = {
        "num_vehicles": num_clients,
        "frames_per_vehicle": spec.frames_per_vehicle,
        "heldout_frames": spec.heldout_frames,
        "image_size": list(spec.image_size),
        "tagset": spec.tagset,
        "seed": seed,
    }
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    base = Path(spec.root or Path.home() / ".cache" / "fedseg" / "synthetic").expanduser()
    return generate_fleet(
        base / key,
        num_vehicles=num_clients,
        frames_per_vehicle=int(spec.frames_per_vehicle or 48),
        heldout_frames=int(spec.heldout_frames or 32),
        image_size=(int(spec.image_size[0]), int(spec.image_size[1])),
        tagset=spec.tagset,
        seed=seed,
        progress=progress,
    )


# One entry per conf/data/<name>.yaml (a test keeps the two in step).
DATA_SOURCES: dict[str, DataSource] = {
    "synthetic": DataSource(_synthetic_root, check_files=False),  # valid by construction
    "carla": DataSource(_carla_root, check_files=True),
}


def get_data_source(name: str) -> DataSource:
    """The registered source ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
    if name not in DATA_SOURCES:
        raise ValueError(f"unknown dataset {name!r}; valid: {list(DATA_SOURCES)}")
    return DATA_SOURCES[name]


def dataset_root(spec: DataSpec, *, num_clients: int, seed: int, progress: bool = True) -> Path:
    """The CARLA-format tree for ``spec``; generates (once, cached by parameters) the synthetic fleet."""
    return get_data_source(spec.name).root(spec, num_clients, seed, progress)


def load_data(spec: DataSpec, *, num_clients: int, seed: int, progress: bool = True,
              check: bool = True) -> FleetData:
    """Partition ``spec``'s frames over ``num_clients`` vehicles and a held-out set, validated up front.

    With ``check`` every file is opened once before training so that bad data fails the run at
    start, naming the file, instead of crashing a vehicle mid-round. The entry points check; the
    Flower apps they start pass ``check=False`` rather than re-reading the whole fleet in every
    vehicle (a frame that still fails to load raises the same ``DataError`` naming it).
    """
    source = get_data_source(spec.name)
    root = source.root(spec, num_clients, seed, progress)
    fleet = load_fleet(
        root,
        num_clients=num_clients,
        partition=spec.partition,
        alpha=spec.dirichlet_alpha,
        heldout_fraction=spec.heldout_fraction,
        seed=seed,
    )
    if check and source.check_files:
        validate([f for frames in fleet.clients for f in frames] + fleet.heldout, spec.tagset,
                 progress=progress)
    label_map = build_label_map(spec.tagset, spec.task)
    size = (int(spec.image_size[0]), int(spec.image_size[1]))

    def make(frames: list) -> SegmentationDataset:
        return SegmentationDataset(frames, label_map, input_variant=spec.input, image_size=size)

    return FleetData([make(frames) for frames in fleet.clients], make(fleet.heldout), label_map)


@functools.lru_cache(maxsize=4)
def cached_fleet(spec: DataSpec, num_clients: int, seed: int) -> FleetData:
    """The fleet, loaded once per process (Ray reuses actor processes across rounds).

    Files are not re-validated here: the entry point (``fedseg-sim``) has checked them once.
    """
    return load_data(spec, num_clients=num_clients, seed=seed, progress=False, check=False)
