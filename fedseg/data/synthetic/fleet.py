"""The on-disk synthetic fleet: render every frame and write it in CARLA's camera format.

Frames are written as ``CameraRGB/*.png`` and ``CameraSeg/*.png`` (the tag id in the red channel),
and every frame is a pure function of ``(seed, vehicle, frame)``: the same arguments always give
byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from fedseg.data.synthetic._scene import compose, develop
from fedseg.data.synthetic._streams import FRAME, HELDOUT, generator
from fedseg.data.synthetic.styles import WEATHERS, TownStyle, Weather
from fedseg.data.synthetic.towns import town_style, weather_mix
from fedseg.labels import CANONICAL_NAMES, get_tagset

FORMAT_VERSION = 1  # bump whenever generated pixels change, so stale caches are noticed
Job = tuple[str, int, int, tuple[int, ...]]  # (folder, frame index, town, random stream)


def render_scene(rng: np.random.Generator, style: TownStyle, weather: Weather,
                 size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Render one frame.

    Returns the (H, W, 3) uint8 RGB image and the (H, W) uint8 map of indices into
    ``fedseg.labels.CANONICAL_NAMES``. ``size`` is (H, W); all randomness comes from ``rng``.
    """
    rgb, label, depth, glow = compose(rng, style, weather, size)
    return develop(rng, rgb, label, depth, glow, weather), label


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
    # Held-out frames cycle through every town.
    jobs: list[Job] = [(f"vehicle_{v:02d}", k, v, (FRAME, v, k))
                       for v in range(n) for k in range(params["frames_per_vehicle"])]
    jobs += [("heldout", j, j % n, (HELDOUT, j)) for j in range(params["heldout_frames"])]
    for folder, index, town, stream in tqdm(jobs, desc="synthetic fleet", unit="frame",
                                            disable=not progress):
        rng = generator(seed, *stream)
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
