"""Procedural CARLA-like driving scenes: the embedded default dataset.

Each vehicle of the fleet drives in its own *town* (a ``TownStyle``: archetype, palette, building
height and density, vegetation, lanes and markings, traffic, camera pose range) under its own mix
of weathers, so clients are non-IID as in a real fleet. Frames are written in CARLA's camera
format (``CameraRGB/*.png`` and ``CameraSeg/*.png`` with the tag id in the red channel), and
every frame is a pure function of ``(seed, vehicle, frame)``: the same arguments always give
byte-identical files.

Geometry and drawing live in ``_scene`` and its siblings (``_canvas``, ``_ground``, ``_roadside``,
``_furniture``, ``_agents``); this module holds the towns, the weathers, the camera
"development" (light, fog, rain, glow, sensor noise, blur) and the on-disk fleet.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from fedseg.data import _scene
from fedseg.labels import CANONICAL_NAMES, get_tagset

FORMAT_VERSION = 1  # bump whenever generated pixels change, so stale caches are noticed
RGB = tuple[int, int, int]
_TOWN, _WEATHER, _FRAME, _HELDOUT = range(4)  # independent random streams of one seed


@dataclass(frozen=True)
class TownStyle:
    """Everything that makes one vehicle's town look like itself (see ``town_style``)."""

    archetype: str
    # palette
    road_rgb: RGB
    line_rgb: RGB
    centre_rgb: RGB
    sidewalk_rgb: RGB
    curb_rgb: RGB
    terrain_rgb: RGB
    ground_rgb: RGB
    building_rgbs: tuple[RGB, ...]
    window_rgb: RGB
    vegetation_rgbs: tuple[RGB, ...]
    wall_rgb: RGB
    fence_rgb: RGB
    pole_rgb: RGB
    light_housing: RGB
    car_rgbs: tuple[RGB, ...]
    hood_rgb: RGB
    # road
    lanes: tuple[int, int]
    lane_width: float
    two_way: float  # probability that some lanes are oncoming
    yellow_centre: bool
    line_width: float
    dash: tuple[float, float]  # dash length, gap (m)
    edge_lines: bool
    curvature: float  # max |k| of the centre line x = k z^2
    sidewalk: tuple[float, float]  # width range (m)
    sidewalk_prob: float
    tile: float  # paving tile size (m)
    verge: str  # canonical label beyond the sidewalk
    intersection: float
    # roadside
    blocks: tuple[float, float, float, float, float]  # weights: building, trees, wall, fence, hedge
    setback: tuple[float, float]
    building_height: tuple[float, float]
    trees: float  # per 10 m of open block
    conifers: float
    street_trees: float
    guard_rail: float
    skyline: str  # "city" or "trees"
    skyline_height: tuple[float, float]
    # street furniture and agents
    lamp_spacing: float
    signs: float
    lights: float
    props: float
    traffic: float  # vehicles per 100 m per lane
    truck: float
    pedestrians: float
    # camera
    camera_height: tuple[float, float]
    pitch: tuple[float, float]  # degrees, + up
    yaw: tuple[float, float]  # degrees, + right
    fov: tuple[float, float]  # horizontal, degrees
    hood: float  # fraction of the image height covered by the ego bonnet (0: none)


@dataclass(frozen=True)
class Weather:
    """Light and atmosphere of a frame; jittered per frame by ``render_scene``."""

    name: str
    light: float
    tint: tuple[float, float, float]  # colour temperature
    sky_top: RGB
    sky_horizon: RGB
    clouds: float
    cloud_rgb: RGB
    fog: float  # extinction per metre
    fog_rgb: RGB
    rain: float
    shadow: float  # how dark shadows are (0: none)
    shadow_len: float  # shadow length per metre of building height
    glow: float  # strength of lamps, lit windows and headlights (0: off)
    noise: float  # sensor noise std (grey levels)
    blur: float  # gaussian blur radius at 128 px width


