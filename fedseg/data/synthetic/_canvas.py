"""What every part of a synthetic scene is drawn with: the pinhole ``Camera``, the ``Road`` layout
and the ``Canvas`` (RGB, label, depth and glow layers drawn together), plus the colour and
painter's-order helpers the object modules share. Private to ``fedseg.data.synthetic``.

World frame: x right, y up, z forward; the camera sits at ``(cam.x, cam.height, 0)``. The road
centre line is ``x = curve * z**2``. ``side`` is -1 (left) or +1 (right).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image, ImageDraw

from fedseg.data.synthetic.styles import RGB, Weather
from fedseg.labels import CANONICAL_NAMES

ID = {name: i for i, name in enumerate(CANONICAL_NAMES)}  # label layer values: canonical indices
ZMAX = 200.0  # farthest ground point drawn; the skyline just before it hides the horizon
NEAR = 0.6  # near plane (camera depth, m): polygons are clipped here
SKY_DEPTH = 240.0  # depth given to sky pixels: fog then tints the sky like a far horizon
Item = tuple[float, Callable[["Canvas"], None]]  # (order_key, draw): drawn far to near
Ink = float | tuple[int, ...]  # a PIL fill: a colour, a label id or a depth


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

    def to_camera(self, x, y, z):  # floats or arrays alike (numpy broadcasts), hence no annotations
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

    def centre(self, z):  # floats or arrays alike
        return self.curve * z * z

    def lane_x(self, lane: float, z: float) -> float:
        return self.centre(z) - self.half + (lane + 0.5) * self.lane_w

    def side_x(self, side: int, offset, z):  # floats or arrays alike
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
        for draw, ink in zip(self._layers, _inks(color, cls, depth), strict=True):
            draw.polygon(xy, fill=ink)

    def bar(self, p0: tuple, p1: tuple, width: float, cls: int, color: RGB, depth: float) -> None:
        """A labelled line at least one pixel wide: thin classes (poles, far legs) never vanish."""
        w = max(1, round(width))
        for draw, ink in zip(self._layers, _inks(color, cls, depth), strict=True):
            draw.line([p0, p1], fill=ink, width=w)

    def blob(self, box: tuple, cls: int, color: RGB, depth: float) -> None:
        """A labelled ellipse in its bounding box (x0, y0, x1, y1)."""
        x0, y0, x1, y1 = box
        box = (x0, y0, max(x1, x0 + 0.5), max(y1, y0 + 0.5))
        for draw, ink in zip(self._layers, _inks(color, cls, depth), strict=True):
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

    def quad(self, xs, ys, zs) -> tuple[list, float] | None:  # any sequences of numbers
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


def _inks(color: RGB, cls: int, depth: float) -> tuple[Ink, Ink, Ink]:
    """What one shape writes into the RGB, label and depth layers, in ``Canvas._layers`` order."""
    return color, cls, float(depth)


def _clip_near(pts: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """Sutherland-Hodgman against depth >= NEAR, so walls beside the camera still reach the edge."""
    out = []
    for p, q in zip(pts, pts[1:] + pts[:1], strict=True):
        if p[2] >= NEAR:
            out.append(p)
        if (p[2] >= NEAR) != (q[2] >= NEAR):
            t = (NEAR - p[2]) / (q[2] - p[2])
            x, y, z = (a + t * (b - a) for a, b in zip(p, q, strict=True))
            out.append((x, y, z))
    return out


def jitter(rng: np.random.Generator, color: tuple, amount: float = 12.0) -> RGB:
    """``color`` with each channel moved by up to ``amount`` grey levels."""
    noise = rng.uniform(-amount, amount, 3).tolist()
    mixed = (max(0, min(255, int(c + n))) for c, n in zip(color, noise, strict=True))
    return tuple(mixed)  # type: ignore[return-value]


def scaled(color: tuple, k: float) -> RGB:
    """``color`` brightened (k > 1) or darkened (k < 1)."""
    return tuple(int(min(255.0, c * k)) for c in color)  # type: ignore[return-value]


def pick(rng: np.random.Generator, colors: tuple, amount: float = 12.0) -> RGB:
    """One of ``colors``, jittered."""
    return jitter(rng, colors[int(rng.integers(len(colors)))], amount)


def order_key(cam: Camera, x: float, z: float) -> float:
    """Painter's order: ground distance from the camera to the object's nearest point."""
    return math.hypot(x - cam.x, max(z, 0.0))


def spans(z0: float, z1: float) -> list[tuple[float, float]]:
    """Cut [z0, z1] into pieces growing with distance (each is drawn and depth-sorted alone)."""
    zs = [z0]
    while zs[-1] < z1 - 1e-6:
        zs.append(min(z1, zs[-1] + 2.0 + 0.15 * max(zs[-1], 0.0)))
    return list(itertools.pairwise(zs))
