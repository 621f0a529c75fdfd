"""What a collection records about itself: ``<out>/manifest.json`` and ``<out>/vehicle_<i>/manifest.json``.

The fleet manifest also makes a collection continuable: the same command finds it, checks that
the settings that define the data are unchanged and reuses its vehicles' towns and weathers.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from fedseg.collect.server import Server, VehiclePlan
from fedseg.collect.spec import CollectSpec
from fedseg.collect.store import MANIFEST, VehicleFolder, camera_manifest, read_json, write_json
from fedseg.data.carla import RGB_DIR, SEG_DIR
from fedseg.errors import CollectError

LAYOUT = (f"<vehicle>/{RGB_DIR}/<frame>.png + <vehicle>/{SEG_DIR}/<frame>.png; "
          f"{SEG_DIR}: CARLA raw semantic image, tag id in the red channel")


def now() -> str:
    """The current UTC time, ISO 8601, to the second."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def stored_fleet(out: Path, spec: CollectSpec) -> list[dict[str, Any]] | None:
    """The vehicles of the collection already in ``out`` (``None``: a new one).

    Raises ``CollectError`` when ``out`` holds a collection made with other data-defining settings
    (only ``frames``, the per-vehicle target, and connection settings may change).
    """
    stored = read_json(out / MANIFEST)
    if stored is None:
        return None
    before, now_ = stored.get("settings", {}), spec.fleet_settings()
    changed = [f"{k}={before.get(k)!r} (now {now_[k]!r})" for k in now_ if before.get(k) != now_[k]]
    if changed:
        raise CollectError(f"{out} holds a collection made with other settings: {'; '.join(changed)}; "
                           f"continue it with the same settings or choose another out=")
    return list(stored.get("vehicles") or []) or None


class Manifests:
    """Keeps the fleet's and every vehicle's manifest up to date as episodes end."""

    def __init__(self, out: Path, spec: CollectSpec, server: Server, plans: list[VehiclePlan],
                 folders: dict[str, VehicleFolder], lut_applied: bool) -> None:
        self.out, self.spec, self.server, self.plans, self.folders = out, spec, server, plans, folders
        self.lut_applied = lut_applied
        self.sessions: dict[str, list[dict[str, Any]]] = {}
        self.blueprints: dict[str, str] = {}
        for plan in plans:
            old = read_json(folders[plan.name].manifest_path) or {}
            self.sessions[plan.name] = list(old.get("sessions", []))
            self.blueprints[plan.name] = str(old.get("blueprint", ""))

    def add_session(self, name: str, *, started: str, server_frames: list[int], blueprint: str) -> None:
        """Record one episode of vehicle ``name``: when, which server frames it wrote, which car."""
        self.sessions[name].append({
            "started": started,
            "ended": now(),
            "frames_written": len(server_frames),
            "server_frames": [server_frames[0], server_frames[-1]] if server_frames else None,
            "blueprint": blueprint,
            **self.server.versions(),
        })
        if blueprint:
            self.blueprints[name] = blueprint

    def _common(self) -> dict[str, Any]:
        spec, delta = self.spec, float(self.spec.fixed_delta_seconds)
        return {
            "carla": self.server.versions(),
            "tagset": spec.tagset,
            "server_tagset": self.server.native_tagset,
            "tags_remapped": self.lut_applied,
            "layout": LAYOUT,
            "camera": camera_manifest(spec),
            "fixed_delta_seconds": delta,
            "tick_hz": 1.0 / delta,
            "every": int(spec.every),
            "frame_period_s": delta * int(spec.every),
            "warmup_ticks": int(spec.warmup_ticks),
        }

    def write(self) -> None:
        """Write every vehicle's manifest and the fleet manifest (frames counted on disk)."""
        common, target = self._common(), int(self.spec.frames)
        vehicles: list[dict[str, Any]] = []
        for plan in self.plans:
            count = self.folders[plan.name].count
            vehicles.append({"index": plan.index, "name": plan.name, "town": plan.town,
                             "weather": plan.weather, "frames": count})
            write_json(self.folders[plan.name].manifest_path, {
                "vehicle": plan.name, "index": plan.index, "town": plan.town, "weather": plan.weather,
                **common, "blueprint": self.blueprints[plan.name], "frames": count,
                "frames_target": target, "complete": count >= target, "sessions": self.sessions[plan.name],
                "updated": now()})
        write_json(self.out / MANIFEST, {
            "tool": "fedseg-collect", **common, "settings": self.spec.fleet_settings(),
            "frames_per_vehicle": target, "vehicles": vehicles,
            "frames_total": sum(v["frames"] for v in vehicles),
            "complete": all(v["frames"] >= target for v in vehicles), "updated": now()})
