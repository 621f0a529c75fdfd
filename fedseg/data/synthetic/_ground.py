"""Per-pixel ground and sky of a synthetic scene (the first drawing pass).

Every pixel's ray is intersected with the ground plane; the hit point's world coordinates (lateral
``X``, forward ``Z``, metres) decide road / lane line / sidewalk / verge analytically, so lane lines
thin out with distance as perspective demands and textures (asphalt patches, paving tiles) are
perspective-correct. Rays above the horizon get the sky: a gradient with clouds on a high plane.
"""

from __future__ import annotations

import numpy as np

from fedseg.data.synthetic._canvas import ID, SKY_DEPTH, ZMAX, Camera, Road
from fedseg.data.synthetic.styles import TownStyle, Weather


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


def ground_and_sky(cam: Camera, road: Road, style: TownStyle, weather: Weather, tex: np.ndarray,
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
