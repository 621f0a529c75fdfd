"""Talking to the CARLA server: connecting, version and tag-set checks, towns, weathers, the fleet plan.

Every error here is a :class:`CollectError` with one line a user can act on.
"""

from __future__ import annotations

import importlib
import random
import re
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from fedseg.collect.spec import CollectSpec, vehicle_name
from fedseg.errors import CollectError
from fedseg.labels import TAGSETS

FIRST_29_TAG_VERSION = (0, 9, 14)  # CARLA 0.9.14 moved to the 29 CityScapes-aligned tags


def import_carla() -> ModuleType:
    """The real ``carla`` client package, imported only when a collection starts."""
    try:
        return importlib.import_module("carla")
    except ImportError as err:
        raise CollectError(
            "the carla client package is not installed: pip install -e '.[carla]' "
            "(or pip install carla==<your server's version>)"
        ) from err


def first_line(err: BaseException) -> str:
    """An exception's message as one line (CARLA's messages can span several)."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


@dataclass
class Server:
    """A connected CARLA client and what was learnt from the server."""

    carla: ModuleType
    client: Any
    spec: CollectSpec
    server_version: str
    client_version: str
    lost: bool = False  # set when the server stopped answering: cleanup then skips its RPCs
    towns: list[str] = field(default_factory=list)

    @property
    def native_tagset(self) -> str:
        """The tag set this server's semantic camera writes."""
        version = parse_version(self.server_version)
        return "legacy13" if version is not None and version < FIRST_29_TAG_VERSION else "carla29"

    def versions(self) -> dict[str, str]:
        return {"server_version": self.server_version, "client_version": self.client_version,
                "address": self.spec.address}


def parse_version(text: str) -> tuple[int, int, int] | None:
    """``"0.9.16"`` (or ``"0.9.16-dirty"``) -> ``(0, 9, 16)``; ``None`` when not a release number."""
    match = re.match(r"\s*(\d+)\.(\d+)\.(\d+)", text)
    return None if match is None else (int(match[1]), int(match[2]), int(match[3]))


def connect(carla: ModuleType, spec: CollectSpec) -> Server:
    """Connect to ``spec.host:spec.port`` within ``spec.timeout`` and check both versions match."""
    client = carla.Client(spec.host, int(spec.port))
    client.set_timeout(float(spec.timeout))
    try:
        server_version = str(client.get_server_version())
        towns = sorted(town_name(m) for m in client.get_available_maps())
    except RuntimeError as err:  # the client's "time-out of ...ms while waiting for the simulator"
        raise CollectError(
            f"no CARLA server answered at {spec.address} within {float(spec.timeout):g}s "
            f"(start one with ./CarlaUE4.sh -RenderOffScreen -carla-rpc-port={spec.port}, "
            f"or set host= and port=)"
        ) from err
    client_version = str(client.get_client_version())
    server = Server(carla, client, spec, server_version, client_version, towns=towns)
    check_versions(server)
    return server


def check_versions(server: Server) -> None:
    """Client and server must be the same release (CARLA's RPC is not stable across releases)."""
    client_v, server_v = parse_version(server.client_version), parse_version(server.server_version)
    same = client_v == server_v if client_v and server_v else server.client_version == server.server_version
    if not same and not server.spec.allow_version_mismatch:
        raise CollectError(
            f"CARLA client {server.client_version} and server {server.server_version} at "
            f"{server.spec.address} differ: pip install carla=={server.server_version} "
            f"(or set allow_version_mismatch=true)"
        )


