"""A test double of the part of the ``carla`` client API that ``fedseg.collect`` uses.

``FakeCarla()`` stands in for the ``carla`` module (``Client``, ``Transform``, ``Location``,
``Rotation``, ``WeatherParameters``, ``ColorConverter``, ``command.DestroyActor``); its ``server``
(a :class:`FakeServer`) is the simulator: it records spawned and destroyed actors, applied world
settings and the Traffic Manager's mode, and can be told to fail. Cameras deliver images from a
thread, a little late, like the real client's streaming threads.

Image content is known exactly. Semantic camera (BGRA, as CARLA sends it): red = tag id
``(x + frame) % num_tags`` (29 tags from 0.9.14, 13 before), green/blue = an instance id (7, 1).
RGB camera: red = the parent vehicle's id, green/blue = the server frame (high/low byte).
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import numpy as np

TIMEOUT = "time-out of 2000ms while waiting for the simulator, make sure the simulator is ready and connected"


@dataclass(frozen=True)
class Location:
    x: float = 0.0
    y: float = 0.0
    z: float = 0.0


@dataclass(frozen=True)
class Rotation:
    pitch: float = 0.0
    yaw: float = 0.0
    roll: float = 0.0


@dataclass(frozen=True)
class Transform:
    location: Location = Location()
    rotation: Rotation = Rotation()


@dataclass
class WorldSettings:
    synchronous_mode: bool = False
    fixed_delta_seconds: float | None = None
    no_rendering_mode: bool = False


class WeatherParameters:
    def __init__(self, name: str) -> None:
        self.name = name


for _preset in ("Default", "ClearNoon", "CloudyNoon", "WetNoon", "HardRainNoon", "ClearSunset", "WetCloudyNight"):
    setattr(WeatherParameters, _preset, WeatherParameters(_preset))


@dataclass(frozen=True)
class DestroyActor:
    actor_id: int

    def __init__(self, actor: Any) -> None:
        object.__setattr__(self, "actor_id", actor if isinstance(actor, int) else actor.id)


class Attribute:
    def __init__(self, value: str) -> None:
        self.value = value

    def as_int(self) -> int:
        return int(self.value)


@dataclass
class Blueprint:
    id: str
    attributes: dict[str, str] = field(default_factory=dict)

    def has_attribute(self, key: str) -> bool:
        return key in self.attributes

    def get_attribute(self, key: str) -> Attribute:
        return Attribute(self.attributes[key])

    def set_attribute(self, key: str, value: str) -> None:
        if not isinstance(value, str):  # the real client takes strings only
            raise TypeError(f"set_attribute({key!r}) needs a str, got {type(value).__name__}")
        if key not in self.attributes:
            raise IndexError(f"blueprint {self.id} has no attribute {key!r}")
        self.attributes[key] = value


BLUEPRINTS = [
    Blueprint("vehicle.tesla.model3", {"number_of_wheels": "4", "role_name": "autopilot"}),
    Blueprint("vehicle.audi.tt", {"number_of_wheels": "4", "role_name": "autopilot"}),
    Blueprint("vehicle.yamaha.yzf", {"number_of_wheels": "2", "role_name": "autopilot"}),
    Blueprint("sensor.camera.rgb", {"image_size_x": "800", "image_size_y": "600", "fov": "90", "sensor_tick": "0.0"}),
    Blueprint("sensor.camera.semantic_segmentation",
              {"image_size_x": "800", "image_size_y": "600", "fov": "90", "sensor_tick": "0.0"}),
]


class BlueprintLibrary:
    def filter(self, pattern: str) -> list[Blueprint]:
        return [replace(bp, attributes=dict(bp.attributes)) for bp in BLUEPRINTS if fnmatch.fnmatch(bp.id, pattern)]

    def find(self, blueprint_id: str) -> Blueprint:
        return next(replace(bp, attributes=dict(bp.attributes)) for bp in BLUEPRINTS if bp.id == blueprint_id)


@dataclass
class Image:
    frame: int
    width: int
    height: int
    raw_data: bytes
    converted: list[str] = field(default_factory=list)

    def convert(self, converter: str) -> None:
        if converter != "Raw":
            raise AssertionError("the collector must keep raw tag ids")
        self.converted.append(converter)


class Actor:
    def __init__(self, server: FakeServer, blueprint: Blueprint, transform: Transform, parent: Actor | None) -> None:
        self.server, self.type_id, self.transform, self.parent = server, blueprint.id, transform, parent
        self.attributes = dict(blueprint.attributes)
        self.id = server.next_id()
        self.callback: Callable[[Any], None] | None = None
        self.autopilot: tuple[bool, int] | None = None

    def set_autopilot(self, enabled: bool, tm_port: int) -> None:
        self.autopilot = (enabled, tm_port)

    def listen(self, callback: Callable[[Any], None]) -> None:
        self.callback = callback

    def stop(self) -> None:
        self.callback = None

    def image(self, frame: int) -> Image:
        """This camera's image of ``frame`` (see the module docstring for the content)."""
        width, height = int(self.attributes["image_size_x"]), int(self.attributes["image_size_y"])
        bgra = np.zeros((height, width, 4), dtype=np.uint8)
        bgra[..., 3] = 255
        if self.type_id.endswith("semantic_segmentation"):
            bgra[..., 2] = (np.arange(width)[None, :] + frame) % self.server.num_tags
            bgra[..., 1], bgra[..., 0] = 7, 1
        else:
            assert self.parent is not None
            bgra[..., 2], bgra[..., 1], bgra[..., 0] = self.parent.id % 256, frame // 256 % 256, frame % 256
        return Image(frame, width, height, bgra.tobytes())


