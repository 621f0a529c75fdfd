"""Road users: cars and trucks in every lane and across intersections, pedestrians on the
sidewalks and crossings, and the ego vehicle's bonnet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from fedseg.data.synthetic._canvas import (
    ID,
    RGB,
    ZMAX,
    Camera,
    Canvas,
    Item,
    Road,
    jitter,
    order_key,
    pick,
    scaled,
)
from fedseg.data.synthetic.styles import TownStyle

Coords = Sequence[float] | np.ndarray  # one coordinate of a polygon's vertices


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


def _panel(cv: Canvas, v: Vehicle, lx: Coords, ly: Coords, lz: Coords) -> tuple[list, float] | None:
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
            cv.fill(xy, cls, scaled(top if name == "top" else sides, _SHADE[name]), d)
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
    color, glass = pick(rng, style.car_rgbs, 10), jitter(rng, (45, 52, 62), 10)
    if rng.random() < style.truck:
        return Vehicle(x, z, heading, "truck", rng.uniform(2.3, 2.6), rng.uniform(6.5, 10.0),
                       rng.uniform(3.0, 3.9), rng.uniform(2.6, 3.0), color, glass)
    tall = float(rng.random() < 0.3)  # vans and SUVs
    return Vehicle(x, z, heading, "car", rng.uniform(1.7, 2.0), rng.uniform(3.9, 4.8) + 0.4 * tall,
                   rng.uniform(0.85, 1.05), rng.uniform(1.4, 1.55) + 0.35 * tall, color, glass)


def traffic(rng: np.random.Generator, road: Road, style: TownStyle, cam: Camera) -> list[Item]:
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
            items.append((order_key(cam, x, rear), partial(_draw_vehicle, v=v)))
            rear += v.length + 2.0 + float(rng.exponential(100.0 / style.traffic))
    if road.cross is not None:  # cross traffic shows vehicles side-on
        c0, c1 = road.cross
        for _ in range(rng.poisson(1.2)):
            z = float(rng.uniform(c0 + 2.5, c1 - 2.5))
            x = road.centre(z) + rng.choice([-1, 1]) * rng.uniform(road.half + 3, 40)
            v = _vehicle(rng, style, x, z, rng.choice([-1, 1]) * math.pi / 2)
            items.append((order_key(cam, x, z - v.width / 2), partial(_draw_vehicle, v=v)))
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


def pedestrians(rng: np.random.Generator, road: Road, style: TownStyle, cam: Camera) -> list[Item]:
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
                       pick(rng, _CLOTHES, 20), pick(rng, _CLOTHES[1:6], 15), pick(rng, _SKIN, 8))
        items.append((order_key(cam, x, z), partial(_draw_pedestrian, p=p)))
    return items


def draw_hood(cv: Canvas, frac: float, color: RGB) -> None:
    """The ego vehicle's bonnet at the bottom of the frame, labelled car as in CARLA's Lyft set."""
    h, w = cv.cam.size
    xs = np.linspace(-0.05, 1.05, 24) * w
    ys = h * (1 - frac) + frac * h * 0.8 * ((xs - w / 2) / (0.6 * w)) ** 2
    curve = list(zip(xs.tolist(), ys.tolist(), strict=True))
    cv.fill([*curve, (1.05 * w, h + 1), (-0.05 * w, h + 1)], ID["car"], color, 1.0)
    band = list(zip(xs.tolist(), (ys + 0.25 * frac * h).tolist(), strict=True))
    cv.paint(curve + band[::-1], scaled(color, 1.35))
