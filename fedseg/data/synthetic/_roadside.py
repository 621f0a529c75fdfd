"""What lines the road: building facades, walls, hedges, fences and guard rails (``Strip``), trees,
and the far skyline. Each builder returns painter's-order items (see ``_canvas.order_key``).
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
    ZMAX,
    Camera,
    Canvas,
    Item,
    Road,
    jitter,
    order_key,
    pick,
    scaled,
    spans,
)
from fedseg.data.synthetic.styles import TownStyle


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
                cv.bar((u0, v0), (u1, v1), 0.12 * cv.cam.focal / d, s.cls, scaled(s.color, 0.8), d)
    if s.windows:
        _draw_windows(cv, s, za, zb)
    elif not s.rails:  # a darker coping along the top edge
        q = cv.quad([xa, xb, xb, xa], [s.height - 0.25] * 2 + [s.height] * 2, [za, zb, zb, za])
        if q:
            cv.paint(q[0], scaled(s.color, 0.75))


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
        cv.fill(q[0], s.cls, scaled(s.color, 0.8), q[1])


def _strip_items(cam: Camera, road: Road, s: Strip, z0: float, z1: float) -> list[Item]:
    return [(order_key(cam, road.side_x(s.side, s.offset, za), za), partial(_draw_strip, s=s, za=za, zb=zb))
            for za, zb in spans(z0, z1)]


def _building(rng: np.random.Generator, road: Road, style: TownStyle, cam: Camera, side: int,
              offset: float, z0: float, z1: float, shade: tuple[np.ndarray, float] | None) -> list[Item]:
    h = float(rng.uniform(*style.building_height))
    floor_h, col_w = rng.uniform(2.8, 3.8), rng.uniform(2.0, 4.5)
    windows = (z0, floor_h, col_w, col_w * rng.uniform(0.35, 0.75), floor_h * rng.uniform(0.35, 0.65),
               jitter(rng, style.window_rgb, 15), rng.random(64) < 0.3)
    s = Strip(side, offset, h, ID["building"], pick(rng, style.building_rgbs, 10), windows=windows)
    items = _strip_items(cam, road, s, z0, z1)
    items.append((order_key(cam, road.side_x(side, offset, z0), z0),
                  partial(_draw_front, s=s, z0=z0, depth=float(rng.uniform(8, 20)))))
    if shade is not None:  # this side faces away from the sun: its shadow falls across the road
        edge, length = shade
        lo, hi = int(np.clip(z0, 0, ZMAX)), int(np.clip(z1, 0, ZMAX))
        edge[lo:hi + 1] = np.minimum(edge[lo:hi + 1], road.half + offset - h * length)
    return items


def _barrier(rng: np.random.Generator, road: Road, style: TownStyle, cam: Camera, side: int,
             offset: float, z0: float, z1: float, kind: str) -> list[Item]:
    if kind == "wall":
        s = Strip(side, offset, rng.uniform(1.0, 3.0), ID["wall"], jitter(rng, style.wall_rgb))
    elif kind == "hedge":
        s = Strip(side, offset, rng.uniform(0.8, 2.0), ID["vegetation"], pick(rng, style.vegetation_rgbs))
    elif rng.random() < 0.4:  # board fence
        s = Strip(side, offset, rng.uniform(1.2, 2.2), ID["fence"], jitter(rng, style.fence_rgb))
    else:  # rails on posts: the scene shows through
        h = float(rng.uniform(1.0, 2.0))
        s = Strip(side, offset, h, ID["fence"], jitter(rng, style.fence_rgb),
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
    return Tree(x, z, 0.0 if bush else rng.uniform(1.5, 3.5) * scale, r, blobs,
                jitter(rng, (85, 65, 45), 15), bool(rng.random() < style.conifers) and not bush)


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


def scatter_trees(rng: np.random.Generator, road: Road, style: TownStyle, cam: Camera, side: int, offset: float,
           z0: float, z1: float, density: float, spread: float = 8.0) -> list[Item]:
    items: list[Item] = []
    for _ in range(rng.poisson(max(density, 0.0) * (z1 - z0) / 10)):
        z = float(rng.uniform(z0, z1))
        x = road.side_x(side, offset + rng.uniform(0.3, spread), z)
        items.append((order_key(cam, x, z), partial(_draw_tree, t=_tree(rng, style, x, z))))
    return items


_BLOCKS = ("building", "trees", "wall", "fence", "hedge")


def roadside(rng: np.random.Generator, road: Road, style: TownStyle, cam: Camera, side: int,
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
            items += scatter_trees(rng, road, style, cam, side, walk, z, z1, style.trees)
        else:
            items += _barrier(rng, road, style, cam, side, offset, z, z1, kind)
            if rng.random() < style.blocks[0] + 0.3:
                items += _building(rng, road, style, cam, side, offset + rng.uniform(3, 10), z, z1, shade)
            else:
                items += scatter_trees(rng, road, style, cam, side, offset + 0.5, z, z1, style.trees)
        z = z1 + (float(rng.uniform(1, 6)) if kind == "building" and rng.random() < 0.5 else 0.0)
    if walk == 0 and rng.random() < style.guard_rail:
        rail = Strip(side, 0.5, 0.8, ID["guard_rail"], jitter(rng, (150, 152, 150), 20),
                     rails=((0.45, 0.8),), posts=4.0)
        items += _strip_items(cam, road, rail, -10.0, ZMAX * 0.6)
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


def skyline(rng: np.random.Generator, road: Road, style: TownStyle, cam: Camera) -> list[Item]:
    """Far buildings or a tree line hiding the horizon, with a gap where the road runs on."""
    z, rects = ZMAX * 0.92, []
    trees = style.skyline == "trees"
    x = cam.x - 1.8 * z
    while x < cam.x + 1.8 * z:
        w = float(rng.uniform(6, 18) if trees else rng.uniform(10, 35))
        if abs(x + w / 2 - road.centre(z)) > road.half + 12 + w / 2:
            colors = style.vegetation_rgbs if trees else style.building_rgbs
            height = float(rng.uniform(*style.skyline_height))
            rects.append((x, x + w, height, scaled(pick(rng, colors, 10), 0.85)))  # hazier: darker
        x += w + float(rng.uniform(-4, 6))
    cls = ID["vegetation" if trees else "building"]
    return [(ZMAX + 10, partial(_draw_skyline, rects=tuple(rects), z=z, cls=cls))]