class FakeServer:
    """The simulator's state, and what a test can make it do (fail, stop sending images)."""

    def __init__(self, version: str = "0.9.16", towns: tuple[str, ...] = ("Town01", "Town01_Opt", "Town02",
                 "Town03", "Town10HD", "Town10HD_Opt"), spawn_points: int = 12, blocked_points: int = 2) -> None:
        self.version, self.towns, self.current_town = version, list(towns), towns[-1]
        self.spawn_points, self.blocked_points = spawn_points, blocked_points
        self.up, self.frame, self.ticks, self._ids = True, 100, 0, 0
        self.settings = WorldSettings()
        self.tm_sync = False
        self.actors: dict[int, Actor] = {}
        self.spawned: list[Actor] = []
        self.destroyed: list[int] = []
        self.applied: list[WorldSettings] = []
        self.weathers: list[str] = []
        self.loads: list[str] = []
        self.fail_after_ticks: int | None = None  # then every call times out (the server is gone)
        self.interrupt_after_ticks: int | None = None  # then tick() raises KeyboardInterrupt (Ctrl-C)
        self.silent_after_ticks: int | None = None  # then cameras send nothing
        self.lock = threading.Lock()

    @property
    def num_tags(self) -> int:
        return 29 if tuple(int(v) for v in self.version.split(".")[:3]) >= (0, 9, 14) else 13

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def check(self) -> None:
        if not self.up:
            raise RuntimeError(TIMEOUT)

    def restart(self) -> None:
        """A fresh server process: no actors, default settings, frame counter from 0."""
        self.up, self.actors, self.settings, self.tm_sync, self.frame = True, {}, WorldSettings(), False, 0
        self.spawned, self.destroyed, self.applied = [], [], []
        self.fail_after_ticks = self.interrupt_after_ticks = self.silent_after_ticks = None

    def tick(self) -> int:
        self.check()
        if self.fail_after_ticks is not None and self.ticks >= self.fail_after_ticks:
            self.up = False
            raise RuntimeError(TIMEOUT)
        if self.interrupt_after_ticks is not None and self.ticks >= self.interrupt_after_ticks:
            raise KeyboardInterrupt
        assert self.settings.synchronous_mode and self.tm_sync, "ticked outside synchronous mode"
        self.ticks += 1
        self.frame += 1
        if self.silent_after_ticks is None or self.ticks <= self.silent_after_ticks:
            for actor in list(self.actors.values()):
                if actor.callback is not None:
                    threading.Timer(0.002, actor.callback, [actor.image(self.frame)]).start()
        return self.frame


