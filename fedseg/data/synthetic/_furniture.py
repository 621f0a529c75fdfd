"""Street furniture along the kerb: lamps, signs, traffic lights, clutter (CARLA's ``static``) and
street trees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np

from fedseg.data.synthetic._canvas import (
    ID,
    NEAR,
    RGB,
    Camera,
    Canvas,
    Item,
    Road,
    jitter,
    order_key,
    pick,
    scaled,
)
from fedseg.data.synthetic._roadside import scatter_trees
from fedseg.data.synthetic.styles import TownStyle

_PROPS = ((40, 80, 50), (60, 60, 65), (30, 50, 110), (150, 110, 60), (170, 170, 160), (120, 30, 30))


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
    cv.lamp(head, (255, 228, 170), cv.weather.glow > 0, scaled(color, 1.2))


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
    cv.paint(lid, scaled(p.color, 1.3))


def _lights(rng: np.random.Generator, road: Road, style: TownStyle, cam: Camera, side: int,
            edge: float) -> list[Item]:
    if road.cross is not None:
        zs = [road.cross[0] - 0.6]
    elif rng.random() < style.lights * 0.4:
        zs = [float(rng.uniform(10, 50))]
    else:
        return []
    items: list[Item] = []
    housing = jitter(rng, style.light_housing, 10)
    for z in zs:
        x, state = road.side_x(side, edge, z), int(rng.integers(3))
        items.append((order_key(cam, x, z), partial(_draw_light, x=x, z=z, side=side, height=3.2, arm=0.0,
                                                state=state, housing=housing, pole_rgb=style.pole_rgb)))
        if side == 1 and rng.random() < 0.7:  # an overhead light above the right-hand lanes
            arm = edge + road.half * rng.uniform(0.4, 0.9)
            items.append((order_key(cam, x - arm, z), partial(_draw_light, x=x, z=z + 0.3, side=side, height=5.6,
                                                         arm=arm, state=state, housing=housing,
                                                         pole_rgb=style.pole_rgb)))
    return items


def furniture(rng: np.random.Generator, road: Road, style: TownStyle, cam: Camera, side: int) -> list[Item]:
    """Street lamps, signs, traffic lights, clutter and street trees along one side."""
    items: list[Item] = []
    walk = road.walk[(side + 1) // 2]
    edge = 0.4 if walk else float(rng.uniform(0.8, 2.0))  # kerb side of the sidewalk, or the shoulder
    z = float(rng.uniform(0, style.lamp_spacing))
    while z < 110:
        x = road.side_x(side, edge, z)
        items.append((order_key(cam, x, z), partial(_draw_lamp, x=x, z=z, side=side, height=rng.uniform(6, 9),
                                               arm=rng.uniform(0.8, 2.5), color=style.pole_rgb)))
        z += style.lamp_spacing * float(rng.uniform(0.8, 1.2))
    for _ in range(rng.poisson(style.signs * 2)):
        z = float(rng.uniform(4, 70))
        x = road.side_x(side, edge + rng.uniform(0, 0.4), z)
        sign = partial(_draw_sign, x=x, z=z, height=rng.uniform(2.0, 3.0), size=rng.uniform(0.3, 0.45),
                       kind=int(rng.integers(len(_SIGNS))), pole_rgb=style.pole_rgb)
        items.append((order_key(cam, x, z), sign))
    items += _lights(rng, road, style, cam, side, edge)
    if walk > 1.0:
        for _ in range(rng.poisson(style.props * 3)):
            z = float(rng.uniform(3, 60))
            x = road.side_x(side, rng.choice([0.35, walk - 0.35]), z)
            w, h = ((0.6, 1.0), (0.25, 0.9), (1.6, 0.5), (0.9, 1.3))[int(rng.integers(4))]
            items.append((order_key(cam, x, z), partial(_draw_prop, p=Prop(x, z, w, h, pick(rng, _PROPS, 20)))))
        items += scatter_trees(rng, road, style, cam, side, walk - 1.2, 0.0, 90.0, style.street_trees, spread=0.6)
    return items
