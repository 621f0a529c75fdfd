"""The looks a synthetic frame is made of: a town's ``TownStyle`` and the ``WEATHERS`` presets.

Plain data with no dependency on the rest of the generator, so the drawing modules (``_scene`` and
its siblings) and the town and fleet modules can all import these types without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

RGB = tuple[int, int, int]


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
