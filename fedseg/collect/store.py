"""The collection on disk: paired PNG writes that survive an interruption, resuming, manifests.

Layout (what ``data=carla`` reads): ``<out>/vehicle_<i>/CameraRGB/<frame>.png`` and
``CameraSeg/<frame>.png``, frames numbered ``000000, 000001, ...`` per vehicle (so file-name order
is time order, across continued collections too). ``CameraSeg`` is CARLA's raw semantic image: the
tag id in the red channel (green and blue carry CARLA's instance id on 0.9.14+; readers ignore them).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fedseg.collect.spec import CollectSpec
from fedseg.data.carla import RGB_DIR, SEG_DIR

MANIFEST = "manifest.json"
_TMP = ".tmp"


def bgra_to_rgb(raw: Any, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a CARLA image's BGRA bytes."""
    bgra = np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 4)
    return np.ascontiguousarray(bgra[..., 2::-1])


def raw_seg_to_rgb(raw: Any, height: int, width: int, lut: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8 of a raw semantic image: red = tag id (through ``lut`` when given)."""
    seg = bgra_to_rgb(raw, height, width)
    if lut is not None:
        seg[..., 0] = lut[seg[..., 0]]
    return seg


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON atomically (a temp file renamed over ``path``)."""
    tmp = path.with_name(f".{path.name}{_TMP}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object at ``path``, or ``None`` when there is no such file."""
    return json.loads(path.read_text()) if path.is_file() else None


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG", compress_level=3)


class VehicleFolder:
    """One vehicle's camera folders: counts what is on disk and appends paired frames."""

    def __init__(self, out: Path, name: str) -> None:
        self.name = name
        self.root = Path(out) / name
        self.rgb_dir, self.seg_dir = self.root / RGB_DIR, self.root / SEG_DIR
        self.count = 0
        self.next_index = 0

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def resume(self) -> int:
        """Create the folders, drop temp files and unpaired frames; return the complete pairs kept.

        An interruption between a pair's two renames leaves a label without its image (never the
        reverse): that frame is deleted here and numbering continues after the last kept frame.
        """
        for folder in (self.rgb_dir, self.seg_dir):
            folder.mkdir(parents=True, exist_ok=True)
            for tmp in folder.glob(f".*{_TMP}"):
                tmp.unlink()
        rgb = {p.name for p in self.rgb_dir.glob("*.png")}
        seg = {p.name for p in self.seg_dir.glob("*.png")}
        for name in rgb - seg:
            (self.rgb_dir / name).unlink()
        for name in seg - rgb:
            (self.seg_dir / name).unlink()
        paired = rgb & seg
        numbers = [int(Path(n).stem) for n in paired if Path(n).stem.isdigit()]
        self.count = len(paired)
        self.next_index = max(numbers, default=-1) + 1
        return self.count

    def write_pair(self, rgb: np.ndarray, seg: np.ndarray) -> str:
        """Write one frame's RGB image and label; returns the file name (``000123.png``).

        Both go to temp names first and are renamed label first, image second, so a reader or an
        interruption never sees an image without its label; on any error the half-written frame
        is removed before the error propagates.
        """
        name = f"{self.next_index:06d}.png"
        seg_path, rgb_path = self.seg_dir / name, self.rgb_dir / name
        seg_tmp, rgb_tmp = self.seg_dir / f".{name}{_TMP}", self.rgb_dir / f".{name}{_TMP}"
        try:
            _save_png(seg, seg_tmp)
            _save_png(rgb, rgb_tmp)
            os.replace(seg_tmp, seg_path)
            os.replace(rgb_tmp, rgb_path)
        except BaseException:  # also Ctrl-C: never leave half a frame behind
            for tmp in (seg_tmp, rgb_tmp):
                tmp.unlink(missing_ok=True)
            if not rgb_path.exists():
                seg_path.unlink(missing_ok=True)
            raise
        self.next_index += 1
        self.count += 1
        return name


def camera_manifest(spec: CollectSpec) -> dict[str, Any]:
    """Pinhole intrinsics (CARLA cameras have square pixels, principal point at the centre) and
    the camera's pose on the vehicle, both cameras alike."""
    height, width = (int(v) for v in spec.image_size)
    focal = width / (2.0 * math.tan(math.radians(float(spec.fov)) / 2.0))
    cx, cy = width / 2.0, height / 2.0
    x, y, z = (float(v) for v in spec.camera_location)
    pitch, yaw, roll = (float(v) for v in spec.camera_rotation)
    return {
        "sensors": ["sensor.camera.rgb", "sensor.camera.semantic_segmentation"],
        "width": width,
        "height": height,
        "fov_deg": float(spec.fov),
        "intrinsics": {"fx": focal, "fy": focal, "cx": cx, "cy": cy,
                       "matrix": [[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]]},
        "extrinsics": {
            "parent": "vehicle",
            "location_m": {"x": x, "y": y, "z": z},
            "rotation_deg": {"pitch": pitch, "yaw": yaw, "roll": roll},
            "convention": "CARLA (Unreal) left-handed: x forward, y right, z up",
        },
    }
