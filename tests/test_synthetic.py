"""Synthetic fleet generator: determinism, CARLA format, class coverage, non-IID-ness, cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fedseg.data
from fedseg.config import DataSpec
from fedseg.data.synthetic import (
    FORMAT_VERSION,
    WEATHERS,
    fleet,
    generate_fleet,
    render_scene,
    town_style,
    weather_mix,
)
from fedseg.labels import CANONICAL_NAMES, build_label_map, get_tagset

TINY = (48, 64)


def _fleet(root: Path, **overrides: object) -> Path:
    args: dict = {"num_vehicles": 2, "frames_per_vehicle": 2, "heldout_frames": 2, "image_size": TINY,
                  "seed": 0, "progress": False}
    args.update(overrides)
    return generate_fleet(root, **args)


def _pngs(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*.png"))


def _tags(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))[..., 0]


@pytest.fixture(scope="module")
def small_fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 vehicles x 8 frames at 96x128, carla29 tags (about a second to generate)."""
    return generate_fleet(tmp_path_factory.mktemp("fleet") / "fleet", num_vehicles=3, frames_per_vehicle=8,
                          heldout_frames=8, image_size=(96, 128), progress=False)


def test_render_scene_is_a_function_of_the_rng() -> None:
    # Prepare
    style, weather = town_style(0, seed=0), WEATHERS["clear"]
    # Execute
    rgb_a, lab_a = render_scene(np.random.default_rng(5), style, weather, TINY)
    rgb_b, lab_b = render_scene(np.random.default_rng(5), style, weather, TINY)
    rgb_c, _ = render_scene(np.random.default_rng(6), style, weather, TINY)
    # Assert
    assert rgb_a.shape == (*TINY, 3) and rgb_a.dtype == np.uint8
    assert lab_a.shape == TINY and lab_a.dtype == np.uint8
    assert lab_a.max() < len(CANONICAL_NAMES)
    assert np.array_equal(rgb_a, rgb_b) and np.array_equal(lab_a, lab_b)
    assert not np.array_equal(rgb_a, rgb_c)


def test_same_arguments_give_byte_identical_fleets(tmp_path: Path) -> None:
    # Execute
    a, b = _fleet(tmp_path / "a"), _fleet(tmp_path / "b")
    # Assert
    files = _pngs(a)
    assert files == _pngs(b)
    assert len(files) == 2 * (2 * 2 + 2)  # RGB + seg for 2 vehicles x 2 frames and 2 held-out frames
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_another_seed_gives_other_images(tmp_path: Path) -> None:
    # Execute
    a, c = _fleet(tmp_path / "a"), _fleet(tmp_path / "c", seed=1)
    # Assert
    for rel in ("vehicle_00/CameraRGB/000000.png", "heldout/CameraRGB/000001.png"):
        assert (a / rel).read_bytes() != (c / rel).read_bytes()


@pytest.mark.parametrize("tagset", ["carla29", "legacy13"])
def test_fleet_is_in_carla_camera_format(tmp_path: Path, tagset: str) -> None:
    # Execute
    root = _fleet(tmp_path / "fleet", tagset=tagset)
    # Assert
    assert sorted(p.name for p in root.iterdir()) == ["fleet.json", "heldout", "vehicle_00", "vehicle_01"]
    for folder in ("vehicle_00", "vehicle_01", "heldout"):
        for k in range(2):
            rgb = np.asarray(Image.open(root / folder / "CameraRGB" / f"{k:06d}.png"))
            seg = np.asarray(Image.open(root / folder / "CameraSeg" / f"{k:06d}.png"))
            assert rgb.shape == seg.shape == (*TINY, 3)
            assert seg[..., 0].max() < get_tagset(tagset).num_tags
            assert not seg[..., 1:].any()


def test_tagsets_write_the_same_scene_with_their_own_ids(tmp_path: Path) -> None:
    # Prepare: carla29 ids are the canonical indices; legacy13 merges some of them.
    to_legacy = np.array([get_tagset("legacy13").tag_id(n) for n in CANONICAL_NAMES], np.uint8)
    # Execute
    new, old = _fleet(tmp_path / "new", tagset="carla29"), _fleet(tmp_path / "old", tagset="legacy13")
    # Assert
    rel = Path("vehicle_01/CameraSeg/000001.png")
    assert np.array_equal(to_legacy[_tags(new / rel)], _tags(old / rel))
    rgb = Path("vehicle_01/CameraRGB/000001.png")
    assert (new / rgb).read_bytes() == (old / rgb).read_bytes()
    assert get_tagset("carla29").tag_id("sky") in _tags(new / rel)


def test_small_fleet_covers_every_driving_class_with_thin_lanes_and_poles(small_fleet: Path) -> None:
    # Prepare
    label_map = build_label_map("carla29", "driving")
    counts = np.zeros(label_map.num_classes)
    tags_seen: set[int] = set()
    # Execute
    for path in small_fleet.glob("vehicle_*/CameraSeg/*.png"):
        tags = _tags(path)
        tags_seen |= set(np.unique(tags).tolist())
        counts += np.bincount(label_map(tags).ravel(), minlength=256)[: label_map.num_classes]
    # Assert
    missing = [name for name, n in zip(label_map.class_names, counts, strict=True) if n == 0]
    assert missing == []
    wanted = {"road", "road_line", "sidewalk", "building", "wall", "fence", "vegetation", "terrain", "sky",
              "pole", "traffic_sign", "traffic_light", "car", "truck", "pedestrian"}
    assert wanted - {CANONICAL_NAMES[t] for t in tags_seen} == set()
    share = dict(zip(label_map.class_names, counts / counts.sum(), strict=True))
    assert 0 < share["lane"] < 0.05 and 0 < share["pole"] < 0.05  # thin classes stay thin