def tag_lut(server: Server, tagset: str) -> np.ndarray | None:
    """How the server's tag ids become ``tagset``'s: ``None`` when they already are.

    A 0.9.14+ server (29 tags) can write the legacy 13-tag set (each tag to its legacy name, as
    ``fedseg.labels`` defines); a legacy server cannot invent the finer 29 tags.
    """
    native = server.native_tagset
    if tagset == native:
        return None
    if native == "legacy13":
        raise CollectError(
            f"tagset={tagset} needs a CARLA 0.9.14+ server; the server at {server.spec.address} is "
            f"{server.server_version} (legacy 13 tags): set tagset=legacy13"
        )
    source, target = TAGSETS[native], TAGSETS[tagset]
    lut = np.zeros(256, dtype=np.uint8)  # ids the server should never send -> unlabeled
    for tag_id, name in enumerate(source.names):
        lut[tag_id] = target.tag_id(name)
    return lut


def town_name(path: str) -> str:
    """``"/Game/Carla/Maps/Town01"`` or ``"Carla/Maps/Town01"`` -> ``"Town01"``."""
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def weather_presets(carla: ModuleType) -> list[str]:
    """The named presets of ``carla.WeatherParameters`` (``ClearNoon``, ``HardRainSunset``, ...)."""
    params = carla.WeatherParameters
    return sorted(n for n in dir(params) if n[:1].isupper() and n != "Default"
                  and isinstance(getattr(params, n), params))


@dataclass(frozen=True)
class VehiclePlan:
    """Which town and weather one vehicle collects in."""

    index: int
    name: str
    town: str
    weather: str


def _draw_pool(towns: list[str]) -> list[str]:
    """Towns to draw from: ``TownXX_Opt`` (the layered twin of ``TownXX``) counts once."""
    return [t for t in towns if not (t.endswith("_Opt") and t[: -len("_Opt")] in towns)]


def plan_fleet(spec: CollectSpec, towns: list[str], presets: list[str],
               stored: list[dict[str, Any]] | None = None) -> list[VehiclePlan]:
    """Each vehicle's town and weather: ``stored`` (a continued collection's), listed or drawn.

    Listed values cycle over the vehicles; drawn ones come from ``random.Random(spec.seed)``, so
    the same command draws the same fleet from the same server.
    """
    if stored:
        plans = [VehiclePlan(int(v["index"]), str(v["name"]), str(v["town"]), str(v["weather"]))
                 for v in stored]
    else:
        rng = random.Random(spec.seed)
        pool = _draw_pool(towns)
        if not spec.towns and not pool:
            raise CollectError(f"the server at {spec.address} lists no towns to draw from; set towns=[...]")
        plans = []
        for i in range(int(spec.vehicles)):
            town = spec.towns[i % len(spec.towns)] if spec.towns else rng.choice(pool)
            weather = spec.weathers[i % len(spec.weathers)] if spec.weathers else rng.choice(presets)
            plans.append(VehiclePlan(i, vehicle_name(i), str(town), str(weather)))
    missing = sorted({p.town for p in plans} - set(towns))
    if missing:
        raise CollectError(f"town {missing[0]!r} is not on the server at {spec.address}; "
                           f"available: {', '.join(towns) or 'none'}")
    unknown = sorted({p.weather for p in plans} - set(presets))
    if unknown:
        raise CollectError(f"unknown weather preset {unknown[0]!r}; valid: {', '.join(presets)}")
    return plans


def server_error(server: Server, err: RuntimeError, doing: str) -> CollectError:
    """A ``CollectError`` for a CARLA ``RuntimeError``; a time-out marks the server as lost."""
    if "time-out" in str(err):
        server.lost = True
        return CollectError(f"lost the CARLA server at {server.spec.address} while {doing} "
                            f"({first_line(err)}); complete frames are kept: run the same command to continue")
    return CollectError(f"the CARLA server at {server.spec.address} failed while {doing}: {first_line(err)}")


def use_town(server: Server, town: str) -> Any:
    """The server's world, loading ``town`` first unless it is already the current map."""
    client = server.client
    try:
        world = client.get_world()
        if town_name(world.get_map().name) == town:
            return world
        client.set_timeout(float(server.spec.load_timeout))
        world = client.load_world(town)
        client.set_timeout(float(server.spec.timeout))
        return world
    except RuntimeError as err:
        raise server_error(server, err, f"loading {town}") from err
