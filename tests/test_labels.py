"""Tag sets and task label maps, against tables written out by hand from CARLA's tag lists.

carla29 ids (CARLA >= 0.9.14): 0 unlabeled, 1 road, 2 sidewalk, 3 building, 4 wall, 5 fence,
6 pole, 7 traffic_light, 8 traffic_sign, 9 vegetation, 10 terrain, 11 sky, 12 pedestrian, 13 rider,
14 car, 15 truck, 16 bus, 17 train, 18 motorcycle, 19 bicycle, 20 static, 21 dynamic, 22 other,
23 water, 24 road_line, 25 ground, 26 bridge, 27 rail_track, 28 guard_rail.
legacy13 ids (CARLA <= 0.9.13): 0 unlabeled, 1 building, 2 fence, 3 other, 4 pedestrian, 5 pole,
6 road_line, 7 road, 8 sidewalk, 9 vegetation, 10 car, 11 wall, 12 traffic_sign.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedseg.labels import CANONICAL_NAMES, IGNORE_INDEX, build_label_map, class_colors, get_tagset

DRIVING_CARLA29 = ("background", "road", "lane", "sidewalk", "building", "wall_fence", "pole",
                   "traffic_light", "traffic_sign", "vegetation", "sky", "vehicle", "pedestrian")
# legacy13 has no traffic_light and no sky tag: those classes are dropped, the rest close up.
DRIVING_LEGACY13 = ("background", "road", "lane", "sidewalk", "building", "wall_fence", "pole",
                    "traffic_sign", "vegetation", "vehicle", "pedestrian")
LANE_OBJECT = ("background", "road", "lane", "vehicle", "pedestrian")

# (tag set, task) -> {tag id: class index}, by hand from the tables above.
KNOWN_TAGS = {
    ("carla29", "driving"): {0: 0, 1: 1, 24: 2, 2: 3, 3: 4, 4: 5, 5: 5, 28: 5, 6: 6, 7: 7, 8: 8, 9: 9,
                             10: 9, 11: 10, 14: 11, 15: 11, 19: 11, 12: 12, 13: 12, 20: 0, 23: 0, 25: 0},
    ("legacy13", "driving"): {0: 0, 3: 0, 7: 1, 6: 2, 8: 3, 1: 4, 11: 5, 2: 5, 5: 6, 12: 7, 9: 8, 10: 9,
                              4: 10},
    ("carla29", "lane_object"): {1: 1, 24: 2, 14: 3, 17: 3, 18: 3, 12: 4, 13: 4, 0: 0, 2: 0, 11: 0, 28: 0},
    ("legacy13", "lane_object"): {7: 1, 6: 2, 10: 3, 4: 4, 0: 0, 1: 0, 8: 0, 12: 0},
    ("carla29", "full"): {0: 0, 1: 1, 11: 11, 24: 24, 28: 28},
    ("legacy13", "full"): {0: 0, 7: 7, 12: 12},
}


@pytest.mark.parametrize(("tagset", "task", "names"), [
    ("carla29", "driving", DRIVING_CARLA29),
    ("legacy13", "driving", DRIVING_LEGACY13),
    ("carla29", "lane_object", LANE_OBJECT),
    ("legacy13", "lane_object", LANE_OBJECT),
    ("carla29", "full", CANONICAL_NAMES),
    ("legacy13", "full", ("unlabeled", "building", "fence", "other", "pedestrian", "pole", "road_line",
                          "road", "sidewalk", "vegetation", "car", "wall", "traffic_sign")),
])
def test_classes_of_each_task_on_each_tagset(tagset: str, task: str, names: tuple[str, ...]) -> None:
    # Execute
    label_map = build_label_map(tagset, task)
    # Assert
    assert label_map.class_names == names
    assert label_map.num_classes == len(names)
    assert (label_map.tagset, label_map.task) == (tagset, task)


@pytest.mark.parametrize(("tagset", "task"), list(KNOWN_TAGS))
def test_known_tags_map_to_their_hand_computed_class(tagset: str, task: str) -> None:
    # Prepare
    expected = KNOWN_TAGS[(tagset, task)]
    tags = np.array(list(expected), dtype=np.uint8)
    # Execute
    classes = build_label_map(tagset, task)(tags)
    # Assert
    assert classes.tolist() == list(expected.values())


@pytest.mark.parametrize(("tagset", "num_tags"), [("carla29", 29), ("legacy13", 13)])
@pytest.mark.parametrize("task", ["driving", "lane_object", "full"])
def test_ids_beyond_the_tagset_are_ignored(tagset: str, num_tags: int, task: str) -> None:
    # Execute
    label_map = build_label_map(tagset, task)
    # Assert: every real tag has a class; every other id is dropped
    assert (label_map.lut[:num_tags] < label_map.num_classes).all()
    assert (label_map.lut[num_tags:] == IGNORE_INDEX).all()
    assert label_map.lut.shape == (256,) and label_map.lut.dtype == np.uint8


def test_label_map_maps_whole_images() -> None:
    # Prepare: road, road_line / an id no tag set has, unlabeled
    tags = np.array([[1, 24], [200, 0]], dtype=np.uint8)
    # Execute
    classes = build_label_map("carla29", "lane_object")(tags)
    # Assert
    assert classes.tolist() == [[1, 2], [IGNORE_INDEX, 0]]
    assert classes.shape == tags.shape


@pytest.mark.parametrize(("canonical", "legacy_id"), [
    ("road", 7),  # its own tag
    ("sky", 0),  # -> unlabeled
    ("terrain", 3),  # -> other
    ("traffic_light", 12),  # -> traffic_sign: legacy CARLA tagged lights and signs alike
    ("rider", 4),  # -> pedestrian
    ("truck", 10),  # -> car
    ("guard_rail", 2),  # -> fence
])
def test_legacy_fallback_writes_missing_names_with_the_nearest_tag(canonical: str, legacy_id: int) -> None:
    assert get_tagset("legacy13").tag_id(canonical) == legacy_id


def test_every_canonical_name_has_a_legacy_id() -> None:
    # The scene generator writes every canonical name in whatever tag set it is asked for.
    legacy = get_tagset("legacy13")
    ids = [legacy.tag_id(name) for name in CANONICAL_NAMES]
    assert len(ids) == 29 and all(0 <= i < legacy.num_tags for i in ids)


def test_carla29_has_no_fallback() -> None:
    # Prepare
    carla29 = get_tagset("carla29")
    # Execute / Assert: canonical names are carla29's own, anything else has no id
    assert [carla29.tag_id(n) for n in ("unlabeled", "sky", "guard_rail")] == [0, 11, 28]
    with pytest.raises(KeyError, match="'hood'"):
        carla29.tag_id("hood")


def test_unknown_tagset_names_itself_and_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="'carla30'") as err:
        build_label_map("carla30", "driving")
    assert "['carla29', 'legacy13']" in str(err.value)


def test_unknown_task_names_itself_and_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="'lanes'") as err:
        build_label_map("carla29", "lanes")
    assert "['driving', 'full', 'lane_object']" in str(err.value)


@pytest.mark.parametrize(("tagset", "task", "expected"), [
    # Each class takes the palette colour of its lowest tag id.
    ("carla29", "driving", {0: (0, 0, 0), 1: (128, 64, 128), 5: (102, 102, 156), 9: (107, 142, 35),
                            10: (70, 130, 180), 11: (0, 0, 142)}),
    ("legacy13", "driving", {5: (100, 40, 40), 9: (0, 0, 142)}),  # wall_fence: fence (id 2) before wall (11)
    ("carla29", "lane_object", {0: (0, 0, 0), 2: (157, 234, 50), 4: (220, 20, 60)}),
])
def test_class_colors_take_the_colour_of_the_lowest_tag(tagset: str, task: str,
                                                        expected: dict[int, tuple[int, int, int]]) -> None:
    # Prepare
    label_map = build_label_map(tagset, task)
    # Execute
    colors = class_colors(label_map)
    # Assert
    assert colors.shape == (label_map.num_classes, 3) and colors.dtype == np.uint8
    for cls, rgb in expected.items():
        assert tuple(colors[cls].tolist()) == rgb, label_map.class_names[cls]


def test_palette_is_one_uint8_colour_per_tag() -> None:
    # Execute
    palette = get_tagset("carla29").palette()
    # Assert
    assert palette.shape == (29, 3) and palette.dtype == np.uint8
    assert palette[1].tolist() == [128, 64, 128] and palette[24].tolist() == [157, 234, 50]
