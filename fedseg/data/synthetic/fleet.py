"""The on-disk synthetic fleet: any frame rendered on demand and written in CARLA's camera format.

Frames are written as ``CameraRGB/*.png`` and ``CameraSeg/*.png`` (the tag id in the red channel),
and every frame is a pure function of ``(seed, vehicle, frame)``: the same arguments always give
byte-identical files, whatever the size of the fleet. :class:`SyntheticFleet` names any vehicle's
frames without rendering them and renders only those missing on disk (a vehicle's first use), each
file written under a temporary name and renamed into place, so processes racing on the same frame
all leave the same, complete file. :func:`generate_fleet` writes a whole fleet at once.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from fedseg.data.frames import Frame
from fedseg.data.synthetic._scene import compose, develop
from fedseg.data.synthetic._streams import FRAME, HELDOUT, generator
from fedseg.data.synthetic.styles import WEATHERS, TownStyle, Weather
from fedseg.data.synthetic.towns import town_style, weather_mix
from fedseg.labels import CANONICAL_NAMES, get_tagset

FORMAT_VERSION = 1  # bump whenever generated pixels change, so stale caches are noticed


def render_scene(rng: np.random.Generator, style: TownStyle, weather: Weather,
                 size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Render one frame.

    Returns the (H, W, 3) uint8 RGB image and the (H, W) uint8 map of indices into
    ``fedseg.labels.CANONICAL_NAMES``. ``size`` is (H, W); all randomness comes from ``rng``.
    """
    rgb, label, depth, glow = compose(rng, style, weather, size)
    return develop(rng, rgb, label, depth, glow, weather), label


@dataclass(frozen=True)
class SyntheticFrame(Frame):
    """A synthetic frame's files and its recipe: the town it is drawn in and its random stream."""

    town: int
    stream: tuple[int, ...]


def vehicle_folder(index: int) -> str:
    """The folder (and source name) of vehicle ``index``."""
    return f"vehicle_{index:02d}"


