"""Towns and weathers per vehicle: what makes each client of the synthetic fleet non-IID.

Each vehicle drives in its own town (``town_style``: one of five archetypes, with a palette and
geometry drawn from the seed) under its own mix of ``WEATHERS`` (``weather_mix``).
"""

from __future__ import annotations

import numpy as np

from fedseg.data.synthetic._streams import TOWN, WEATHER, generator
from fedseg.data.synthetic.styles import RGB, WEATHERS, TownStyle

# Archetypes: the geometry and density side of a town (the palette is drawn per town).
_ARCHETYPES: dict[str, dict] = {
    "downtown": {"lanes": (2, 4), "lane_width": 3.3, "two_way": 0.7, "dash": (3.0, 6.0), "edge_lines": False,
        "curvature": 0.0008, "intersection": 0.6, "sidewalk": (2.5, 5.0), "sidewalk_prob": 1.0,
        "verge": "sidewalk", "blocks": (0.8, 0.05, 0.05, 0.05, 0.05), "setback": (0.0, 1.5),
        "building_height": (12.0, 45.0), "trees": 0.3, "conifers": 0.0, "street_trees": 0.5,
        "guard_rail": 0.0, "skyline": "city", "skyline_height": (25.0, 90.0), "lamp_spacing": 22.0,
        "signs": 1.2, "lights": 0.9, "props": 1.5, "traffic": 4.0, "truck": 0.1, "pedestrians": 1.2,
        "camera_height": (1.3, 1.7), "pitch": (-6.0, 0.0), "yaw": (-4.0, 4.0), "fov": (80.0, 95.0),
        "hood": 0.0},
    "suburb": {"lanes": (2, 2), "lane_width": 3.2, "two_way": 1.0, "dash": (3.0, 5.0), "edge_lines": False,
        "curvature": 0.002, "intersection": 0.35, "sidewalk": (1.5, 2.5), "sidewalk_prob": 0.9,
        "verge": "terrain", "blocks": (0.4, 0.3, 0.05, 0.15, 0.1), "setback": (2.0, 8.0),
        "building_height": (5.0, 10.0), "trees": 1.2, "conifers": 0.2, "street_trees": 0.8,
        "guard_rail": 0.0, "skyline": "trees", "skyline_height": (8.0, 18.0), "lamp_spacing": 30.0,
        "signs": 0.8, "lights": 0.3, "props": 0.5, "traffic": 2.0, "truck": 0.05, "pedestrians": 0.6,
        "camera_height": (1.4, 1.9), "pitch": (-8.0, -2.0), "yaw": (-6.0, 6.0), "fov": (70.0, 90.0),
        "hood": 0.12},
    "highway": {"lanes": (3, 5), "lane_width": 3.6, "two_way": 0.5, "dash": (4.0, 8.0), "edge_lines": True,
        "curvature": 0.0012, "intersection": 0.05, "sidewalk": (1.5, 2.0), "sidewalk_prob": 0.15,
        "verge": "ground", "blocks": (0.15, 0.45, 0.2, 0.15, 0.05), "setback": (4.0, 15.0),
        "building_height": (6.0, 20.0), "trees": 0.8, "conifers": 0.5, "street_trees": 0.0,
        "guard_rail": 0.9, "skyline": "trees", "skyline_height": (8.0, 20.0), "lamp_spacing": 40.0,
        "signs": 1.0, "lights": 0.05, "props": 0.2, "traffic": 3.0, "truck": 0.35, "pedestrians": 0.1,
        "camera_height": (1.8, 2.6), "pitch": (-5.0, 1.0), "yaw": (-3.0, 3.0), "fov": (60.0, 80.0),
        "hood": 0.08},
    "industrial": {"lanes": (2, 3), "lane_width": 3.5, "two_way": 0.8, "dash": (3.0, 9.0),
        "edge_lines": True, "curvature": 0.001, "intersection": 0.4, "sidewalk": (1.0, 2.0),
        "sidewalk_prob": 0.6, "verge": "ground", "blocks": (0.45, 0.05, 0.25, 0.25, 0.0),
        "setback": (0.0, 6.0), "building_height": (6.0, 15.0), "trees": 0.3, "conifers": 0.1,
        "street_trees": 0.1, "guard_rail": 0.3, "skyline": "city", "skyline_height": (10.0, 30.0),
        "lamp_spacing": 25.0, "signs": 1.2, "lights": 0.4, "props": 1.0, "traffic": 2.0, "truck": 0.45,
        "pedestrians": 0.3, "camera_height": (1.5, 2.2), "pitch": (-6.0, 0.0), "yaw": (-6.0, 6.0),
        "fov": (85.0, 100.0), "hood": 0.1},
    "rural": {"lanes": (1, 2), "lane_width": 3.0, "two_way": 1.0, "dash": (2.0, 8.0), "edge_lines": True,
        "curvature": 0.003, "intersection": 0.1, "sidewalk": (1.0, 1.5), "sidewalk_prob": 0.2,
        "verge": "terrain", "blocks": (0.1, 0.6, 0.05, 0.1, 0.15), "setback": (3.0, 12.0),
        "building_height": (4.0, 9.0), "trees": 2.0, "conifers": 0.4, "street_trees": 0.0, "guard_rail": 0.3,
        "skyline": "trees", "skyline_height": (10.0, 25.0), "lamp_spacing": 60.0, "signs": 0.6,
        "lights": 0.05, "props": 0.2, "traffic": 0.8, "truck": 0.2, "pedestrians": 0.15,
        "camera_height": (1.3, 1.8), "pitch": (-7.0, -1.0), "yaw": (-8.0, 8.0), "fov": (75.0, 95.0),
        "hood": 0.0},
}

