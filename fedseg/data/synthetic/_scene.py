"""One synthetic driving scene: layout, drawing and camera development (private to ``synthetic``).

A frame is built in two passes, then developed like a camera would (``develop``):

1. *Ground and sky, per pixel* (``_ground``). Every pixel's ray is intersected with the ground
   plane; the hit point's world coordinates decide road / lane line / sidewalk / verge
   analytically, so lane lines thin out with distance and textures are perspective-correct.
2. *Objects, painter's algorithm* (``_roadside``, ``_furniture``, ``_agents``). Facades, walls,
   trees, poles, signs, vehicles and pedestrians are polygons drawn far to near with PIL into an
   RGB, a label and a depth image at once (``_canvas.Canvas``): the same coordinates go to all
   three, so labels match pixels exactly.
3. *Development* (``develop``, here). Surface texture noise, light and colour temperature, glow of
   lights, fog by depth, rain streaks, vignette, sensor noise and blur (labels are untouched).

World frame: x right, y up, z forward; the camera sits at ``(cam.x, cam.height, 0)``. The road
centre line is ``x = curve * z**2``. ``side`` is -1 (left) or +1 (right).

Every random draw comes from the one ``rng`` passed in, in a fixed order (road, camera, textures,
roadside and furniture per side, traffic, pedestrians, skyline, development): reordering calls
changes every generated pixel, so it needs a ``FORMAT_VERSION`` bump (in ``fleet``).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fedseg.data.synthetic._agents import draw_hood, pedestrians, traffic
from fedseg.data.synthetic._canvas import ID, ZMAX, Camera, Canvas, Item, Road
from fedseg.data.synthetic._furniture import furniture
from fedseg.data.synthetic._ground import ground_and_sky
from fedseg.data.synthetic._roadside import roadside, skyline
from fedseg.data.synthetic.styles import TownStyle, Weather


def _camera(rng: np.random.Generator, style: TownStyle, road: Road, size: tuple[int, int]) -> Camera:
    lane = int(rng.integers(road.oncoming, road.lanes))
    fov = math.radians(rng.uniform(*style.fov))
    return Camera(x=road.lane_x(lane, 0.0) + rng.uniform(-0.3, 0.3), height=rng.uniform(*style.camera_height),
                  pitch=math.radians(rng.uniform(*style.pitch)), yaw=math.radians(rng.uniform(*style.yaw)),
                  focal=size[1] / 2 / math.tan(fov / 2), size=size)


def _road(rng: np.random.Generator, style: TownStyle) -> Road:
    lanes = int(rng.integers(style.lanes[0], style.lanes[1] + 1))
    oncoming = int(rng.integers(1, lanes)) if lanes > 1 and rng.random() < style.two_way else 0
    if oncoming and lanes == 2:
        oncoming = 1
    walk = tuple(float(rng.uniform(*style.sidewalk)) if rng.random() < style.sidewalk_prob else 0.0
                 for _ in range(2))
    verge = ID[style.verge]
    cross = None
    if rng.random() < style.intersection:
        c0 = float(rng.uniform(12, 45))
        cross = (c0, c0 + float(rng.uniform(8, 14)))
    return Road(curve=float(rng.uniform(-1, 1) * style.curvature), lanes=lanes,
                lane_w=float(style.lane_width * rng.uniform(0.92, 1.08)), oncoming=oncoming,
                walk=walk, verge=(verge, verge), cross=cross,  # type: ignore[arg-type]
                dash=(*style.dash, float(rng.uniform(0, 10))))


def compose(rng: np.random.Generator, style: TownStyle, weather: Weather,
            size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lay out and draw one scene: rgb float (H, W, 3), label (H, W) uint8, depth (m), glow."""
    road = _road(rng, style)
    cam = _camera(rng, style, road, size)
    tex = rng.standard_normal((4, 64, 64))
    sun = int(rng.choice([-1, 1]))  # buildings on this side cast shadows across the road
    shade_edge = np.full(int(ZMAX) + 1, np.inf)
    items: list[Item] = []
    for side in (-1, 1):
        shade = (shade_edge, weather.shadow_len) if side == sun else None
        items += roadside(rng, road, style, cam, side, shade)
        items += furniture(rng, road, style, cam, side)
    items += traffic(rng, road, style, cam)
    items += pedestrians(rng, road, style, cam)
    items += skyline(rng, road, style, cam)
    rgb, label, depth = ground_and_sky(cam, road, style, weather, tex, shade_edge, sun)
    canvas = Canvas(cam, road, weather, rgb, label, depth)
    for _, draw in sorted(items, key=lambda item: -item[0]):
        draw(canvas)
    if style.hood > 0:
        draw_hood(canvas, style.hood, style.hood_rgb)
    return (np.asarray(canvas.rgb, np.float32), np.asarray(canvas.label).copy(),
            np.asarray(canvas.depth).copy(), np.asarray(canvas.glow, np.float32))


