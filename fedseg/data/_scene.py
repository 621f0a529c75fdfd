"""Geometry and drawing of one synthetic driving scene (private to ``fedseg.data.synthetic``).

A frame is built in two passes, then developed like a camera would (``develop``):

1. *Ground and sky, per pixel.* Every pixel's ray is intersected with the ground plane; the hit
   point's world coordinates (lateral ``X``, forward ``Z``, metres) decide road / lane line /
   sidewalk / verge analytically, so lane lines thin out with distance as perspective demands and
   textures (asphalt patches, paving tiles) are perspective-correct.
2. *Objects, painter's algorithm.* Facades, walls, trees, poles, signs, vehicles and pedestrians
   are polygons drawn far to near with PIL into an RGB, a label and a depth image at once: the
   same coordinates go to all three, so labels match pixels exactly.
3. *Development.* Surface texture noise, light and colour temperature, glow of lights, fog by
   depth, rain streaks, vignette, sensor noise and blur (labels are untouched).

World frame: x right, y up, z forward; the camera sits at ``(cam.x, cam.height, 0)``. The road
centre line is ``x = curve * z**2``. ``side`` is -1 (left) or +1 (right).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property, partial
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fedseg.labels import CANONICAL_NAMES

if TYPE_CHECKING:
    from fedseg.data.synthetic import TownStyle, Weather

ID = {name: i for i, name in enumerate(CANONICAL_NAMES)}
ZMAX = 200.0  # farthest ground point drawn; the skyline just before it hides the horizon
NEAR = 0.6  # near plane (camera depth, m): polygons are clipped here
SKY_DEPTH = 240.0  # depth given to sky pixels: fog then tints the sky like a far horizon
RGB = tuple[int, int, int]
Item = tuple[float, Callable[["Canvas"], None]]


@dataclass(frozen=True)
class Camera:
    """Pinhole camera: height above the road, pitch (+ up) and yaw (+ right) in radians."""

    x: float
    height: float
    pitch: float
    yaw: float
    focal: float  # pixels
    size: tuple[int, int]  # (H, W)

    @cached_property
    def trig(self) -> tuple[float, float, float, float]:
        return math.cos(self.yaw), math.sin(self.yaw), math.cos(self.pitch), math.sin(self.pitch)

    def to_camera(self, x, y, z):  # type: ignore[no-untyped-def]  # floats or arrays alike
        """World points -> camera coordinates (right, up, depth)."""
        cy, sy, cp, sp = self.trig
        dx, dy = x - self.x, y - self.height
        xr, zr = cy * dx - sy * z, sy * dx + cy * z
        return xr, cp * dy - sp * zr, cp * zr + sp * dy

    def project(self, x: float, y: float, z: float) -> tuple[float, float, float]:
        """One world point -> pixel (u, v) and camera depth (callers skip depths below NEAR)."""
        xr, yc, zc = self.to_camera(x, y, z)
        inv = self.focal / max(zc, 1e-3)
        return self.size[1] / 2 + xr * inv, self.size[0] / 2 - yc * inv, zc

    def rays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World direction (dx, dy, dz) of every pixel centre, each (H, W)."""
        h, w = self.size
        v, u = np.mgrid[0:h, 0:w] + 0.5
        xc, yc = (u - w / 2) / self.focal, (h / 2 - v) / self.focal
        cy, sy, cp, sp = self.trig
        zr, dy = cp - sp * yc, sp + cp * yc
        return cy * xc + sy * zr, dy, -sy * xc + cy * zr


@dataclass(frozen=True)
class Road:
    """The road ahead: lanes (the first ``oncoming`` of them drive towards the camera)."""

    curve: float
    lanes: int
    lane_w: float
    oncoming: int
    walk: tuple[float, float]  # sidewalk width left / right (0: none)
    verge: tuple[int, int]  # label beyond the sidewalk, left / right
    cross: tuple[float, float] | None  # intersection band (z0, z1)
    dash: tuple[float, float, float]  # dash length, gap, phase

    @property
    def half(self) -> float:
        return self.lanes * self.lane_w / 2

    def centre(self, z):  # type: ignore[no-untyped-def]
        return self.curve * z * z

    def lane_x(self, lane: float, z: float) -> float:
        return self.centre(z) - self.half + (lane + 0.5) * self.lane_w

    def side_x(self, side: int, offset, z):  # type: ignore[no-untyped-def]
        """x of a point ``offset`` metres beyond the road edge on ``side``."""
        return self.centre(z) + side * (self.half + offset)

    def heading(self, z: float) -> float:
        return math.atan(2 * self.curve * z)

    def crossing(self, z0: float, z1: float, margin: float = 0.0) -> bool:
        return self.cross is not None and z1 > self.cross[0] - margin and z0 < self.cross[1] + margin