# Shared colour pools: towns draw from the same pools, so road, sidewalk, building and car greys
# overlap across (and within) towns and colour alone cannot tell the classes apart.
_BUILDINGS = ((90, 90, 92), (130, 128, 125), (165, 160, 150), (190, 185, 175), (200, 180, 150), (150, 85, 65),
              (120, 70, 55), (175, 150, 120), (90, 100, 115), (210, 205, 195), (110, 120, 100), (70, 75, 80))
_CARS = ((230, 230, 228), (30, 30, 32), (120, 120, 122), (170, 172, 175), (160, 20, 25), (30, 50, 120),
         (40, 70, 45), (190, 175, 140), (90, 100, 70), (200, 120, 30), (60, 90, 140), (85, 85, 80))
_GREENS = ((60, 100, 40), (80, 120, 45), (45, 80, 35), (100, 130, 50), (70, 95, 60), (90, 110, 80))
_AUTUMN = ((160, 120, 40), (140, 80, 30), (120, 110, 50))


def _grey(rng: np.random.Generator, lo: float, hi: float, tint: float = 8.0) -> RGB:
    g = rng.uniform(lo, hi)
    noise = rng.uniform(-tint, tint, 3).tolist()
    return tuple(max(0, min(255, int(g + n))) for n in noise)  # type: ignore[return-value]


def _choose(rng: np.random.Generator, pool: tuple, k: int) -> tuple:
    return tuple(pool[i] for i in rng.choice(len(pool), size=k, replace=False))


def _palette(rng: np.random.Generator) -> dict:
    """The colours of one town, drawn from pools shared by all towns."""
    autumn = rng.random() < 0.3
    greens = _choose(rng, _GREENS, 3) + (_choose(rng, _AUTUMN, 2) if autumn else ())
    grass = tuple(int(c) for c in rng.choice([(85, 125, 55), (110, 140, 60), (150, 140, 85), (95, 110, 70)]))
    cars = _choose(rng, _CARS, 6)
    return {
        "road_rgb": _grey(rng, 65, 130), "line_rgb": _grey(rng, 195, 235, 6),
        "sidewalk_rgb": _grey(rng, 100, 175),
        "centre_rgb": (225, 180, 40) if rng.random() < 0.6 else _grey(rng, 195, 235, 6),
        "curb_rgb": _grey(rng, 150, 200), "terrain_rgb": grass, "ground_rgb": _grey(rng, 95, 140, 20),
        "building_rgbs": _choose(rng, _BUILDINGS, 4), "window_rgb": _grey(rng, 40, 95, 15),
        "vegetation_rgbs": greens, "wall_rgb": _choose(rng, _BUILDINGS, 1)[0],
        "fence_rgb": tuple(int(c) for c in rng.choice(
            [(120, 90, 60), (140, 140, 140), (50, 90, 60), (90, 90, 95)])),
        "pole_rgb": _grey(rng, 50, 150, 10), "light_housing": tuple(int(c) for c in rng.choice(
            [(35, 35, 35), (190, 160, 40), (40, 60, 45)])),
        "car_rgbs": cars, "hood_rgb": cars[0],
    }


def town_style(vehicle_index: int, seed: int) -> TownStyle:
    """The town vehicle ``vehicle_index`` drives in: archetype ``i mod 5`` (downtown, suburb,
    highway, industrial, rural), with palette and geometry drawn from ``seed``."""
    rng = generator(seed, TOWN, vehicle_index)
    name = list(_ARCHETYPES)[vehicle_index % len(_ARCHETYPES)]
    geometry = dict(_ARCHETYPES[name])
    blocks = np.asarray(geometry["blocks"]) * rng.uniform(0.6, 1.4, 5)
    geometry["blocks"] = tuple((blocks / blocks.sum()).tolist())
    lo, hi = geometry["building_height"]
    geometry["building_height"] = (lo * rng.uniform(0.8, 1.2), hi * rng.uniform(0.8, 1.2))
    for key in ("trees", "traffic", "pedestrians", "signs", "props"):
        geometry[key] *= float(rng.uniform(0.7, 1.3))
    # Each vehicle's camera mount: a pose range centred on its own offset (non-IID viewpoints).
    for key, spread in (("pitch", 2.0), ("yaw", 2.0), ("camera_height", 0.15)):
        shift = float(rng.uniform(-spread, spread))
        geometry[key] = tuple(v + shift for v in geometry[key])
    return TownStyle(archetype=name, yellow_centre=bool(rng.random() < 0.6),
                     line_width=float(rng.uniform(0.12, 0.2)), tile=float(rng.uniform(0.4, 1.0)),
                     **_palette(rng), **geometry)


def weather_mix(vehicle_index: int, seed: int) -> dict[str, float]:
    """Per-vehicle probabilities over ``WEATHERS``: mostly clear, the rest skewed per vehicle."""
    rng = generator(seed, WEATHER, vehicle_index)
    p = 0.65 * rng.dirichlet(np.full(len(WEATHERS), 0.6))
    p[0] += 0.35  # "clear" is everyone's most common weather
    return {name: float(q) for name, q in zip(WEATHERS, p / p.sum(), strict=True)}