# --------------------------------------------------------------------- camera development ------

# Screen-space texture strength per class: every surface is noisy, none is a flat colour.
_SURFACE_NOISE = np.full(len(ID), 0.06)
for _name, _amp in (("vegetation", 0.22), ("terrain", 0.12), ("building", 0.09), ("wall", 0.1),
                    ("sky", 0.015), ("car", 0.05), ("road_line", 0.08)):
    _SURFACE_NOISE[ID[_name]] = _amp


def develop(rng: np.random.Generator, rgb: np.ndarray, label: np.ndarray, depth: np.ndarray,
            glow: np.ndarray, weather: Weather) -> np.ndarray:
    """Surface texture, light, glow, fog, rain and the sensor (vignette, noise, blur)."""
    h, w = label.shape
    coarse = Image.fromarray(rng.standard_normal((h // 6 + 2, w // 6 + 2)).astype(np.float32), "F")
    texture = 0.5 * rng.standard_normal((h, w), np.float32)
    texture += np.asarray(coarse.resize((w, h), Image.Resampling.BILINEAR))
    rgb = rgb * (1 + _SURFACE_NOISE[label] * texture)[..., None]
    exposure = weather.light * rng.uniform(0.8, 1.2)  # auto-exposure and white balance vary a little
    rgb = rgb * exposure * np.asarray(weather.tint) * rng.uniform(0.93, 1.07, 3)
    if weather.glow > 0:  # lamps, lit windows, car lights; the bloom lights their surroundings
        bloom = Image.fromarray(glow.astype(np.uint8)).filter(ImageFilter.GaussianBlur(w / 30))
        rgb = rgb + weather.glow * (0.5 * glow + 2.0 * np.asarray(bloom, np.float32))
    fog = 1 - np.exp(-depth * weather.fog * rng.uniform(0.6, 1.4))[..., None]
    rgb = rgb * (1 - fog) + np.asarray(weather.fog_rgb) * weather.light * fog
    if weather.rain > 0:
        rgb = _rain(rng, rgb, weather.rain)
    v, u = np.mgrid[0:h, 0:w]
    r2 = ((u - w / 2) / (w / 2)) ** 2 + ((v - h / 2) / (h / 2)) ** 2
    rgb = rgb * (1 - rng.uniform(0.0, 0.2) * r2)[..., None]
    rgb = rgb + weather.noise * rng.uniform(0.5, 1.5) * rng.standard_normal(rgb.shape, np.float32)
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    radius = weather.blur * rng.uniform(0.5, 1.5) * w / 128  # optics and motion, scaled with resolution
    return np.asarray(image.filter(ImageFilter.GaussianBlur(radius)))


def _rain(rng: np.random.Generator, rgb: np.ndarray, amount: float) -> np.ndarray:
    """Bright slanted streaks over a slightly washed-out image."""
    h, w = rgb.shape[:2]
    layer = Image.new("L", (w, h))
    draw = ImageDraw.Draw(layer)
    n, slant = int(amount * h * w / 200), rng.uniform(-0.3, 0.3)
    xs, ys = rng.uniform(0, w, n), rng.uniform(-0.1 * h, h, n)
    lengths, values = rng.uniform(0.03, 0.1, n) * h, rng.integers(15, 55, n)
    for x, y, length, value in zip(xs, ys, lengths, values, strict=True):
        draw.line([(x, y), (x + slant * length, y + length)], fill=int(value))
    return rgb * 0.92 + np.asarray(layer, np.float32)[..., None]