WEATHERS: dict[str, Weather] = {w.name: w for w in (
    Weather("clear", 1.0, (1.0, 1.0, 1.0), (55, 115, 200), (175, 200, 225), 0.35, (240, 240, 242), 0.002,
            (190, 205, 220), 0.0, 0.45, 0.7, 0.0, 2.5, 0.35),
    Weather("dusk", 0.75, (1.15, 0.85, 0.65), (70, 70, 130), (250, 160, 100), 0.45, (235, 150, 120), 0.004,
            (190, 130, 105), 0.0, 0.35, 2.0, 0.5, 4.0, 0.45),
    Weather("fog", 0.85, (0.95, 0.97, 1.0), (175, 180, 186), (200, 202, 205), 0.0, (200, 200, 200), 0.03,
            (185, 188, 192), 0.0, 0.0, 0.0, 0.3, 3.5, 0.6),
    Weather("rain", 0.65, (0.9, 0.95, 1.05), (95, 100, 110), (150, 155, 162), 0.9, (120, 124, 130), 0.008,
            (105, 110, 118), 0.7, 0.0, 0.0, 0.6, 5.0, 0.5),
    Weather("night", 0.25, (0.85, 0.95, 1.25), (5, 8, 22), (30, 35, 60), 0.25, (35, 35, 45), 0.004,
            (12, 12, 20), 0.0, 0.0, 0.0, 1.0, 7.0, 0.55),
)}

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
    rng = _generator(seed, _TOWN, vehicle_index)
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
    rng = _generator(seed, _WEATHER, vehicle_index)
    p = 0.65 * rng.dirichlet(np.full(len(WEATHERS), 0.6))
    p[0] += 0.35  # "clear" is everyone's most common weather
    return {name: float(q) for name, q in zip(WEATHERS, p / p.sum(), strict=True)}


