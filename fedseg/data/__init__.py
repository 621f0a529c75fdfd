"""Datasets: the embedded synthetic CARLA-like fleet and real CARLA-format folders.

Both end in the same loader (:mod:`fedseg.data.carla`): the synthetic generator writes CARLA's
camera format to a cache folder, so the code path that trains on embedded data is the one that
trains on a real CARLA collection.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from fedseg.config import DataSpec
from fedseg.data.carla import DataError, SegmentationDataset, load_fleet, validate
from fedseg.labels import LabelMap, build_label_map

__all__ = ["DATASETS", "DataError", "FleetData", "cached_fleet", "dataset_root", "load_data"]

DATASETS = ("synthetic", "carla")


@dataclass
class FleetData:
    """One dataset per vehicle plus the server's held-out set, sharing one label map."""

    clients: list[SegmentationDataset]
    heldout: SegmentationDataset
    label_map: LabelMap


def dataset_root(spec: DataSpec, *, num_clients: int, seed: int, progress: bool = True) -> Path:
    """The CARLA-format tree for ``spec``; generates (once, cached by parameters) the synthetic fleet."""
    if spec.name not in DATASETS:
        raise ValueError(f"unknown dataset {spec.name!r}; valid: {list(DATASETS)}")
    if spec.name == "carla":
        if not spec.root:
            raise DataError("data=carla needs data.root=DIR (a folder of <vehicle>/CameraRGB|CameraSeg)")
        return Path(spec.root).expanduser()
    from fedseg.data.synthetic import generate_fleet

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


def load_data(spec: DataSpec, *, num_clients: int, seed: int, progress: bool = True,
              check: bool = True) -> FleetData:
    """Partition ``spec``'s frames over ``num_clients`` vehicles and a held-out set, validated up front.

    With ``check`` every file is opened once before training so that bad data fails the run at
    start, naming the file, instead of crashing a vehicle mid-round. The entry points check; the
    Flower apps they start pass ``check=False`` rather than re-reading the whole fleet in every
    vehicle (a frame that still fails to load raises the same ``DataError`` naming it).
    """
    root = dataset_root(spec, num_clients=num_clients, seed=seed, progress=progress)
    partition = "vehicle" if spec.name == "synthetic" and spec.partition == "vehicle" else spec.partition
    fleet = load_fleet(
        root,
        num_clients=num_clients,
        partition=partition,
        alpha=spec.dirichlet_alpha,
        heldout_fraction=spec.heldout_fraction,
        seed=seed,
    )
    if check and spec.name == "carla":  # the generator's output is valid by construction
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