def _checked(name: str, value: object, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"synthetic fleet: {name} must be an integer >= {least}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class SyntheticFleet:
    """The frames of a synthetic fleet stored under ``root``: named without rendering, rendered on demand.

    Layout: ``root/vehicle_{i:02d}/{CameraRGB,CameraSeg}/{k:06d}.png``; held-out sets in a folder
    the caller names. ``image_size`` is (H, W); seg PNGs hold ``tagset``'s tag ids in the red channel.
    """

    root: Path
    frames_per_vehicle: int
    image_size: tuple[int, int]
    tagset: str = "carla29"
    seed: int = 0

    def __post_init__(self) -> None:
        get_tagset(self.tagset)  # unknown names raise, listing the valid ones
        _checked("frames_per_vehicle", self.frames_per_vehicle, 1)
        _checked("seed", self.seed, 0)
        if len(self.image_size) != 2 or min(self.image_size) < 16:
            raise ValueError(f"synthetic fleet: image_size must be (H, W) with both >= 16, got {self.image_size!r}")

    def vehicle(self, index: int) -> list[SyntheticFrame]:
        """Vehicle ``index``'s frames (its own town, streams ``(FRAME, index, k)``); nothing is rendered."""
        folder = vehicle_folder(_checked("vehicle", index, 0))
        return [self._frame(folder, folder, k, index, (FRAME, index, k)) for k in range(self.frames_per_vehicle)]

    def heldout(self, num_vehicles: int, count: int, folder: str = "heldout") -> list[SyntheticFrame]:
        """``count`` server-side evaluation frames under ``root/folder``, cycling through the towns of
        vehicles ``0..num_vehicles-1`` on streams of their own; nothing is rendered."""
        n = _checked("num_vehicles", num_vehicles, 1)
        return [self._frame(folder, "heldout", j, j % n, (HELDOUT, j)) for j in range(_checked("heldout", count, 0))]

    def _frame(self, folder: str, source: str, index: int, town: int, stream: tuple[int, ...]) -> SyntheticFrame:
        name = f"{index:06d}.png"
        base = self.root / folder
        return SyntheticFrame(base / "CameraRGB" / name, base / "CameraSeg" / name, source, town, stream)

    def render_missing(self, frames: Iterable[Frame], *, progress: bool = False) -> int:
        """Render and write every synthetic frame of ``frames`` whose files are not both there; return how many."""
        missing = [f for f in frames if isinstance(f, SyntheticFrame) and not (f.rgb.is_file() and f.seg.is_file())]
        tagset = get_tagset(self.tagset)
        to_tag = np.array([tagset.tag_id(name) for name in CANONICAL_NAMES], np.uint8)
        for frame in tqdm(missing, desc="synthetic frames", unit="frame", disable=not progress):
            rng = generator(self.seed, *frame.stream)
            mix = weather_mix(frame.town, self.seed)
            weather = WEATHERS[str(rng.choice(list(mix), p=list(mix.values())))]
            rgb, label = render_scene(rng, town_style(frame.town, self.seed), weather, self.image_size)
            _save_frame(frame, rgb, to_tag[label])
        return len(missing)


def _write_png(path: Path, image: np.ndarray) -> None:
    """Write ``path`` atomically: a reader (or a racing writer of the same bytes) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # hidden, not .png: never listed as a frame
    try:
        # Level 1: sensor noise makes RGB frames nearly incompressible; 4x faster than the default.
        Image.fromarray(image).save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_frame(frame: Frame, rgb: np.ndarray, tags: np.ndarray) -> None:
    """One frame in CARLA's format (the tag id in the red channel); RGB last, so a frame whose RGB
    file exists has its label too."""
    seg = np.zeros((*tags.shape, 3), np.uint8)
    seg[..., 0] = tags
    _write_png(frame.seg, seg)
    _write_png(frame.rgb, rgb)


def _fleet_params(num_vehicles: int, frames_per_vehicle: int, heldout_frames: int,
                  image_size: tuple[int, int], tagset: str, seed: int) -> dict:
    SyntheticFleet(Path(), frames_per_vehicle, image_size, tagset, seed)  # checks those four
    return {"num_vehicles": _checked("num_vehicles", num_vehicles, 1), "frames_per_vehicle": int(frames_per_vehicle),
            "heldout_frames": _checked("heldout_frames", heldout_frames, 0),
            "image_size": [int(image_size[0]), int(image_size[1])], "tagset": tagset, "seed": int(seed)}


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


def _write_fleet(out: Path, params: dict, progress: bool) -> None:
    n, seed = params["num_vehicles"], params["seed"]
    fleet = SyntheticFleet(out, params["frames_per_vehicle"], tuple(params["image_size"]), params["tagset"], seed)
    frames = [frame for v in range(n) for frame in fleet.vehicle(v)] + fleet.heldout(n, params["heldout_frames"])
    fleet.render_missing(frames, progress=progress)
    manifest = {"format_version": FORMAT_VERSION, "generator": "fedseg.data.synthetic", "params": params,
                "vehicles": {vehicle_folder(v): {"town": town_style(v, seed).archetype,
                                                 "weather_mix": weather_mix(v, seed)} for v in range(n)}}
    (out / "fleet.json").write_text(json.dumps(manifest, indent=2))  # last: marks the fleet complete


def generate_fleet(root: Path, *, num_vehicles: int, frames_per_vehicle: int, heldout_frames: int,
                   image_size: tuple[int, int], tagset: str = "carla29", seed: int = 0,
                   progress: bool = True) -> Path:
    """Write a whole synthetic fleet under ``root`` and return ``root``.

    Layout: ``root/vehicle_{i:02d}/{CameraRGB,CameraSeg}/{k:06d}.png`` for each vehicle (the frames
    :meth:`SyntheticFleet.vehicle` names), the same under ``root/heldout`` (server-side evaluation
    frames from every town, on random streams of their own; absent when ``heldout_frames`` is 0),
    and ``root/fleet.json`` (parameters and format version) written last. ``image_size`` is (H, W);
    seg PNGs hold ``tagset``'s tag ids in the red channel, green and blue are 0.

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