def render_scene(rng: np.random.Generator, style: TownStyle, weather: Weather,
                 size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Render one frame.

    Returns the (H, W, 3) uint8 RGB image and the (H, W) uint8 map of indices into
    ``fedseg.labels.CANONICAL_NAMES``. ``size`` is (H, W); all randomness comes from ``rng``.
    """
    rgb, label, depth, glow = _scene.compose(rng, style, weather, size)
    return _scene.develop(rng, rgb, label, depth, glow, weather), label


def _generator(seed: int, *path: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *path]))


def _fleet_params(num_vehicles: int, frames_per_vehicle: int, heldout_frames: int,
                  image_size: tuple[int, int], tagset: str, seed: int) -> dict:
    get_tagset(tagset)  # unknown names raise, listing the valid ones
    checks = {"num_vehicles": (num_vehicles, 1), "frames_per_vehicle": (frames_per_vehicle, 1),
              "heldout_frames": (heldout_frames, 0), "seed": (seed, 0)}
    for name, (value, least) in checks.items():
        if not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"generate_fleet: {name} must be an integer >= {least}, got {value!r}")
    if len(image_size) != 2 or min(image_size) < 16:
        raise ValueError(f"generate_fleet: image_size must be (H, W) with both >= 16, got {image_size!r}")
    return {"num_vehicles": int(num_vehicles), "frames_per_vehicle": int(frames_per_vehicle),
            "heldout_frames": int(heldout_frames), "image_size": [int(image_size[0]), int(image_size[1])],
            "tagset": tagset, "seed": int(seed)}


def _is_cached(root: Path, params: dict) -> bool:
    """True if ``root`` already holds this fleet; raises if it holds something else."""
    manifest = root / "fleet.json"
    if manifest.is_file():
        found = json.loads(manifest.read_text())
        wanted = {"format_version": FORMAT_VERSION, **params}
        have = {"format_version": found.get("format_version"), **found.get("params", {})}
        if have == wanted:
            return True
        diff = ", ".join(f"{k}: {have.get(k)!r} on disk, {v!r} asked"
                         for k, v in wanted.items() if have.get(k) != v)
        raise ValueError(f"{root} holds a synthetic fleet generated with other parameters ({diff}); "
                         "delete that folder or choose another root")
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists but is not a synthetic fleet (no fleet.json); "
                              "delete it or choose another root")
    return False


def _save_frame(folder: Path, index: int, rgb: np.ndarray, tags: np.ndarray) -> None:
    """One frame in CARLA's format: the tag id in the red channel of the segmentation PNG."""
    seg = np.zeros((*tags.shape, 3), np.uint8)
    seg[..., 0] = tags
    for sub, image in (("CameraRGB", rgb), ("CameraSeg", seg)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        # Level 1: sensor noise makes RGB frames nearly incompressible; 4x faster than the default.
        Image.fromarray(image).save(folder / sub / f"{index:06d}.png", compress_level=1)


def _write_fleet(out: Path, params: dict, progress: bool) -> None:
    n, seed, size = params["num_vehicles"], params["seed"], tuple(params["image_size"])
    tagset = get_tagset(params["tagset"])
    to_tag = np.array([tagset.tag_id(name) for name in CANONICAL_NAMES], np.uint8)
    towns = [town_style(v, seed) for v in range(n)]
    mixes = [weather_mix(v, seed) for v in range(n)]
    # (folder, frame index, town, random stream); held-out frames cycle through every town.
    jobs = [(f"vehicle_{v:02d}", k, v, (_FRAME, v, k))
            for v in range(n) for k in range(params["frames_per_vehicle"])]
    jobs += [("heldout", j, j % n, (_HELDOUT, j)) for j in range(params["heldout_frames"])]
    for folder, index, town, stream in tqdm(jobs, desc="synthetic fleet", unit="frame",
                                            disable=not progress):
        rng = _generator(seed, *stream)
        weather = WEATHERS[str(rng.choice(list(mixes[town]), p=list(mixes[town].values())))]
        rgb, label = render_scene(rng, towns[town], weather, size)
        _save_frame(out / folder, index, rgb, to_tag[label])
    manifest = {"format_version": FORMAT_VERSION, "generator": "fedseg.data.synthetic", "params": params,
                "vehicles": {f"vehicle_{v:02d}": {"town": towns[v].archetype, "weather_mix": mixes[v]}
                             for v in range(n)}}
    (out / "fleet.json").write_text(json.dumps(manifest, indent=2))  # last: marks the fleet complete


def generate_fleet(root: Path, *, num_vehicles: int, frames_per_vehicle: int, heldout_frames: int,
                   image_size: tuple[int, int], tagset: str = "carla29", seed: int = 0,
                   progress: bool = True) -> Path:
    """Write a synthetic fleet under ``root`` and return ``root``.

    Layout: ``root/vehicle_{i:02d}/{CameraRGB,CameraSeg}/{k:06d}.png`` for each vehicle, the same
    under ``root/heldout`` (server-side evaluation frames from every town, on random streams of
    their own; absent when ``heldout_frames`` is 0), and ``root/fleet.json`` (parameters and
    format version) written last. ``image_size`` is (H, W); seg PNGs hold ``tagset``'s tag ids in
    the red channel, green and blue are 0.

    Cache: if ``root/fleet.json`` records the same parameters, nothing is written. If it records
    other parameters (or ``root`` holds anything else), a ``ValueError`` / ``FileExistsError``
    says so: a fleet is never silently overwritten. The fleet is generated in a sibling
    ``<root>.tmp-<pid>`` folder and renamed into place, so an interrupted run never leaves a
    half fleet that looks complete, and concurrent callers agree on one result.
    """
    root = Path(root)
    params = _fleet_params(num_vehicles, frames_per_vehicle, heldout_frames, image_size, tagset, seed)
    if _is_cached(root, params):
        return root
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_fleet(tmp, params, progress)
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, root)  # atomic; also replaces an empty directory
        except OSError:
            if not _is_cached(root, params):  # another process may have just written the same fleet
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