class Canvas:
    """RGB, label and depth layers drawn together, plus a glow layer for lights at night."""

    def __init__(self, cam: Camera, road: Road, weather: Weather,
                 rgb: np.ndarray, label: np.ndarray, depth: np.ndarray) -> None:
        self.cam, self.road, self.weather = cam, road, weather
        self.rgb = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
        self.label = Image.fromarray(label, "L")
        self.depth = Image.fromarray(depth.astype(np.float32), "F")
        self.glow = Image.new("RGB", self.rgb.size)
        # "RGBA" lets shadows blend; opaque fills rasterise exactly as in the label layer.
        self._layers = (ImageDraw.Draw(self.rgb, "RGBA"), ImageDraw.Draw(self.label),
                        ImageDraw.Draw(self.depth))
        self._glow = ImageDraw.Draw(self.glow)

    def fill(self, xy: list, cls: int, color: RGB, depth: float) -> None:
        """A labelled polygon."""
        for draw, ink in zip(self._layers, (color, cls, float(depth)), strict=True):
            draw.polygon(xy, fill=ink)

    def bar(self, p0: tuple, p1: tuple, width: float, cls: int, color: RGB, depth: float) -> None:
        """A labelled line at least one pixel wide: thin classes (poles, far legs) never vanish."""
        w = max(1, round(width))
        for draw, ink in zip(self._layers, (color, cls, float(depth)), strict=True):
            draw.line([p0, p1], fill=ink, width=w)

    def blob(self, box: tuple, cls: int, color: RGB, depth: float) -> None:
        """A labelled ellipse in its bounding box (x0, y0, x1, y1)."""
        x0, y0, x1, y1 = box
        box = (x0, y0, max(x1, x0 + 0.5), max(y1, y0 + 0.5))
        for draw, ink in zip(self._layers, (color, cls, float(depth)), strict=True):
            draw.ellipse(box, fill=ink)

    def paint(self, xy: list, color: RGB) -> None:
        """Surface detail (windows, lights off) inside an already labelled shape."""
        self._layers[0].polygon(xy, fill=color)

    def lamp(self, xy: list, color: RGB, lit: bool, off: RGB) -> None:
        """A light: ``color`` when lit (glowing too when the weather is dark), else ``off``."""
        self._layers[0].polygon(xy, fill=color if lit else off)
        if lit and self.weather.glow > 0:
            self._glow.polygon(xy, fill=color)

    def shadow(self, xy: list) -> None:
        alpha = int(255 * self.weather.shadow)
        if alpha:
            self._layers[0].polygon(xy, fill=(0, 0, 0, alpha))

    def quad(self, xs, ys, zs) -> tuple[list, float] | None:  # type: ignore[no-untyped-def]
        """Project a 3D polygon, clipped at the near plane: (pixel vertices, mean depth) or None.

        Plain Python on purpose: for a handful of vertices it is several times faster than numpy.
        """
        pts = [self.cam.to_camera(float(x), float(y), float(z)) for x, y, z in zip(xs, ys, zs, strict=True)]
        depths = [p[2] for p in pts]
        if max(depths) < NEAR:
            return None
        if min(depths) < NEAR:
            pts = _clip_near(pts)
        f, (h, w) = self.cam.focal, self.cam.size
        xy = [(w / 2 + xr * f / zc, h / 2 - yc * f / zc) for xr, yc, zc in pts]
        return xy, sum(p[2] for p in pts) / len(pts)


