"""CARLA semantic tag sets and task label maps.

CARLA's semantic camera writes the tag id in the red channel. Two tag sets exist:

* ``legacy13``: CARLA <= 0.9.13 (and the public Lyft-Udacity CARLA set), 13 tags.
* ``carla29``: CARLA >= 0.9.14, 29 tags aligned with CityScapes (``LibCarla/.../ObjectLabel.h``).

Every tag is also known by a *canonical* name (the 0.9.14+ name, lower snake case), so the scene
generator and the tasks speak one vocabulary whatever tag set is on disk.

A *task* merges or drops tags into the classes a model predicts (e.g. ``lane_object`` for the
paper's lane-and-object detection). Tags a task does not name go to its ``rest`` class, or are
ignored (``IGNORE_INDEX``) when ``rest`` is ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = 255

# (canonical name, CityScapes-palette colour) in carla29 id order, from CARLA's ObjectLabel.h.
_CARLA29: list[tuple[str, tuple[int, int, int]]] = [
    ("unlabeled", (0, 0, 0)),
    ("road", (128, 64, 128)),
    ("sidewalk", (244, 35, 232)),
    ("building", (70, 70, 70)),
    ("wall", (102, 102, 156)),
    ("fence", (190, 153, 153)),
    ("pole", (153, 153, 153)),
    ("traffic_light", (250, 170, 30)),
    ("traffic_sign", (220, 220, 0)),
    ("vegetation", (107, 142, 35)),
    ("terrain", (152, 251, 152)),
    ("sky", (70, 130, 180)),
    ("pedestrian", (220, 20, 60)),
    ("rider", (255, 0, 0)),
    ("car", (0, 0, 142)),
    ("truck", (0, 0, 70)),
    ("bus", (0, 60, 100)),
    ("train", (0, 80, 100)),
    ("motorcycle", (0, 0, 230)),
    ("bicycle", (119, 11, 32)),
    ("static", (110, 190, 160)),
    ("dynamic", (170, 120, 50)),
    ("other", (55, 90, 80)),
    ("water", (45, 60, 150)),
    ("road_line", (157, 234, 50)),
    ("ground", (81, 0, 81)),
    ("bridge", (150, 100, 100)),
    ("rail_track", (230, 150, 140)),
    ("guard_rail", (180, 165, 180)),
]

# Legacy ids 0..12 with their canonical names and legacy palette colours.
_LEGACY13: list[tuple[str, tuple[int, int, int]]] = [
    ("unlabeled", (0, 0, 0)),
    ("building", (70, 70, 70)),
    ("fence", (100, 40, 40)),
    ("other", (55, 90, 80)),
    ("pedestrian", (220, 20, 60)),
    ("pole", (153, 153, 153)),
    ("road_line", (157, 234, 50)),
    ("road", (128, 64, 128)),
    ("sidewalk", (244, 35, 232)),
    ("vegetation", (107, 142, 35)),
    ("car", (0, 0, 142)),  # "Vehicles"; also the ego car's hood in the Lyft-Udacity set
    ("wall", (102, 102, 156)),
    ("traffic_sign", (220, 220, 0)),
]

# How a canonical name is written in the legacy set when the set has no tag of its own for it.
_LEGACY_FALLBACK = {
    "sky": "unlabeled",
    "terrain": "other",
    "traffic_light": "traffic_sign",  # legacy CARLA tagged lights and signs alike
    "rider": "pedestrian",
    "truck": "car",
    "bus": "car",
    "train": "car",
    "motorcycle": "car",
    "bicycle": "car",
    "static": "other",
    "dynamic": "other",
    "water": "other",
    "ground": "other",
    "bridge": "other",
    "rail_track": "other",
    "guard_rail": "fence",
}


@dataclass(frozen=True)
class TagSet:
    """One CARLA tag set: tag id -> canonical name and palette colour."""

    name: str
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    fallback: dict[str, str]

    @property
    def num_tags(self) -> int:
        return len(self.names)

    def tag_id(self, canonical: str) -> int:
        """The tag id this set writes for a canonical name (falling back where it has none)."""
        name = canonical if canonical in self.names else self.fallback.get(canonical)
        if name is None or name not in self.names:
            raise KeyError(f"tag {canonical!r} has no id in tag set {self.name!r}")
        return self.names.index(name)

    def palette(self) -> np.ndarray:
        """(num_tags, 3) uint8 CityScapes-palette colours, indexed by tag id."""
        return np.asarray(self.colors, dtype=np.uint8)


TAGSETS: dict[str, TagSet] = {
    "carla29": TagSet("carla29", tuple(n for n, _ in _CARLA29), tuple(c for _, c in _CARLA29), {}),
    "legacy13": TagSet(
        "legacy13", tuple(n for n, _ in _LEGACY13), tuple(c for _, c in _LEGACY13), _LEGACY_FALLBACK
    ),
}
CANONICAL_NAMES: tuple[str, ...] = TAGSETS["carla29"].names


def get_tagset(name: str) -> TagSet:
    """Look a tag set up by name; an unknown name lists the valid ones."""
    if name not in TAGSETS:
        raise ValueError(f"unknown tag set {name!r}; valid: {sorted(TAGSETS)}")
    return TAGSETS[name]


# Task: ordered class name -> canonical tag names merged into it; "rest" takes every other tag
# (None: ignored in the loss and the metrics).
@dataclass(frozen=True)
class TaskSpec:
    classes: dict[str, tuple[str, ...]]
    rest: str | None


_VEHICLES = ("car", "truck", "bus", "train", "motorcycle", "bicycle")
TASKS: dict[str, TaskSpec] = {
    "driving": TaskSpec(
        {
            "background": ("unlabeled", "other", "static", "dynamic", "water", "ground", "bridge",
                           "rail_track"),
            "road": ("road",),
            "lane": ("road_line",),
            "sidewalk": ("sidewalk",),
            "building": ("building",),
            "wall_fence": ("wall", "fence", "guard_rail"),
            "pole": ("pole",),
            "traffic_light": ("traffic_light",),
            "traffic_sign": ("traffic_sign",),
            "vegetation": ("vegetation", "terrain"),
            "sky": ("sky",),
            "vehicle": _VEHICLES,
            "pedestrian": ("pedestrian", "rider"),
        },
        rest="background",
    ),
    # The paper's lane-and-object task.
    "lane_object": TaskSpec(
        {
            "background": (),
            "road": ("road",),
            "lane": ("road_line",),
            "vehicle": _VEHICLES,
            "pedestrian": ("pedestrian", "rider"),
        },
        rest="background",
    ),
    # Every tag of the tag set is its own class (filled in by build_label_map).
    "full": TaskSpec({}, rest=None),
}


@dataclass(frozen=True)
class LabelMap:
    """Maps the tag ids of one tag set to the classes of one task."""

    tagset: str
    task: str
    class_names: tuple[str, ...]
    lut: np.ndarray  # (256,) uint8: tag id -> class index, IGNORE_INDEX for dropped/unknown ids

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __call__(self, tags: np.ndarray) -> np.ndarray:
        """Map an array of tag ids to class indices (IGNORE_INDEX where dropped)."""
        return self.lut[tags]


def build_label_map(tagset: str, task: str) -> LabelMap:
    """Build the tag-id -> class lookup of ``task`` for ``tagset``.

    Classes whose tags the tag set cannot express (e.g. ``sky`` in ``legacy13``) are dropped, so a
    model never has an output it can never be trained on.
    """
    ts = get_tagset(tagset)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {sorted(TASKS)}")
    spec = TASKS[task]
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    if not spec.classes:  # "full"
        lut[: ts.num_tags] = np.arange(ts.num_tags, dtype=np.uint8)
        return LabelMap(tagset, task, ts.names, lut)
    names: list[str] = []
    assigned: set[int] = set()
    for cls, tags in spec.classes.items():
        ids = {ts.names.index(t) for t in tags if t in ts.names}
        if not ids and cls != spec.rest:
            continue
        index = len(names)
        names.append(cls)
        for i in ids - assigned:
            lut[i] = index
        assigned |= ids
    if spec.rest is not None:
        rest_index = names.index(spec.rest)
        for i in range(ts.num_tags):
            if i not in assigned:
                lut[i] = rest_index
    return LabelMap(tagset, task, tuple(names), lut)


def class_colors(label_map: LabelMap) -> np.ndarray:
    """(num_classes, 3) uint8 display colours: each class takes the palette colour of its first tag."""
    palette = get_tagset(label_map.tagset).palette()
    colors = np.zeros((label_map.num_classes, 3), dtype=np.uint8)
    for tag_id in range(len(palette) - 1, -1, -1):  # reverse, so the lowest tag id wins
        cls = label_map.lut[tag_id]
        if cls != IGNORE_INDEX:
            colors[cls] = palette[tag_id]
    return colors
