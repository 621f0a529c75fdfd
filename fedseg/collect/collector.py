"""``collect``: drive a fleet on a CARLA server and write each vehicle's frames for ``data=carla``."""

from __future__ import annotations

import functools
import itertools
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from tqdm import tqdm

from fedseg.collect.episode import Episode, Rig
from fedseg.collect.manifest import Manifests, now, stored_fleet
from fedseg.collect.server import (
    VehiclePlan,
    connect,
    import_carla,
    plan_fleet,
    tag_lut,
    use_town,
    weather_presets,
)
from fedseg.collect.spec import CollectSpec
from fedseg.collect.store import VehicleFolder


@dataclass(frozen=True)
class CollectResult:
    """Where the frames went and how many each vehicle has on disk."""

    out: Path
    frames: dict[str, int]
    complete: bool


def episodes(plans: list[VehiclePlan]) -> Iterator[tuple[str, str, list[VehiclePlan]]]:
    """``(town, weather, vehicles)`` groups, sorted by town so each town loads once.

    One server runs one world, with one weather: vehicles that share both drive together.
    """
    key = operator.attrgetter("town", "weather")
    for (town, weather), group in itertools.groupby(sorted(plans, key=key), key=key):
        yield town, weather, list(group)


def collect(spec: CollectSpec, *, carla: ModuleType | None = None) -> CollectResult:
    """Collect ``spec.frames`` paired RGB/label frames per vehicle into ``spec.out``.

    ``carla`` is the client module (the installed ``carla`` package by default; tests pass a
    double). Frames already in ``spec.out`` count: the same command continues an interrupted
    collection. Raises :class:`~fedseg.collect.spec.CollectError` for a missing server, a version
    mismatch, an unknown town or weather, changed settings or a lost server; ``KeyboardInterrupt``
    passes through after cleanup. Either way only complete frame pairs stay on disk.
    """
    out = Path(spec.out).expanduser()
    stored = stored_fleet(out, spec)
    server = connect(carla if carla is not None else import_carla(), spec)
    plans = plan_fleet(spec, server.towns, weather_presets(server.carla), stored)
    lut = tag_lut(server, spec.tagset)
    folders = {p.name: VehicleFolder(out, p.name) for p in plans}
    for folder in folders.values():
        folder.resume()
    manifests = Manifests(out, spec, server, plans, folders, lut_applied=lut is not None)
    manifests.write()
    bars = {p.name: tqdm(total=int(spec.frames), initial=min(folders[p.name].count, int(spec.frames)),
                         position=p.index, desc=f"{p.name} {p.town} {p.weather}", unit="frame",
                         disable=not spec.progress, leave=True) for p in plans}
    try:
        for town, weather, members in episodes(plans):
            rigs = [Rig(p, folders[p.name], int(spec.frames), functools.partial(bars[p.name].update, 1))
                    for p in members if folders[p.name].count < spec.frames]
            if not rigs:
                continue
            started, world = now(), use_town(server, town)
            try:
                Episode(server, world, town, weather, rigs, lut).run()
            finally:
                for rig in rigs:
                    manifests.add_session(rig.plan.name, started=started, server_frames=rig.server_frames,
                                          blueprint=rig.blueprint)
                manifests.write()
    finally:
        manifests.write()
        for bar in bars.values():
            bar.close()
    frames = {name: folder.count for name, folder in folders.items()}
    return CollectResult(out, frames, all(n >= spec.frames for n in frames.values()))
