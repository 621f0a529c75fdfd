"""Lazy fleets: a vehicle's frames are rendered when it is first built, and nothing else is.

Tiny frames (24x32, two per vehicle) keep every test at a fraction of a second of rendering, also
for fleets of 10,000 vehicles: only the frames a test asks for are ever drawn.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from fedseg.config import DataSpec, FederationSpec
from fedseg.data import describe_sizes, fleet_frames, load_data
from fedseg.data.synthetic import fleet as synthetic_fleet
from fedseg.data.synthetic import generate_fleet
from fedseg.deploy.vehicle import NodeSpec, load_heldout, load_vehicle
from fedseg.errors import DataError
from fedseg.settings import RunSettings

TINY = (24, 32)


def _spec(root: Path, **overrides: object) -> DataSpec:
    args: dict = {"name": "synthetic", "root": str(root), "image_size": TINY, "frames_per_vehicle": 2,
                  "heldout_frames": 3}
    return DataSpec(**{**args, **overrides})


def _settings(root: Path, vehicles: int, **data: object) -> RunSettings:
    return RunSettings(data=_spec(root, **data), federation=FederationSpec(num_clients=vehicles, min_fit_clients=1))


def _never_render(*args: object, **kwargs: object) -> None:
    raise AssertionError("a frame was rendered")


def test_a_vehicles_frames_do_not_depend_on_the_fleet_size(tmp_path: Path) -> None:
    # Prepare: vehicle 1 of fleets of 3 and of 10,000, in caches of their own; and a whole 2-vehicle fleet
    small = fleet_frames(_spec(tmp_path / "a"), num_clients=3, seed=0)
    large = fleet_frames(_spec(tmp_path / "b"), num_clients=10_000, seed=0)
    whole = generate_fleet(tmp_path / "whole", num_vehicles=2, frames_per_vehicle=2, heldout_frames=0,
                           image_size=TINY, progress=False)
    # Execute
    frames_small, frames_large = small.client(1), large.client(1)
    small.ready(frames_small)
    large.ready(frames_large)
    # Assert: the same bytes in every case (and as the whole-fleet generator writes them)
    assert len(frames_small) == len(frames_large) == 2
    for a, b in zip(frames_small, frames_large, strict=True):
        for path_a, path_b in ((a.rgb, b.rgb), (a.seg, b.seg)):
            same = whole / "vehicle_01" / path_a.parent.name / path_a.name
            assert path_a.read_bytes() == path_b.read_bytes() == same.read_bytes()
    assert not large.client(2)[0].rgb.exists()


def test_building_vehicle_7_of_10000_writes_only_its_own_frames(tmp_path: Path) -> None:
    # Prepare
    settings = _settings(tmp_path, 10_000)
    # Execute
    vehicle = load_vehicle(settings, NodeSpec.from_node_config({"partition-id": 7, "num-partitions": 10_000}))
    # Assert
    written = sorted(p.relative_to(tmp_path).parts[1:] for p in tmp_path.rglob("*") if p.is_file())
    assert written == [("vehicle_07", camera, f"{k:06d}.png") for camera in ("CameraRGB", "CameraSeg")
                       for k in range(2)]
    assert len(vehicle.dataset) == 2 and {f.source for f in vehicle.dataset.frames} == {"vehicle_07"}
    image, mask = vehicle.dataset[1]
    assert tuple(image.shape) == (3, *TINY) and tuple(mask.shape) == TINY
    with pytest.raises(ValueError, match=r"partition-id 10000 outside 0\.\.9999"):
        load_vehicle(settings, NodeSpec.from_node_config({"partition-id": 10_000}))


def test_the_server_gets_sizes_from_the_config_and_renders_only_its_heldout_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Execute
    data, sizes = load_heldout(_settings(tmp_path, 10_000))
    # Assert: 10,000 sizes of 2 frames, three held-out frames from towns 0, 1, 2, nothing else on disk
    assert sizes == [2] * 10_000
    assert len(data.heldout) == 3 and data.clients == []
    assert [f.town for f in data.heldout.frames] == [0, 1, 2]  # type: ignore[attr-defined]
    folders = {p.relative_to(tmp_path).parts[1] for p in tmp_path.rglob("*.png")}
    assert folders == {"heldout_10000"} and len(list(tmp_path.rglob("*.png"))) == 6
    # ... and fedseg-sim's start-up check renders nothing at all
    monkeypatch.setattr(synthetic_fleet, "render_scene", _never_render)
    fleet = fleet_frames(_spec(tmp_path / "other"), num_clients=10_000, seed=0, check=True)
    assert fleet.sizes() == [2] * 10_000 and not (tmp_path / "other").exists()


def test_two_generators_racing_on_one_vehicle_leave_complete_identical_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the racers go in step: both find every frame missing before either renders one, and
    # both have written a file's bytes before either puts its file in place
    fleet = fleet_frames(_spec(tmp_path / "race"), num_clients=10, seed=0)
    reference = fleet_frames(_spec(tmp_path / "alone"), num_clients=10, seed=0)
    rendering, placing = threading.Barrier(2, timeout=30), threading.Barrier(2, timeout=30)
    real, real_replace = synthetic_fleet.render_scene, os.replace

    def in_step(*args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
        rendering.wait()
        return real(*args, **kwargs)  # type: ignore[arg-type]

    def place_in_step(source: str | Path, target: str | Path) -> None:
        placing.wait()
        real_replace(source, target)

    monkeypatch.setattr(synthetic_fleet, "render_scene", in_step)
    monkeypatch.setattr(os, "replace", place_in_step)
    errors: list[BaseException] = []

    def racer() -> None:
        try:
            fleet.ready(fleet.client(4))
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=racer) for _ in range(2)]
    # Execute
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    monkeypatch.undo()
    reference.ready(reference.client(4))
    # Assert: no error, no temporary file left, every file complete and as rendered alone
    assert errors == []
    race, alone = tmp_path / "race", tmp_path / "alone"
    assert sorted(p.relative_to(race) for p in race.rglob("*") if p.is_file()) == \
        sorted(p.relative_to(alone) for p in alone.rglob("*") if p.is_file())
    for ours, theirs in zip(fleet.client(4), reference.client(4), strict=True):
        assert ours.rgb.read_bytes() == theirs.rgb.read_bytes() and ours.seg.read_bytes() == theirs.seg.read_bytes()


def test_iid_shares_cover_the_fleet_once_and_a_vehicle_renders_only_its_share(tmp_path: Path) -> None:
    # Prepare: 20 vehicles x 2 frames pooled and cut in 20 shares of 2
    fleet = fleet_frames(_spec(tmp_path, partition="iid"), num_clients=20, seed=0)
    shares = [fleet.client(i) for i in range(20)]
    # Execute
    fleet.ready(shares[3])
    # Assert
    assert fleet.sizes() == [2] * 20
    assert len({f.rgb for share in shares for f in share}) == 40
    assert sorted(tmp_path.rglob("*.png")) == sorted(p for f in shares[3] for p in (f.rgb, f.seg))
    assert {f.source for share in shares for f in share} != {"vehicle_03"}  # pooled across vehicles


def test_load_data_renders_the_whole_fleet_for_whole_fleet_jobs(tmp_path: Path) -> None:
    data = load_data(_spec(tmp_path), num_clients=3, seed=0, progress=False)

    assert [len(client) for client in data.clients] == [2, 2, 2] and len(data.heldout) == 3
    assert len(list(tmp_path.rglob("*.png"))) == 2 * (3 * 2 + 3)


def test_a_users_carla_folder_is_still_checked_up_front_naming_the_file(tmp_path: Path) -> None:
    # Prepare: a two-vehicle folder whose second vehicle holds a broken label
    from PIL import Image

    for vehicle in ("car_a", "car_b"):
        for camera in ("CameraRGB", "CameraSeg"):
            (tmp_path / vehicle / camera).mkdir(parents=True)
            Image.new("RGB", (8, 6)).save(tmp_path / vehicle / camera / "001.png")
            Image.new("RGB", (8, 6)).save(tmp_path / vehicle / camera / "002.png")
    (tmp_path / "car_b" / "CameraSeg" / "002.png").write_bytes(b"not a png")
    spec = DataSpec(name="carla", root=str(tmp_path), tagset="legacy13", image_size=(6, 8))
    # Execute / Assert
    assert fleet_frames(spec, num_clients=2, seed=0).sizes() == [1, 1]  # listed, not opened
    with pytest.raises(DataError, match=r"car_b/CameraSeg/002\.png: cannot read as an image"):
        fleet_frames(spec, num_clients=2, seed=0, check=True)


def test_partition_sizes_are_described_in_a_few_words_at_any_fleet_size() -> None:
    assert describe_sizes([8] * 10_000) == "8 frames each"
    assert describe_sizes([3, 9, 4]) == "3-9 frames, 16 in all"
    assert describe_sizes(None) == "frames unknown here"
