"""What a collection is: the typed settings of ``fedseg-collect`` (its error, ``CollectError``, is in fedseg.errors)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from fedseg.errors import CollectError
from fedseg.labels import TAGSETS


@dataclass(frozen=True)
class CollectSpec:
    """Every setting of one collection (``conf/collect.yaml``), resolved once at the entry point.

    ``towns``/``weathers``: vehicle ``i`` drives ``towns[i % len(towns)]`` under
    ``weathers[i % len(weathers)]``; ``None`` draws each vehicle's town (from the server's maps) or
    weather preset (from ``carla.WeatherParameters``) with ``seed``, so the fleet is non-IID.
    Vehicles that share a town and a weather drive together in one episode; episodes run one after
    another, grouped by town so each town is loaded once. ``image_size`` is (height, width).
    """

    out: str
    host: str = "127.0.0.1"
    port: int = 2000
    timeout: float = 10.0  # seconds: connecting and every RPC
    load_timeout: float = 120.0  # seconds: loading a town takes longer than an RPC
    tm_port: int = 8000
    vehicles: int = 4
    frames: int = 200  # frames written per vehicle
    every: int = 10  # write every k-th tick
    warmup_ticks: int = 20  # ticks before the first frame (vehicles start moving)
    fixed_delta_seconds: float = 0.05
    sensor_timeout: float = 10.0  # seconds to wait for a tick's image
    towns: tuple[str, ...] | None = None
    weathers: tuple[str, ...] | None = None
    seed: int = 0
    tagset: str = "carla29"
    image_size: tuple[int, int] = (600, 800)
    fov: float = 90.0
    camera_location: tuple[float, float, float] = (1.5, 0.0, 2.4)  # x, y, z metres from the vehicle
    camera_rotation: tuple[float, float, float] = (0.0, 0.0, 0.0)  # pitch, yaw, roll degrees
    vehicle_filter: str = "vehicle.*"
    allow_version_mismatch: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("port", "tm_port", "vehicles", "frames", "every"):
            if int(getattr(self, name)) < 1:
                raise CollectError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_ticks < 0:
            raise CollectError(f"warmup_ticks must be >= 0, got {self.warmup_ticks}")
        for name in ("timeout", "load_timeout", "sensor_timeout", "fixed_delta_seconds"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0):
                raise CollectError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.tagset not in TAGSETS:
            raise CollectError(f"unknown tagset {self.tagset!r}; valid: {sorted(TAGSETS)}")
        if len(self.image_size) != 2 or min(int(v) for v in self.image_size) < 1:
            raise CollectError(f"image_size must be [height, width] > 0, got {list(self.image_size)}")
        if not 0 < float(self.fov) < 180:
            raise CollectError(f"fov must be in (0, 180) degrees, got {self.fov}")
        for name in ("camera_location", "camera_rotation"):
            if len(getattr(self, name)) != 3:
                raise CollectError(f"{name} needs 3 numbers, got {list(getattr(self, name))}")
        for name in ("towns", "weathers"):
            if getattr(self, name) is not None and not getattr(self, name):
                raise CollectError(f"{name} is empty; list at least one or set {name}=null to draw them")
        if not str(self.out).strip():
            raise CollectError("out must name the folder the frames go to (out=DIR)")

    @property
    def address(self) -> str:
        """``host:port`` as users type it."""
        return f"{self.host}:{self.port}"

    def fleet_settings(self) -> dict[str, Any]:
        """The settings that define the data; a continuation must keep them (``frames`` may grow)."""
        keys = ("vehicles", "every", "warmup_ticks", "fixed_delta_seconds", "towns", "weathers", "seed",
                "tagset", "image_size", "fov", "camera_location", "camera_rotation", "vehicle_filter")
        values = asdict(self)
        return {k: list(values[k]) if isinstance(values[k], tuple) else values[k] for k in keys}


def vehicle_name(index: int) -> str:
    """The folder name of vehicle ``index``: ``vehicle_<i>``."""
    return f"vehicle_{index}"