def _clip_near(pts: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """Sutherland-Hodgman against depth >= NEAR, so walls beside the camera still reach the edge."""
    out = []
    for p, q in zip(pts, pts[1:] + pts[:1], strict=True):
        if p[2] >= NEAR:
            out.append(p)
        if (p[2] >= NEAR) != (q[2] >= NEAR):
            t = (NEAR - p[2]) / (q[2] - p[2])
            out.append(tuple(a + t * (b - a) for a, b in zip(p, q, strict=True)))
    return out  # type: ignore[return-value]


def lattice(table: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Smooth value noise (about N(0, 0.5)) at real coordinates, tiled on a random table whose
    side is a power of two (so ``& m`` wraps negative coordinates too)."""
    n = table.shape[0]
    flat, m = table.ravel(), n - 1
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    i0, j0 = x0.astype(np.int64) & m, (y0.astype(np.int64) & m) * n
    i1, j1 = (i0 + 1) & m, (j0 + n) & (n * n - 1)
    top = flat[j0 + i0] * (1 - fx) + flat[j0 + i1] * fx
    bottom = flat[j1 + i0] * (1 - fx) + flat[j1 + i1] * fx
    return top * (1 - fy) + bottom * fy


def _lane_lines(road: Road, style: TownStyle, rel: np.ndarray,
                z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks of painted lines and of the yellow ones among them."""
    half_w = style.line_width / 2
    length, gap, phase = road.dash
    dashed = np.mod(z + phase, length + gap) < length
    lines = np.zeros(rel.shape, bool)
    yellow = np.zeros(rel.shape, bool)
    for i in range(road.lanes + 1):
        d = np.abs(rel + road.half - i * road.lane_w)
        if i in (0, road.lanes):
            if style.edge_lines:
                lines |= np.abs(d - 0.3) < half_w  # edge line 0.3 m inside the kerb
        elif i == road.oncoming:  # centre line between the two directions: double, solid
            centre = np.abs(d - 0.13) < half_w
            lines |= centre
            yellow |= centre & style.yellow_centre
        else:
            lines |= (d < half_w) & dashed
    lines &= np.abs(rel) < road.half
    if road.cross is not None:
        c0, c1 = road.cross
        lines &= (z < c0) | (z > c1)
        zebra = (z > c0 - 4.0) & (z < c0 - 1.0) & (np.mod(rel, 1.0) < 0.5) & (np.abs(rel) < road.half - 0.2)
        lines |= zebra
    return lines, yellow & lines


def _ground_labels(road: Road, rel: np.ndarray, z: np.ndarray) -> np.ndarray:
    a, left = np.abs(rel), rel < 0
    walk = np.where(left, road.walk[0], road.walk[1])
    lab = np.where(left, road.verge[0], road.verge[1]).astype(np.uint8)
    lab[(a >= road.half) & (a < road.half + walk)] = ID["sidewalk"]
    if road.cross is not None:
        c0, c1 = road.cross
        corner = ((z > c0 - walk) & (z <= c0)) | ((z >= c1) & (z < c1 + walk))
        lab[corner & (a >= road.half) & (walk > 0)] = ID["sidewalk"]
        lab[(z > c0) & (z < c1)] = ID["road"]
    lab[a < road.half] = ID["road"]
    return lab


def _ground_lut(style: TownStyle) -> np.ndarray:
    lut = np.zeros((len(ID), 3))
    for name in ("road", "road_line", "sidewalk", "terrain", "ground"):
        lut[ID[name]] = getattr(style, f"{name.replace('road_line', 'line')}_rgb")
    return lut


_GROUND_GRAIN = np.zeros(len(ID))  # relative brightness variation of each ground surface
for _name, _amp in (("road", 0.07), ("sidewalk", 0.06), ("terrain", 0.2), ("ground", 0.15),
                   ("road_line", 0.1)):
    _GROUND_GRAIN[ID[_name]] = _amp


def _ground(cam: Camera, road: Road, style: TownStyle, weather: Weather, tex: np.ndarray,
            shade_edge: np.ndarray, sun: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel ground and sky: (rgb float (H, W, 3), label, depth)."""
    dx, dy, dz = cam.rays()
    norm = np.sqrt(dx * dx + dy * dy + dz * dz)
    t = cam.height / np.maximum(-dy, 1e-6)
    ground = (dy < -1e-6) & (t * dz < ZMAX) & (t * dz > 0)
    x, z = np.where(ground, cam.x + t * dx, 0.0), np.where(ground, t * dz, ZMAX)
    rel = x - road.centre(z)
    lab = _ground_labels(road, rel, z)
    lines, yellow = _lane_lines(road, style, rel, z)
    lab[lines] = ID["road_line"]
    rgb = _ground_lut(style)[lab]
    rgb[yellow] = style.centre_rgb
    patch, grain = lattice(tex[0], x / 3, z / 3), lattice(tex[1], x * 3, z * 3)
    f = 1 + _GROUND_GRAIN[lab] * (patch + 0.6 * grain)
    on_road, on_walk = lab == ID["road"], lab == ID["sidewalk"]
    lane_pos = np.abs(np.mod(rel + road.half, road.lane_w) - road.lane_w / 2)
    f[on_road & (np.abs(lane_pos - 0.8) < 0.3)] *= 0.9  # darker tyre tracks
    grout = (np.mod(rel, style.tile) < 0.07) | (np.mod(z, style.tile) < 0.07)
    f[on_walk & grout] *= 0.8
    rgb[on_walk & (np.abs(rel) < road.half + 0.25)] = style.curb_rgb
    shadowed = sun * rel > shade_edge[np.clip(z, 0, len(shade_edge) - 1).astype(np.int64)]
    f[shadowed] *= 1 - weather.shadow
    rgb *= f[..., None]
    if weather.rain > 0:  # puddles mirror the sky
        puddle = (on_road & (patch > 1.0 - 0.6 * weather.rain))[..., None]
        rgb = np.where(puddle, 0.35 * rgb + 0.65 * np.array(weather.sky_horizon), rgb)
    sky = ~ground
    rgb[sky] = _sky(dx[sky], dy[sky], dz[sky], norm[sky], weather, tex)
    lab[sky] = ID["sky"]
    depth = np.where(sky, SKY_DEPTH, t * norm).astype(np.float32)
    return rgb, lab, depth


def _sky(dx: np.ndarray, dy: np.ndarray, dz: np.ndarray, norm: np.ndarray, weather: Weather,
         tex: np.ndarray) -> np.ndarray:
    """Gradient from horizon to zenith, with clouds on a plane high above (so they recede)."""
    elev = dy / norm
    g = (np.clip(elev * 2.5, 0, 1) ** 0.6)[..., None]
    rgb = np.array(weather.sky_horizon) * (1 - g) + np.array(weather.sky_top) * g
    up = np.maximum(dy, 0.02)
    cx, cz = dx / up * 0.6, dz / up * 0.6
    c = lattice(tex[2], cx, cz) + 0.5 * lattice(tex[3], 2.7 * cx, 2.7 * cz)
    cover = np.clip(1.8 * (c - 0.9 + 1.4 * weather.clouds), 0, 1) * np.clip(elev * 8, 0, 1)
    shade = 1 - 0.25 * np.clip(c, 0, 1)
    cloud = np.array(weather.cloud_rgb) * shade[..., None]
    return rgb * (1 - cover[..., None]) + cloud * cover[..., None]


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


# --------------------------------------------------------------------------- objects -----------


def _jitter(rng: np.random.Generator, color: tuple, amount: float = 12.0) -> RGB:
    noise = rng.uniform(-amount, amount, 3).tolist()
    mixed = (max(0, min(255, int(c + n))) for c, n in zip(color, noise, strict=True))
    return tuple(mixed)  # type: ignore[return-value]


def _scale(color: tuple, k: float) -> RGB:
    return tuple(int(min(255.0, c * k)) for c in color)  # type: ignore[return-value]


def _pick(rng: np.random.Generator, colors: tuple, amount: float = 12.0) -> RGB:
    return _jitter(rng, colors[int(rng.integers(len(colors)))], amount)


def _key(cam: Camera, x: float, z: float) -> float:
    """Painter's order: ground distance from the camera to the object's nearest point."""
    return math.hypot(x - cam.x, max(z, 0.0))


def _spans(z0: float, z1: float) -> list[tuple[float, float]]:
    """Cut [z0, z1] into pieces growing with distance (each is drawn and depth-sorted alone)."""
    zs = [z0]
    while zs[-1] < z1 - 1e-6:
        zs.append(min(z1, zs[-1] + 2.0 + 0.15 * max(zs[-1], 0.0)))
    return list(itertools.pairwise(zs))


@dataclass(frozen=True)
class Strip:
    """A vertical band along the road edge: facade, wall, hedge, fence or guard rail."""

    side: int
    offset: float  # beyond the road edge (m)
    height: float
    cls: int
    color: RGB
    rails: tuple[tuple[float, float], ...] = ()  # see-through: only these height bands are solid
    posts: float = 0.0  # post spacing (m); 0: none
    windows: tuple | None = None  # (z0, floor height, column width, window w, window h, glass, lit)


def _draw_strip(cv: Canvas, s: Strip, za: float, zb: float) -> None:
    xa, xb = cv.road.side_x(s.side, s.offset, za), cv.road.side_x(s.side, s.offset, zb)
    for y0, y1 in s.rails or ((0.0, s.height),):
        q = cv.quad([xa, xb, xb, xa], [y0, y0, y1, y1], [za, zb, zb, za])
        if q:
            cv.fill(q[0], s.cls, s.color, q[1])
    if s.posts:
        for zp in np.arange(math.ceil(za / s.posts) * s.posts, zb, s.posts):
            xp = cv.road.side_x(s.side, s.offset, zp)
            u0, v0, d = cv.cam.project(xp, 0.0, zp)
            u1, v1, _ = cv.cam.project(xp, s.height, zp)
            if d > NEAR:
                cv.bar((u0, v0), (u1, v1), 0.12 * cv.cam.focal / d, s.cls, _scale(s.color, 0.8), d)
    if s.windows:
        _draw_windows(cv, s, za, zb)
    elif not s.rails:  # a darker coping along the top edge
        q = cv.quad([xa, xb, xb, xa], [s.height - 0.25] * 2 + [s.height] * 2, [za, zb, zb, za])
        if q:
            cv.paint(q[0], _scale(s.color, 0.75))


def _draw_windows(cv: Canvas, s: Strip, za: float, zb: float) -> None:
    z0, floor_h, col_w, win_w, win_h, glass, lit = s.windows  # type: ignore[misc]
    near = math.hypot(cv.road.side_x(s.side, s.offset, za) - cv.cam.x, max(za, NEAR))
    if win_h * cv.cam.focal / near < 0.7:  # windows under a pixel: the facade texture stands in
        return
    cols = np.arange(math.ceil((za - z0) / col_w - 0.5), (zb - z0) / col_w - 0.5)
    rows = np.arange(int((s.height - 1.5) / floor_h))
    jj, kk = np.tile(cols, len(rows)), np.repeat(rows, len(cols))
    if not len(jj):
        return
    zc = z0 + (jj + 0.5) * col_w
    zs = np.stack([zc - win_w / 2, zc + win_w / 2, zc + win_w / 2, zc - win_w / 2], 1)
    ya = 0.8 + kk * floor_h + (floor_h - win_h) / 2
    ys = np.stack([ya, ya, ya + win_h, ya + win_h], 1)
    xr, yc, zcam = cv.cam.to_camera(cv.road.side_x(s.side, s.offset - 0.02, zs), ys, zs)
    inv = cv.cam.focal / np.maximum(zcam, NEAR)
    u, v = (cv.cam.size[1] / 2 + xr * inv).tolist(), (cv.cam.size[0] / 2 - yc * inv).tolist()
    on = (lit[(jj * 7 + kk * 13).astype(int) % len(lit)] & (cv.weather.glow > 0)).tolist()
    for i in np.flatnonzero((zcam.min(1) > NEAR) & (np.ptp(yc * inv, 1) > 0.7)).tolist():
        cv.lamp(list(zip(u[i], v[i], strict=True)), (255, 214, 150), on[i], glass)


def _draw_front(cv: Canvas, s: Strip, z0: float, depth: float) -> None:
    """The end wall of a building facing the camera (gives blocks their 3D look)."""
    xa, xb = cv.road.side_x(s.side, s.offset, z0), cv.road.side_x(s.side, s.offset + depth, z0)
    q = cv.quad([xa, xb, xb, xa], [0, 0, s.height, s.height], [z0] * 4)
    if q:
        cv.fill(q[0], s.cls, _scale(s.color, 0.8), q[1])


def _strip_items(cam: Camera, road: Road, s: Strip, z0: float, z1: float) -> list[Item]:
    return [(_key(cam, road.side_x(s.side, s.offset, za), za), partial(_draw_strip, s=s, za=za, zb=zb))
            for za, zb in _spans(z0, z1)]


def _building(rng: np.random.Generator, road: Road, style: TownStyle, cam: Camera, side: int,
              offset: float, z0: float, z1: float, shade: tuple[np.ndarray, float] | None) -> list[Item]:
    h = float(rng.uniform(*style.building_height))
    floor_h, col_w = rng.uniform(2.8, 3.8), rng.uniform(2.0, 4.5)
    windows = (z0, floor_h, col_w, col_w * rng.uniform(0.35, 0.75), floor_h * rng.uniform(0.35, 0.65),
               _jitter(rng, style.window_rgb, 15), rng.random(64) < 0.3)
    s = Strip(side, offset, h, ID["building"], _pick(rng, style.building_rgbs, 10), windows=windows)
    items = _strip_items(cam, road, s, z0, z1)
    items.append((_key(cam, road.side_x(side, offset, z0), z0),
                  partial(_draw_front, s=s, z0=z0, depth=float(rng.uniform(8, 20)))))
    if shade is not None:  # this side faces away from the sun: its shadow falls across the road
        edge, length = shade
        lo, hi = int(np.clip(z0, 0, ZMAX)), int(np.clip(z1, 0, ZMAX))
        edge[lo:hi + 1] = np.minimum(edge[lo:hi + 1], road.half + offset - h * length)
    return items


def _barrier(rng: np.random.Generator, road: Road, style: TownStyle, cam: Camera, side: int,
             offset: float, z0: float, z1: float, kind: str) -> list[Item]:
    if kind == "wall":
        s = Strip(side, offset, rng.uniform(1.0, 3.0), ID["wall"], _jitter(rng, style.wall_rgb))
    elif kind == "hedge":
        s = Strip(side, offset, rng.uniform(0.8, 2.0), ID["vegetation"], _pick(rng, style.vegetation_rgbs))
    elif rng.random() < 0.4:  # board fence
        s = Strip(side, offset, rng.uniform(1.2, 2.2), ID["fence"], _jitter(rng, style.fence_rgb))
    else:  # rails on posts: the scene shows through
        h = float(rng.uniform(1.0, 2.0))
        s = Strip(side, offset, h, ID["fence"], _jitter(rng, style.fence_rgb),
                  rails=((h * 0.35, h * 0.35 + 0.12), (h - 0.15, h)), posts=float(rng.uniform(1.8, 3.0)))
    return _strip_items(cam, road, s, z0, z1)


@dataclass(frozen=True)
class Tree:
    x: float
    z: float
    trunk: float  # trunk height (m); 0: a bush
    radius: float
    blobs: tuple[tuple[float, float, float, RGB], ...]  # crown ellipses: dx, dy, r, colour
    bark: RGB
    conifer: bool


def _tree(rng: np.random.Generator, style: TownStyle, x: float, z: float, scale: float = 1.0) -> Tree:
    bush = rng.random() < 0.25
    r = rng.uniform(1.4, 3.2) * scale * (0.45 if bush else 1.0)
    n = int(rng.integers(3, 7))
    shape = rng.uniform([-0.6, -0.4, 0.5], [0.6, 0.5, 0.85], (n, 3)) * r
    greens = np.asarray(style.vegetation_rgbs)[rng.integers(len(style.vegetation_rgbs), size=n)]
    colors = np.clip(greens + rng.uniform(-18, 18, (n, 3)), 0, 255).astype(int).tolist()
    blobs = tuple((dx, dy, rr, tuple(c)) for (dx, dy, rr), c in zip(shape.tolist(), colors, strict=True))
    return Tree(x, z, 0.0 if bush else rng.uniform(1.5, 3.5) * scale, r, blobs,  # type: ignore[arg-type]
                _jitter(rng, (85, 65, 45), 15), bool(rng.random() < style.conifers) and not bush)


def _draw_tree(cv: Canvas, t: Tree) -> None:
    u0, v0, d = cv.cam.project(t.x, 0.0, t.z)
    if d < NEAR:
        return
    s, veg = cv.cam.focal / d, ID["vegetation"]
    uc, vc, _ = cv.cam.project(t.x, t.trunk + t.radius * (1.4 if t.conifer else 0.8), t.z)
    if t.trunk:
        cv.bar((u0, v0), (uc, vc), 0.3 * s, veg, t.bark, d)
    if t.conifer:
        for k, (_, _, _, color) in enumerate(t.blobs[:3]):
            w, base = t.radius * (1.0 - 0.25 * k) * s, vc + (1.2 - 0.8 * k) * t.radius * s
            cv.fill([(uc - w, base), (uc + w, base), (uc, base - 1.6 * t.radius * s)], veg, color, d)
        return
    for dx, dy, r, color in t.blobs:
        cv.blob((uc + (dx - r) * s, vc - (dy + r) * s, uc + (dx + r) * s, vc - (dy - r) * s), veg, color, d)


def _trees(rng: np.random.Generator, road: Road, style: TownStyle, cam: Camera, side: int, offset: float,
           z0: float, z1: float, density: float, spread: float = 8.0) -> list[Item]:
    items: list[Item] = []
    for _ in range(rng.poisson(max(density, 0.0) * (z1 - z0) / 10)):
        z = float(rng.uniform(z0, z1))
        x = road.side_x(side, offset + rng.uniform(0.3, spread), z)
        items.append((_key(cam, x, z), partial(_draw_tree, t=_tree(rng, style, x, z))))
    return items


_BLOCKS = ("building", "trees", "wall", "fence", "hedge")


def _roadside(rng: np.random.Generator, road: Road, style: TownStyle, cam: Camera, side: int,
              shade: tuple[np.ndarray, float] | None) -> list[Item]:
    """Blocks along one side: buildings, open ground with trees, walls, fences, hedges."""
    items: list[Item] = []
    walk = road.walk[(side + 1) // 2]
    z = -10.0
    while z < ZMAX * 0.75:
        z1 = z + float(rng.uniform(10, 40))
        if road.cross is not None and road.crossing(z, z1, walk + 1):  # keep the side street open
            if road.cross[0] - walk - 1 - z < 4:
                z = road.cross[1] + walk + 1.01
                continue
            z1 = road.cross[0] - walk - 1
        kind = _BLOCKS[int(rng.choice(len(_BLOCKS), p=style.blocks))]
        offset = walk + float(rng.uniform(*style.setback))
        if kind == "building":
            items += _building(rng, road, style, cam, side, offset, z, z1, shade)
        elif kind == "trees":
            items += _trees(rng, road, style, cam, side, walk, z, z1, style.trees)
        else:
            items += _barrier(rng, road, style, cam, side, offset, z, z1, kind)
            if rng.random() < style.blocks[0] + 0.3:
                items += _building(rng, road, style, cam, side, offset + rng.uniform(3, 10), z, z1, shade)
            else:
                items += _trees(rng, road, style, cam, side, offset + 0.5, z, z1, style.trees)
        z = z1 + (float(rng.uniform(1, 6)) if kind == "building" and rng.random() < 0.5 else 0.0)
    if walk == 0 and rng.random() < style.guard_rail:
        rail = Strip(side, 0.5, 0.8, ID["guard_rail"], _jitter(rng, (150, 152, 150), 20),
                     rails=((0.45, 0.8),), posts=4.0)
        items += _strip_items(cam, road, rail, -10.0, ZMAX * 0.6)
    return items


def _draw_lamp(cv: Canvas, x: float, z: float, side: int, height: float, arm: float, color: RGB) -> None:
    u0, v0, d = cv.cam.project(x, 0.0, z)
    if d < NEAR:
        return
    u1, v1, _ = cv.cam.project(x, height, z)
    u2, v2, _ = cv.cam.project(x - side * arm, height, z)
    w, pole = 0.18 * cv.cam.focal / d, ID["pole"]
    cv.bar((u0, v0), (u1, v1), w, pole, color, d)
    cv.bar((u1, v1), (u2, v2), 0.7 * w, pole, color, d)
    r = 1.6 * w
    head = [(u2 - r, v2), (u2 + r, v2), (u2 + r, v2 + 0.6 * r), (u2 - r, v2 + 0.6 * r)]
    cv.fill(head, pole, color, d)
    cv.lamp(head, (255, 228, 170), cv.weather.glow > 0, _scale(color, 1.2))


_SIGNS = (  # shape, rim, face
    ("circle", (200, 20, 20), (235, 235, 235)), ("circle", (30, 70, 170), (40, 95, 200)),
    ("triangle", (200, 25, 25), (240, 240, 235)), ("diamond", (40, 40, 40), (240, 195, 30)),
    ("rect", (235, 235, 235), (25, 110, 60)), ("octagon", (240, 240, 240), (190, 20, 25)),
    ("rect", (240, 240, 240), (30, 70, 160)),
)
_SHAPES = {"circle": (12, 0.0, 1.0), "triangle": (3, math.pi / 2, 1.0), "diamond": (4, math.pi / 2, 1.0),
           "rect": (4, math.pi / 4, 1.7), "octagon": (8, math.pi / 8, 1.0)}


def _shape(name: str, uc: float, vc: float, r: float) -> list[tuple[float, float]]:
    k, start, stretch = _SHAPES[name]
    angles = [start + 2 * math.pi * i / k for i in range(k)]
    return [(uc + stretch * r * math.cos(a), vc - r * math.sin(a)) for a in angles]


def _draw_sign(cv: Canvas, x: float, z: float, height: float, size: float, kind: int, pole_rgb: RGB) -> None:
    u0, v0, d = cv.cam.project(x, 0.0, z)
    if d < NEAR:
        return
    u1, v1, _ = cv.cam.project(x, height, z)
    s = cv.cam.focal / d
    cv.bar((u0, v0), (u1, v1), 0.1 * s, ID["pole"], pole_rgb, d)
    shape, rim, face = _SIGNS[kind]
    cv.fill(_shape(shape, u1, v1, size * s), ID["traffic_sign"], rim, d)
    cv.paint(_shape(shape, u1, v1, 0.72 * size * s), face)


def _draw_light(cv: Canvas, x: float, z: float, side: int, height: float, arm: float, state: int,
                housing: RGB, pole_rgb: RGB) -> None:
    """A traffic light on its pole, or hanging from an arm over the road."""
    u0, v0, d = cv.cam.project(x, 0.0, z)
    if d < NEAR:
        return
    u1, v1, _ = cv.cam.project(x, height, z)
    s = cv.cam.focal / d
    cv.bar((u0, v0), (u1, v1), 0.16 * s, ID["pole"], pole_rgb, d)
    hx = x - side * arm
    if arm:
        u2, v2, _ = cv.cam.project(hx, height, z)
        cv.bar((u1, v1), (u2, v2), 0.12 * s, ID["pole"], pole_rgb, d)
    q = cv.quad([hx - 0.2, hx + 0.2, hx + 0.2, hx - 0.2], [height - 1.05] * 2 + [height + 0.05] * 2,
                [z - 0.1] * 4)
    if q is None:
        return
    cv.fill(q[0], ID["traffic_light"], housing, q[1])
    for i, color in enumerate(((230, 30, 20), (240, 170, 20), (40, 220, 90))):
        uc, vc, _ = cv.cam.project(hx, height - 0.2 - 0.33 * i, z - 0.12)
        cv.lamp(_shape("circle", uc, vc, 0.11 * s), color, i == state, (35, 35, 35))


@dataclass(frozen=True)
class Prop:
    x: float
    z: float
    width: float
    height: float
    color: RGB


def _draw_prop(cv: Canvas, p: Prop) -> None:
    """Street clutter (bins, bollards, benches, boxes): CARLA's ``static``."""
    u, v, d = cv.cam.project(p.x, 0.0, p.z)
    if d < NEAR:
        return
    s = cv.cam.focal / d
    w, h = p.width * s / 2, p.height * s
    cv.fill([(u - w, v), (u + w, v), (u + w, v - h), (u - w, v - h)], ID["static"], p.color, d)
    lid = [(u - w, v - 0.85 * h), (u + w, v - 0.85 * h), (u + w, v - h), (u - w, v - h)]
    cv.paint(lid, _scale(p.color, 1.3))


def _lights(rng: np.random.Generator, road: Road, style: TownStyle, cam: Camera, side: int,
            edge: float) -> list[Item]:
    if road.cross is not None:
        zs = [road.cross[0] - 0.6]
    elif rng.random() < style.lights * 0.4:
        zs = [float(rng.uniform(10, 50))]
    else:
        return []
    items: list[Item] = []
    housing = _jitter(rng, style.light_housing, 10)
    for z in zs:
        x, state = road.side_x(side, edge, z), int(rng.integers(3))
        items.append((_key(cam, x, z), partial(_draw_light, x=x, z=z, side=side, height=3.2, arm=0.0,
                                                state=state, housing=housing, pole_rgb=style.pole_rgb)))
        if side == 1 and rng.random() < 0.7:  # an overhead light above the right-hand lanes
            arm = edge + road.half * rng.uniform(0.4, 0.9)
            items.append((_key(cam, x - arm, z), partial(_draw_light, x=x, z=z + 0.3, side=side, height=5.6,
                                                         arm=arm, state=state, housing=housing,
                                                         pole_rgb=style.pole_rgb)))
    return items


def _furniture(rng: np.random.Generator, road: Road, style: TownStyle, cam: Camera, side: int) -> list[Item]:
    """Street lamps, signs, traffic lights, clutter and street trees along one side."""
    items: list[Item] = []
    walk = road.walk[(side + 1) // 2]
    edge = 0.4 if walk else float(rng.uniform(0.8, 2.0))  # kerb side of the sidewalk, or the shoulder
    z = float(rng.uniform(0, style.lamp_spacing))
    while z < 110:
        x = road.side_x(side, edge, z)
        items.append((_key(cam, x, z), partial(_draw_lamp, x=x, z=z, side=side, height=rng.uniform(6, 9),
                                               arm=rng.uniform(0.8, 2.5), color=style.pole_rgb)))
        z += style.lamp_spacing * float(rng.uniform(0.8, 1.2))
    for _ in range(rng.poisson(style.signs * 2)):
        z = float(rng.uniform(4, 70))
        x = road.side_x(side, edge + rng.uniform(0, 0.4), z)
        sign = partial(_draw_sign, x=x, z=z, height=rng.uniform(2.0, 3.0), size=rng.uniform(0.3, 0.45),
                       kind=int(rng.integers(len(_SIGNS))), pole_rgb=style.pole_rgb)
        items.append((_key(cam, x, z), sign))
    items += _lights(rng, road, style, cam, side, edge)
    if walk > 1.0:
        for _ in range(rng.poisson(style.props * 3)):
            z = float(rng.uniform(3, 60))
            x = road.side_x(side, rng.choice([0.35, walk - 0.35]), z)
            w, h = ((0.6, 1.0), (0.25, 0.9), (1.6, 0.5), (0.9, 1.3))[int(rng.integers(4))]
            items.append((_key(cam, x, z), partial(_draw_prop, p=Prop(x, z, w, h, _pick(rng, _PROPS, 20)))))
        items += _trees(rng, road, style, cam, side, walk - 1.2, 0.0, 90.0, style.street_trees, spread=0.6)
    return items


_PROPS = ((40, 80, 50), (60, 60, 65), (30, 50, 110), (150, 110, 60), (170, 170, 160), (120, 30, 30))


@dataclass(frozen=True)
class Vehicle:
    x: float
    z: float
    heading: float  # radians; 0 drives away from the camera
    kind: str  # "car" or "truck"
    width: float
    length: float
    body: float  # top of the body (car) or cargo box (truck), m
    roof: float  # top of the cabin (car) or cab (truck), m
    color: RGB
    glass: RGB


# Corner i of a box is (x: -/+, y: low/high, z: back/front) = bits (i & 1, i & 2, i & 4).
_FACES = {"left": (0, 4, 6, 2), "right": (1, 3, 7, 5), "top": (2, 6, 7, 3), "rear": (0, 1, 3, 2),
          "front": (4, 5, 7, 6)}
_NORMALS = {"left": (-1, 0, 0), "right": (1, 0, 0), "top": (0, 1, 0), "rear": (0, 0, -1), "front": (0, 0, 1)}
_SHADE = {"left": 0.72, "right": 0.72, "top": 1.1, "rear": 0.88, "front": 0.88}


def _box(cv: Canvas, v: Vehicle, hw: float, y0: float, y1: float, zb: float,
         zf: float) -> list[tuple[str, list, float]]:
    """Faces of a box in the vehicle's frame that face the camera: (name, pixel polygon, depth)."""
    c, s = math.cos(v.heading), math.sin(v.heading)
    corners = [(v.x + lx * c + lz * s, ly, v.z - lx * s + lz * c)
               for lz in (zb, zf) for ly in (y0, y1) for lx in (-hw, hw)]
    faces = []
    for name, idx in _FACES.items():
        nx, ny, nz = _NORMALS[name]
        cx, cy, cz = (sum(corners[i][k] for i in idx) / 4 for k in range(3))
        facing = (nx * c + nz * s) * (cv.cam.x - cx) + ny * (cv.cam.height - cy) - (-nx * s + nz * c) * cz
        q = cv.quad(*zip(*(corners[i] for i in idx), strict=True)) if facing > 0 else None
        if q:
            faces.append((name, *q))
    return faces


def _panel(cv: Canvas, v: Vehicle, lx: list, ly: list, lz: list) -> tuple[list, float] | None:
    """A polygon given in the vehicle's frame."""
    c, s = math.cos(v.heading), math.sin(v.heading)
    return cv.quad([v.x + x * c + z * s for x, z in zip(lx, lz, strict=True)], ly,
                   [v.z - x * s + z * c for x, z in zip(lx, lz, strict=True)])


def _draw_vehicle(cv: Canvas, v: Vehicle) -> None:
    cls, hw, hl = ID[v.kind], v.width / 2, v.length / 2
    q = _panel(cv, v, [-hw - 0.2, hw + 0.2, hw + 0.3, -hw - 0.1], [0.0] * 4, [-hl - 0.3, -hl - 0.3, hl, hl])
    if q:
        cv.shadow(q[0])
    for _, xy, d in _box(cv, v, hw - 0.12, 0.0, 0.5, -hl + 0.5, hl - 0.5):
        cv.fill(xy, cls, (22, 22, 25), d)  # wheels and underbody
    if v.kind == "truck":
        parts = [(hw, 0.5, v.body, -hl, hl - 2.5, v.color, v.color),
                 (hw - 0.05, 0.5, v.roof, hl - 2.4, hl, v.color, v.color)]
    else:
        parts = [(hw, 0.3, v.body, -hl, hl, v.color, v.color),
                 (hw - 0.13, v.body, v.roof, -hl + 0.9, hl - 1.5, v.glass, v.color)]
    seen: set[str] = set()
    for w, y0, y1, zb, zf, sides, top in parts:
        for name, xy, d in _box(cv, v, w, y0, y1, zb, zf):
            cv.fill(xy, cls, _scale(top if name == "top" else sides, _SHADE[name]), d)
            seen.add(name)
    y = (v.body if v.kind == "car" else 1.2) - 0.3
    for end, z, color in (("rear", -hl - 0.01, (210, 25, 20)), ("front", hl + 0.01, (235, 235, 215))):
        for sx in ((-1, 1) if end in seen else ()):
            q = _panel(cv, v, [sx * (hw - 0.1), sx * (hw - 0.4)] * 2, [y, y, y + 0.17, y + 0.17], [z] * 4)
            if q:
                cv.lamp(q[0], color, True, color)
    if v.kind == "truck" and "front" in seen:
        q = _panel(cv, v, [-hw + 0.15, hw - 0.15] * 2, [v.roof - 1.0] * 2 + [v.roof - 0.2] * 2,
                   [hl + 0.01] * 4)
        if q:
            cv.paint(q[0], v.glass)
    for sx, name in ((-1, "left"), (1, "right")):
        if name not in seen:
            continue
        a = np.linspace(0, 2 * math.pi, 9)[:-1]
        for zw in (-hl + 0.85, hl - 0.85):
            q = _panel(cv, v, [sx * (hw + 0.01)] * 8, 0.36 + 0.36 * np.sin(a), zw + 0.36 * np.cos(a))
            if q:
                cv.fill(q[0], cls, (18, 18, 20), q[1])


def _vehicle(rng: np.random.Generator, style: TownStyle, x: float, z: float, heading: float) -> Vehicle:
    color, glass = _pick(rng, style.car_rgbs, 10), _jitter(rng, (45, 52, 62), 10)
    if rng.random() < style.truck:
        return Vehicle(x, z, heading, "truck", rng.uniform(2.3, 2.6), rng.uniform(6.5, 10.0),
                       rng.uniform(3.0, 3.9), rng.uniform(2.6, 3.0), color, glass)
    tall = float(rng.random() < 0.3)  # vans and SUVs
    return Vehicle(x, z, heading, "car", rng.uniform(1.7, 2.0), rng.uniform(3.9, 4.8) + 0.4 * tall,
                   rng.uniform(0.85, 1.05), rng.uniform(1.4, 1.55) + 0.35 * tall, color, glass)


def _traffic(rng: np.random.Generator, road: Road, style: TownStyle, cam: Camera) -> list[Item]:
    """Vehicles in every lane (oncoming ones face the camera) and across the intersection."""
    items: list[Item] = []
    ego = round((cam.x - road.lane_x(0, 0.0)) / road.lane_w)
    for lane in range(road.lanes):
        rear = float(rng.uniform(6.0, 25.0) if lane == ego else rng.uniform(-5.0, 12.0))
        while rear < ZMAX * 0.55:
            v = _vehicle(rng, style, 0.0, 0.0, 0.0)
            z = rear + v.length / 2
            x = road.lane_x(lane, z) + rng.uniform(-0.3, 0.3)
            v = replace(v, x=x, z=z, heading=road.heading(z) + (math.pi if lane < road.oncoming else 0.0))
            items.append((_key(cam, x, rear), partial(_draw_vehicle, v=v)))
            rear += v.length + 2.0 + float(rng.exponential(100.0 / style.traffic))
    if road.cross is not None:  # cross traffic shows vehicles side-on
        c0, c1 = road.cross
        for _ in range(rng.poisson(1.2)):
            z = float(rng.uniform(c0 + 2.5, c1 - 2.5))
            x = road.centre(z) + rng.choice([-1, 1]) * rng.uniform(road.half + 3, 40)
            v = _vehicle(rng, style, x, z, rng.choice([-1, 1]) * math.pi / 2)
            items.append((_key(cam, x, z - v.width / 2), partial(_draw_vehicle, v=v)))
    return items


@dataclass(frozen=True)
class Pedestrian:
    x: float
    z: float
    height: float
    stride: float
    shirt: RGB
    trousers: RGB
    skin: RGB


_CLOTHES = ((200, 40, 40), (40, 60, 140), (30, 30, 30), (220, 220, 215), (90, 120, 60), (120, 120, 125),
            (200, 160, 60), (110, 70, 120), (60, 130, 150), (150, 100, 70))
_SKIN = ((235, 200, 170), (200, 150, 110), (140, 95, 65), (90, 60, 40))


def _draw_pedestrian(cv: Canvas, p: Pedestrian) -> None:
    u, v, d = cv.cam.project(p.x, 0.0, p.z)
    if d < 1.0:
        return
    s, cls = cv.cam.focal / d, ID["pedestrian"]
    h = p.height * s
    hip, neck, step = v - 0.5 * h, v - 0.82 * h, p.stride * 0.3 * s
    for sgn in (-1, 1):
        cv.bar((u + sgn * step, v), (u + sgn * 0.06 * s, hip), 0.13 * s, cls, p.trousers, d)
    torso = [(u - 0.2 * s, hip + 0.03 * h), (u + 0.2 * s, hip + 0.03 * h), (u + 0.23 * s, neck),
             (u - 0.23 * s, neck)]
    cv.fill(torso, cls, p.shirt, d)
    for sgn in (-1, 1):
        cv.bar((u + sgn * 0.24 * s, neck + 0.02 * h), (u + sgn * (0.26 * s + 0.5 * step), hip + 0.05 * h),
               0.09 * s, cls, p.shirt, d)
    r = 0.11 * s
    cv.blob((u - r, neck - 2.2 * r, u + r, neck + 0.1 * r), cls, p.skin, d)
    cv.paint([(u - r, neck - 1.5 * r), (u + r, neck - 1.5 * r), (u + 0.7 * r, neck - 2.2 * r),
              (u - 0.7 * r, neck - 2.2 * r)], (40, 30, 25))


def _pedestrians(rng: np.random.Generator, road: Road, style: TownStyle, cam: Camera) -> list[Item]:
    """People on the sidewalks, on the crosswalk and, now and then, crossing anywhere."""
    spots: list[tuple[float, float]] = []
    for side, walk in zip((-1, 1), road.walk, strict=True):
        if walk >= 0.8:
            for _ in range(rng.poisson(style.pedestrians * 10)):
                z = float(rng.uniform(2, 70))
                spots.append((road.side_x(side, rng.uniform(0.3, walk - 0.3), z), z))
    if road.cross is not None:
        for _ in range(rng.poisson(0.5 + style.pedestrians * 2)):
            z = road.cross[0] - 2.5 + float(rng.uniform(-1, 1))
            spots.append((road.centre(z) + rng.uniform(-road.half - 1, road.half + 1), z))
    if rng.random() < style.pedestrians * 0.3:
        z = float(rng.uniform(8, 35))
        spots.append((road.centre(z) + rng.uniform(-road.half, road.half), z))
    items: list[Item] = []
    for x, z in spots:
        child = rng.random() < 0.1
        p = Pedestrian(x, z, rng.uniform(1.1, 1.35) if child else rng.uniform(1.55, 1.95), rng.uniform(0, 1),
                       _pick(rng, _CLOTHES, 20), _pick(rng, _CLOTHES[1:6], 15), _pick(rng, _SKIN, 8))
        items.append((_key(cam, x, z), partial(_draw_pedestrian, p=p)))
    return items


def _draw_skyline(cv: Canvas, rects: tuple, z: float, cls: int) -> None:
    for x0, x1, h, color in rects:
        q = cv.quad([x0, x1, x1, x0], [0, 0, h, h], [z] * 4)
        if q is None:
            continue
        if cls == ID["vegetation"]:
            (u0, v0), _, (u1, v1), _ = q[0]
            cv.blob((u0, v1, u1, v0 + (v0 - v1) * 0.2), cls, color, q[1])
        else:
            cv.fill(q[0], cls, color, q[1])


def _skyline(rng: np.random.Generator, road: Road, style: TownStyle, cam: Camera) -> list[Item]:
    """Far buildings or a tree line hiding the horizon, with a gap where the road runs on."""
    z, rects = ZMAX * 0.92, []
    trees = style.skyline == "trees"
    x = cam.x - 1.8 * z
    while x < cam.x + 1.8 * z:
        w = float(rng.uniform(6, 18) if trees else rng.uniform(10, 35))
        if abs(x + w / 2 - road.centre(z)) > road.half + 12 + w / 2:
            colors = style.vegetation_rgbs if trees else style.building_rgbs
            height = float(rng.uniform(*style.skyline_height))
            rects.append((x, x + w, height, _scale(_pick(rng, colors, 10), 0.85)))  # hazier: darker
        x += w + float(rng.uniform(-4, 6))
    cls = ID["vegetation" if trees else "building"]
    return [(ZMAX + 10, partial(_draw_skyline, rects=tuple(rects), z=z, cls=cls))]


def _draw_hood(cv: Canvas, frac: float, color: RGB) -> None:
    """The ego vehicle's bonnet at the bottom of the frame, labelled car as in CARLA's Lyft set."""
    h, w = cv.cam.size
    xs = np.linspace(-0.05, 1.05, 24) * w
    ys = h * (1 - frac) + frac * h * 0.8 * ((xs - w / 2) / (0.6 * w)) ** 2
    curve = list(zip(xs.tolist(), ys.tolist(), strict=True))
    cv.fill([*curve, (1.05 * w, h + 1), (-0.05 * w, h + 1)], ID["car"], color, 1.0)
    band = list(zip(xs.tolist(), (ys + 0.25 * frac * h).tolist(), strict=True))
    cv.paint(curve + band[::-1], _scale(color, 1.35))


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
        items += _roadside(rng, road, style, cam, side, shade)
        items += _furniture(rng, road, style, cam, side)
    items += _traffic(rng, road, style, cam)
    items += _pedestrians(rng, road, style, cam)
    items += _skyline(rng, road, style, cam)
    rgb, label, depth = _ground(cam, road, style, weather, tex, shade_edge, sun)
    canvas = Canvas(cam, road, weather, rgb, label, depth)
    for _, draw in sorted(items, key=lambda item: -item[0]):
        draw(canvas)
    if style.hood > 0:
        _draw_hood(canvas, style.hood, style.hood_rgb)
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
    texture += np.asarray(coarse.resize((w, h), Image.BILINEAR))
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
