"""CARLA-format loader: the four real frames, layouts, and every data error a user can hit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedseg.config import DataSpec
from fedseg.data import fleet_frames, load_data
from fedseg.data.carla import Frame, SegmentationDataset, discover, validate
from fedseg.data.normalize import IMAGENET_MEAN, IMAGENET_STD, denormalize
from fedseg.errors import DataError
from fedseg.labels import IGNORE_INDEX, build_label_map

SAMPLE = Path(__file__).parent / "data" / "carla_sample"
MEAN, STD = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)

# legacy13 tag -> "driving" class, written out by hand from the two tables in fedseg/labels.py.
# Classes: 0 background, 1 road, 2 lane, 3 sidewalk, 4 building, 5 wall_fence, 6 pole,
# 7 traffic_sign, 8 vegetation, 9 vehicle, 10 pedestrian (legacy13 has no sky/traffic_light tag).
LEGACY_TO_DRIVING = {0: 0, 1: 4, 2: 5, 3: 0, 4: 10, 5: 6, 6: 2, 7: 1, 8: 3, 9: 8, 10: 9, 11: 5, 12: 7}
# Pixels of 000_0412 read off the label image: (row, col) -> (legacy tag, driving class).
PIXELS_0412 = {
    (20, 20): (0, 0),  # sky (legacy "none")
    (100, 700): (1, 4),  # building
    (250, 300): (9, 8),  # vegetation
    (324, 353): (6, 2),  # lane marking
    (420, 775): (8, 3),  # sidewalk
    (450, 300): (7, 1),  # road
    (590, 400): (10, 9),  # the ego car's hood is tagged "vehicles"
}


def red_channel(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))[..., 0]


def write_frame(folder: Path, name: str, tags: np.ndarray, rgb: np.ndarray | None = None) -> None:
    """Write one CARLA frame: CameraSeg has the tags in red (G, B zero), CameraRGB a colour image."""
    (folder / "CameraRGB").mkdir(parents=True, exist_ok=True)
    (folder / "CameraSeg").mkdir(parents=True, exist_ok=True)
    if rgb is None:
        rgb = np.full((*tags.shape, 3), 90, dtype=np.uint8)
    seg = np.zeros((*tags.shape, 3), dtype=np.uint8)
    seg[..., 0] = tags
    Image.fromarray(rgb).save(folder / "CameraRGB" / name)
    Image.fromarray(seg).save(folder / "CameraSeg" / name)


def tags_of(value: int, shape: tuple[int, int] = (6, 8)) -> np.ndarray:
    return np.full(shape, value, dtype=np.uint8)


# --- the four real frames -------------------------------------------------------------------


def test_discover_real_sample_in_lyft_layout() -> None:
    # Execute
    sources = discover(SAMPLE)
    # Assert
    assert list(sources) == ["dataA"]
    frames = sources["dataA"]
    assert [f.rgb.name for f in frames] == ["000_0412.png", "000_0414.png", "000_0416.png", "000_0418.png"]
    assert all(f.seg == SAMPLE / "dataA" / "CameraSeg" / f.rgb.name and f.source == "dataA" for f in frames)
    validate(frames, "legacy13")  # real data is valid: must not raise


def test_real_frames_rgb_variant_shapes_and_hand_picked_pixels() -> None:
    # Prepare
    frames = discover(SAMPLE)["dataA"]
    dataset = SegmentationDataset(frames, build_label_map("legacy13", "driving"), cache=False)
    red = red_channel(frames[0].seg)
    rgb = np.asarray(Image.open(frames[0].rgb).convert("RGB"))
    # Execute
    image, mask = dataset[0]
    # Assert
    assert len(dataset) == 4
    assert image.shape == (3, 600, 800) and image.dtype == torch.float32
    assert mask.shape == (600, 800) and mask.dtype == torch.int64
    for (row, col), (tag, cls) in PIXELS_0412.items():
        assert red[row, col] == tag, (row, col)  # the fixture is what the table says
        assert mask[row, col] == cls, (row, col)
    expected_pixel = (rgb[300, 400] / 255.0 - MEAN) / STD
    np.testing.assert_allclose(image[:, 300, 400].numpy(), expected_pixel, atol=1e-5)


def test_real_frames_whole_masks_follow_the_red_channel() -> None:
    # Prepare
    frames = discover(SAMPLE)["dataA"]
    dataset = SegmentationDataset(frames, build_label_map("legacy13", "driving"), cache=False)
    for i, frame in enumerate(frames):
        expected = np.vectorize(LEGACY_TO_DRIVING.__getitem__)(red_channel(frame.seg))
        # Execute
        _, mask = dataset[i]
        # Assert
        np.testing.assert_array_equal(mask.numpy(), expected)


def test_seg_variant_feeds_palette_colours_with_the_same_mask() -> None:
    # Prepare
    frames = discover(SAMPLE)["dataA"][:1]
    label_map = build_label_map("legacy13", "driving")
    # Execute
    image, mask = SegmentationDataset(frames, label_map, input_variant="seg")[0]
    _, rgb_mask = SegmentationDataset(frames, label_map, input_variant="rgb")[0]
    # Assert: legacy palette, car (0, 0, 142) at the hood, road (128, 64, 128) ahead
    colour = denormalize(image)
    assert colour[590, 400].tolist() == [0, 0, 142]
    assert colour[450, 300].tolist() == [128, 64, 128]
    assert torch.equal(mask, rgb_mask)


def test_image_size_resizes_with_nearest_tags() -> None:
    # Prepare
    frames = discover(SAMPLE)["dataA"][:1]
    full_classes = set(np.unique(SegmentationDataset(frames, build_label_map("legacy13", "driving"))[0][1]))
    dataset = SegmentationDataset(frames, build_label_map("legacy13", "driving"), image_size=(60, 80))
    # Execute
    image, mask = dataset[0]
    # Assert
    assert image.shape == (3, 60, 80) and mask.shape == (60, 80)
    assert set(np.unique(mask.numpy())) <= full_classes  # nearest never blends two classes
    assert mask[2, 2] == 0 and mask[59, 40] == 9  # sky top-left, hood bottom-centre


def test_resize_never_blends_tag_ids(tmp_path: Path) -> None:
    # Prepare: columns alternate tag 0 and tag 10; blending them would make e.g. tag 5 (pole)
    tags = np.tile(np.array([0, 10], dtype=np.uint8), (6, 4))
    write_frame(tmp_path / "car", "0.png", tags)
    frames = discover(tmp_path)["car"]
    # Execute
    _, mask = SegmentationDataset(frames, build_label_map("legacy13", "driving"), image_size=(3, 3))[0]
    # Assert: only background (0) and vehicle (9)
    assert set(mask.unique().tolist()) <= {0, 9}


def test_cache_keeps_decoded_frames(tmp_path: Path) -> None:
    # Prepare
    write_frame(tmp_path / "car", "0001.png", tags_of(7))
    frames = discover(tmp_path)["car"]
    label_map = build_label_map("legacy13", "driving")
    cached, uncached = (
        SegmentationDataset(frames, label_map),
        SegmentationDataset(frames, label_map, cache=False),
    )
    first_image, first_mask = cached[0]
    uncached[0]
    frames[0].rgb.unlink()
    # Execute
    image, mask = cached[0]
    # Assert
    assert torch.equal(image, first_image) and torch.equal(mask, first_mask)
    assert (mask == 1).all()  # road
    with pytest.raises(DataError, match="0001.png"):
        uncached[0]


def test_full_task_keeps_every_tag_and_rgba_loads(tmp_path: Path) -> None:
    # Prepare: an RGBA camera image (alpha must be dropped) and tags 0..12 on one row
    tags = np.arange(13, dtype=np.uint8).reshape(1, 13)
    write_frame(tmp_path / "car", "0.png", tags, rgb=np.full((1, 13, 4), 200, dtype=np.uint8))
    frames = discover(tmp_path)["car"]
    # Execute
    image, mask = SegmentationDataset(frames, build_label_map("legacy13", "full"))[0]
    # Assert
    assert image.shape == (3, 1, 13)
    assert mask.tolist() == [list(range(13))]
    assert IGNORE_INDEX not in mask


# --- layouts ----------------------------------------------------------------------------------


def test_discover_vehicle_folders_sorted_by_name(tmp_path: Path) -> None:
    # Prepare
    for vehicle in ("dataB", "dataA"):
        for name in ("0003.png", "0001.png", "0002.png"):
            write_frame(tmp_path / vehicle, name, tags_of(1))
    (tmp_path / "notes").mkdir()  # a folder without cameras is not a source
    # Execute
    sources = discover(tmp_path)
    # Assert
    assert list(sources) == ["dataA", "dataB"]
    assert [f.rgb.name for f in sources["dataB"]] == ["0001.png", "0002.png", "0003.png"]
    assert {f.source for f in sources["dataB"]} == {"dataB"}


def test_discover_root_that_is_one_vehicle(tmp_path: Path) -> None:
    # Prepare
    write_frame(tmp_path / "ego", "a.png", tags_of(1))
    # Execute
    sources = discover(tmp_path / "ego")
    # Assert
    assert list(sources) == ["ego"]
    assert sources["ego"] == [
        Frame(tmp_path / "ego/CameraRGB/a.png", tmp_path / "ego/CameraSeg/a.png", "ego")
    ]


# --- errors: each names the file and the problem, on one line --------------------------------


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as err:
        discover(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)


def test_root_without_camera_folders(tmp_path: Path) -> None:
    (tmp_path / "dataA").mkdir()
    with pytest.raises(DataError, match="no frames found") as err:
        discover(tmp_path)
    assert str(tmp_path) in str(err.value) and "CameraRGB" in str(err.value)


def test_camera_folders_without_frames(tmp_path: Path) -> None:
    (tmp_path / "dataA" / "CameraRGB").mkdir(parents=True)
    (tmp_path / "dataA" / "CameraSeg").mkdir()
    with pytest.raises(DataError, match="no frames") as err:
        discover(tmp_path)
    assert str(tmp_path / "dataA") in str(err.value)


@pytest.mark.parametrize(("present", "missing"), [("CameraRGB", "CameraSeg"), ("CameraSeg", "CameraRGB")])
def test_camera_folder_without_its_twin(tmp_path: Path, present: str, missing: str) -> None:
    (tmp_path / "dataA" / present).mkdir(parents=True)
    with pytest.raises(DataError, match="folder missing") as err:
        discover(tmp_path)
    assert str(tmp_path / "dataA" / missing) in str(err.value)


@pytest.mark.parametrize("orphan_dir", ["CameraRGB", "CameraSeg"])
def test_unpaired_frame_is_named(tmp_path: Path, orphan_dir: str) -> None:
    # Prepare: two good frames, then one file with no twin
    write_frame(tmp_path / "dataA", "001.png", tags_of(1))
    write_frame(tmp_path / "dataA", "002.png", tags_of(1))
    other = "CameraSeg" if orphan_dir == "CameraRGB" else "CameraRGB"
    (tmp_path / "dataA" / other / "002.png").unlink()
    # Execute / Assert
    with pytest.raises(DataError, match="unpaired") as err:
        discover(tmp_path)
    assert str(tmp_path / "dataA" / orphan_dir / "002.png") in str(err.value)


@pytest.mark.parametrize("broken", ["CameraRGB", "CameraSeg"])
def test_corrupt_png_is_named(tmp_path: Path, broken: str) -> None:
    # Prepare
    write_frame(tmp_path / "dataA", "001.png", tags_of(1))
    bad = tmp_path / "dataA" / broken / "001.png"
    bad.write_bytes(np.random.default_rng(0).bytes(300))
    frames = discover(tmp_path)["dataA"]
    # Execute / Assert: eagerly in validate, and lazily in the dataset
    with pytest.raises(DataError, match="cannot read") as err:
        validate(frames, "legacy13")
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="001.png"):
        SegmentationDataset(frames, build_label_map("legacy13", "driving"))[0]


def test_rgb_and_label_size_mismatch(tmp_path: Path) -> None:
    # Prepare: label 8x6 (WxH), RGB 4x3
    write_frame(tmp_path / "dataA", "001.png", tags_of(1), rgb=np.zeros((3, 4, 3), dtype=np.uint8))
    frames = discover(tmp_path)["dataA"]
    # Execute / Assert
    with pytest.raises(DataError, match="does not match") as err:
        validate(frames, "legacy13", progress=True)
    message = str(err.value)
    assert "001.png" in message and "8x6" in message and "4x3" in message


def test_tag_outside_tagset(tmp_path: Path) -> None:
    # Prepare: one pixel of tag 40 in a legacy13 label
    tags = tags_of(7)
    tags[2, 3] = 40
    write_frame(tmp_path / "dataA", "001.png", tags)
    frames = discover(tmp_path)["dataA"]
    # Execute / Assert
    with pytest.raises(DataError, match="outside tag set") as err:
        validate(frames, "legacy13")
    message = str(err.value)
    assert "001.png" in message and "[40]" in message and "legacy13" in message and "0..12" in message


def test_tag_of_the_other_tagset_suggests_it(tmp_path: Path) -> None:
    # Prepare: tag 24 ("road_line" in carla29) is not a legacy13 tag
    write_frame(tmp_path / "dataA", "001.png", tags_of(24))
    frames = discover(tmp_path)["dataA"]
    # Execute / Assert
    with pytest.raises(DataError, match="carla29"):
        validate(frames, "legacy13")
    validate(frames, "carla29")  # valid there: must not raise


def test_unknown_input_variant(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'depth'") as err:
        SegmentationDataset([], build_label_map("legacy13", "driving"), input_variant="depth")
    assert "'rgb'" in str(err.value) and "'seg'" in str(err.value)


# --- data sources: data.name -> CARLA-format tree (fedseg.data) -------------------------------


def test_carla_source_needs_a_root() -> None:
    with pytest.raises(DataError, match=r"data\.root=DIR"):
        fleet_frames(DataSpec(name="carla", root=None), num_clients=1, seed=0)


def test_unknown_data_source_names_itself_and_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="'kitti'") as err:
        fleet_frames(DataSpec(name="kitti"), num_clients=1, seed=0)
    assert "'synthetic'" in str(err.value) and "'carla'" in str(err.value)


def test_carla_source_checks_every_file_up_front_unless_told_not_to(tmp_path: Path) -> None:
    # Prepare: two vehicles; the second one's only label holds tag 40, outside legacy13
    for name in ("001.png", "002.png"):
        write_frame(tmp_path / "v1", name, tags_of(7))
    write_frame(tmp_path / "v2", "001.png", tags_of(40))
    spec = DataSpec(name="carla", root=str(tmp_path), tagset="legacy13", image_size=(6, 8))
    # Execute / Assert: checked at load time, naming the file ...
    with pytest.raises(DataError, match="outside tag set") as err:
        load_data(spec, num_clients=2, seed=0, progress=False)
    assert str(tmp_path / "v2" / "CameraSeg" / "001.png") in str(err.value)
    # ... or, unchecked, only when the frame is read
    fleet = load_data(spec, num_clients=2, seed=0, progress=False, check=False)
    assert [len(client) for client in fleet.clients] == [1, 1] and len(fleet.heldout) == 1
    with pytest.raises(DataError, match="outside tag set"):
        fleet.clients[1][0]