class World:
    def __init__(self, server: FakeServer) -> None:
        self.server = server

    def get_settings(self) -> WorldSettings:
        self.server.check()
        return replace(self.server.settings)

    def apply_settings(self, settings: WorldSettings) -> int:
        self.server.check()
        self.server.settings = replace(settings)
        self.server.applied.append(replace(settings))
        return self.server.frame

    def get_map(self) -> SimpleNamespace:
        self.server.check()
        points = [Transform(Location(x=10.0 * i, y=5.0)) for i in range(self.server.spawn_points)]
        return SimpleNamespace(name=f"Carla/Maps/{self.server.current_town}", get_spawn_points=lambda: points)

    def set_weather(self, weather: WeatherParameters) -> None:
        self.server.check()
        self.server.weathers.append(weather.name)

    def get_blueprint_library(self) -> BlueprintLibrary:
        return BlueprintLibrary()

    def _spawn(self, blueprint: Blueprint, transform: Transform, parent: Actor | None) -> Actor:
        actor = Actor(self.server, blueprint, transform, parent)
        self.server.actors[actor.id] = actor
        self.server.spawned.append(actor)
        return actor

    def try_spawn_actor(self, blueprint: Blueprint, transform: Transform) -> Actor | None:
        self.server.check()
        taken = {a.transform for a in self.server.actors.values() if a.parent is None}
        if transform in taken or transform.location.x < 10.0 * self.server.blocked_points:
            return None  # a parked car stands there
        return self._spawn(blueprint, transform, None)

    def spawn_actor(self, blueprint: Blueprint, transform: Transform, attach_to: Actor | None = None) -> Actor:
        self.server.check()
        return self._spawn(blueprint, transform, attach_to)

    def tick(self, seconds: float = 10.0) -> int:
        return self.server.tick()


class TrafficManager:
    def __init__(self, server: FakeServer, port: int) -> None:
        self.server, self.port = server, port

    def set_synchronous_mode(self, enabled: bool) -> None:
        self.server.check()
        self.server.tm_sync = enabled

    def set_random_device_seed(self, seed: int) -> None:
        self.server.check()

    def get_port(self) -> int:
        return self.port


class Client:
    def __init__(self, carla: FakeCarla, host: str, port: int) -> None:
        self.carla, self.server, self.address = carla, carla.server, f"{host}:{port}"
        self.timeouts: list[float] = []

    def set_timeout(self, seconds: float) -> None:
        self.timeouts.append(seconds)

    def get_client_version(self) -> str:
        return self.carla.client_version

    def get_server_version(self) -> str:
        self.server.check()
        return self.server.version

    def get_available_maps(self) -> list[str]:
        self.server.check()
        return [f"/Game/Carla/Maps/{t}" for t in self.server.towns]

    def get_world(self) -> World:
        self.server.check()
        return World(self.server)

    def load_world(self, town: str) -> World:
        self.server.check()
        assert town in self.server.towns
        self.server.current_town, self.server.settings = town, WorldSettings()
        self.server.loads.append(town)
        return World(self.server)

    def get_trafficmanager(self, port: int = 8000) -> TrafficManager:
        self.server.check()
        return TrafficManager(self.server, port)

    def apply_batch(self, commands: list[DestroyActor]) -> None:
        self.server.check()
        for command in commands:
            if self.server.actors.pop(command.actor_id, None) is not None:
                self.server.destroyed.append(command.actor_id)


class FakeCarla:
    """Stands in for the ``carla`` module; ``server`` is the simulator it talks to."""

    Transform, Location, Rotation, WorldSettings = Transform, Location, Rotation, WorldSettings
    WeatherParameters = WeatherParameters
    ColorConverter = SimpleNamespace(Raw="Raw", CityScapesPalette="CityScapesPalette")
    command = SimpleNamespace(DestroyActor=DestroyActor)

    def __init__(self, server: FakeServer | None = None, client_version: str = "0.9.16") -> None:
        self.server = server or FakeServer()
        self.client_version = client_version
        self.clients: list[Client] = []

    def Client(self, host: str, port: int) -> Client:  # the carla module's class name
        client = Client(self, host, port)
        self.clients.append(client)
        return client