def _class_histogram(paths: list[Path]) -> np.ndarray:
    counts = sum(np.bincount(_tags(p).ravel(), minlength=len(CANONICAL_NAMES)) for p in paths)
    return counts / counts.sum()


def test_vehicles_differ_more_than_the_halves_of_one_vehicle(small_fleet: Path) -> None:
    # Prepare
    frames = [sorted((small_fleet / f"vehicle_{v:02d}" / "CameraSeg").glob("*.png")) for v in range(3)]
    # Execute
    within = [np.abs(_class_histogram(f[:4]) - _class_histogram(f[4:])).sum() for f in frames]
    between = [np.abs(_class_histogram(frames[i]) - _class_histogram(frames[j])).sum()
               for i in range(3) for j in range(i + 1, 3)]
    # Assert
    assert min(between) > max(within)


def test_pixel_colour_alone_does_not_give_the_class(small_fleet: Path) -> None:
    # Prepare: a colour -> majority-class lookup (8 levels per channel... 32^3 bins) fit on the vehicles
    label_map = build_label_map("carla29", "driving")

    def load(folder: str) -> tuple[np.ndarray, np.ndarray]:
        frames = sorted((small_fleet / folder).glob("CameraRGB/*"))
        rgb = np.stack([np.asarray(Image.open(p)) for p in frames])
        tags = np.stack([_tags(p) for p in sorted((small_fleet / folder).glob("CameraSeg/*"))])
        bins = (rgb[..., 0] // 8).astype(int) * 1024 + (rgb[..., 1] // 8) * 32 + rgb[..., 2] // 8
        return bins.ravel(), label_map(tags).ravel()

    train = [load(f"vehicle_{v:02d}") for v in range(3)]
    table = np.zeros((32**3, label_map.num_classes))
    for bins, classes in train:
        np.add.at(table, (bins, classes), 1)
    # Execute
    bins, classes = load("heldout")
    accuracy = (table.argmax(1)[bins] == classes).mean()
    # Assert: flat per-class colours would score above 0.95
    assert accuracy < 0.75


def test_towns_and_weather_mixes_differ_per_vehicle() -> None:
    # Execute
    styles = [town_style(v, seed=0) for v in range(5)]
    mixes = [weather_mix(v, seed=0) for v in range(5)]
    # Assert
    assert len({s.archetype for s in styles}) == 5
    assert len({s.road_rgb for s in styles}) > 1
    for mix in mixes:
        assert list(mix) == list(WEATHERS) and abs(sum(mix.values()) - 1) < 1e-9
    assert mixes[0] != mixes[1]
    assert town_style(0, seed=0) == town_style(0, seed=0) != town_style(0, seed=1)


def test_second_call_with_same_parameters_rewrites_nothing(tmp_path: Path) -> None:
    # Prepare
    root = _fleet(tmp_path / "fleet")
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    # Execute
    again = _fleet(tmp_path / "fleet")
    # Assert
    assert again == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    manifest = json.loads((root / "fleet.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["params"] == {"num_vehicles": 2, "frames_per_vehicle": 2, "heldout_frames": 2,
                                  "image_size": list(TINY), "tagset": "carla29", "seed": 0}
    assert list(tmp_path.iterdir()) == [root]  # no temporary folder left behind


def test_other_parameters_in_the_same_root_raise(tmp_path: Path) -> None:
    root = _fleet(tmp_path / "fleet")
    with pytest.raises(ValueError, match="image_size"):
        _fleet(root, image_size=(32, 48))


def test_a_folder_that_is_not_a_fleet_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"no fleet\.json"):
        _fleet(tmp_path / "data")
    assert (tmp_path / "data" / "notes.txt").read_text() == "mine"


def test_interrupted_generation_leaves_no_fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the fourth frame fails
    real, calls = fleet.render_scene, []

    def failing(*args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fleet, "render_scene", failing)  # where generate_fleet looks it up
    # Execute
    with pytest.raises(KeyboardInterrupt):
        _fleet(tmp_path / "fleet")
    # Assert
    assert len(calls) == 4
    assert list(tmp_path.iterdir()) == []


def test_generated_fleet_is_loaded_without_rereading_every_file(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the generator's output is valid by construction, so load_data must not validate it
    checked: list[int] = []
    monkeypatch.setattr(fedseg.data, "validate", lambda frames, *a, **k: checked.append(len(frames)))
    spec = DataSpec(name="synthetic", root=str(tmp_path), image_size=TINY, frames_per_vehicle=2,
                    heldout_frames=1)
    # Execute
    data = fedseg.data.load_data(spec, num_clients=2, seed=0, progress=False, check=True)
    # Assert
    assert checked == []
    assert [len(client) for client in data.clients] == [2, 2] and len(data.heldout) == 1
    assert data.clients[0][0][0].shape == (3, *TINY)
