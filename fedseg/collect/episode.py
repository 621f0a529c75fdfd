"""One episode: a town under one weather, its vehicles on autopilot, ticked in synchronous mode.

Every actor spawned is destroyed and the world's settings and the Traffic Manager's synchronous
mode are restored when the episode ends, whatever ends it (an error, Ctrl-C), unless the server
itself is gone.
"""

from __future__ import annotations

import logging
import queue
import random
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedseg.collect.server import Server, VehiclePlan, first_line, server_error
from fedseg.collect.store import VehicleFolder, bgra_to_rgb, raw_seg_to_rgb
from fedseg.errors import CollectError

log = logging.getLogger(__name__)
RGB_CAMERA = "sensor.camera.rgb"
SEG_CAMERA = "sensor.camera.semantic_segmentation"


@dataclass
class Rig:
    """One vehicle with its two cameras (same pose, size, field of view) and their image queues."""

    plan: VehiclePlan
    folder: VehicleFolder
    target: int
    on_frame: Callable[[], Any]
    vehicle: Any = None
    blueprint: str = ""
    cameras: dict[str, Any] = field(default_factory=dict)
    queues: dict[str, queue.Queue] = field(default_factory=lambda: {"rgb": queue.Queue(), "seg": queue.Queue()})
    server_frames: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.folder.count >= self.target

    def image(self, kind: str, frame: int, timeout: float) -> Any:
        """The ``kind`` camera's image of server frame ``frame``; older images are dropped."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                image = self.queues[kind].get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise CollectError(f"{self.plan.name}: no {kind} image for frame {frame} within "
                                   f"{timeout:g}s (sensor_timeout); is the server overloaded?") from None
            if image.frame == frame:
                return image
            if image.frame > frame:
                raise CollectError(f"{self.plan.name}: the {kind} camera skipped frame {frame} "
                                   f"(next image is frame {image.frame})")


@dataclass
class Episode:
    """Collect ``target`` frames for every rig's vehicle in ``town`` under ``weather``."""

    server: Server
    world: Any
    town: str
    weather: str
    rigs: list[Rig]
    lut: np.ndarray | None = None
    tm: Any = None  # the Traffic Manager, once the episode runs

    def run(self) -> None:
        """Configure the world, spawn, drive until every vehicle has its frames, clean up."""
        with ExitStack() as stack:
            try:
                self._synchronous(stack)
                self.world.set_weather(getattr(self.server.carla.WeatherParameters, self.weather))
                self._spawn(stack)
                self._drive()
            except RuntimeError as err:  # raised before the cleanup runs, so it knows a lost server
                raise server_error(self.server, err, f"collecting in {self.town}") from err

    def _quietly(self, what: str, call: Callable[[], Any]) -> None:
        """Run a cleanup step unless the server is gone; a failure is logged, the next step runs."""
        if self.server.lost:
            return
        try:
            call()
        except Exception as err:  # noqa: BLE001 - cleanup must reach every later step
            log.warning("cleanup: %s failed: %s", what, first_line(err))

    def _synchronous(self, stack: ExitStack) -> None:
        """Synchronous mode with a fixed step, for the world and the Traffic Manager; undone on exit."""
        spec, client = self.server.spec, self.server.client
        original = self.world.get_settings()
        settings = self.world.get_settings()
        settings.synchronous_mode = True
        settings.fixed_delta_seconds = float(spec.fixed_delta_seconds)
        stack.callback(self._quietly, "restoring world settings", lambda: self.world.apply_settings(original))
        self.world.apply_settings(settings)
        self.tm = client.get_trafficmanager(int(spec.tm_port))
        stack.callback(self._quietly, "Traffic Manager async", lambda: self.tm.set_synchronous_mode(False))
        self.tm.set_synchronous_mode(True)
        self.tm.set_random_device_seed(int(spec.seed))

    def _destroy(self, actors: list[Any]) -> None:
        """Stop the sensors, then destroy sensors and vehicles in one batch."""
        for actor in actors:
            if hasattr(actor, "stop"):
                self._quietly(f"stopping {actor.id}", actor.stop)
        command = self.server.carla.command
        self._quietly("destroying actors",
                      lambda: self.server.client.apply_batch([command.DestroyActor(a) for a in reversed(actors)]))

    def _spawn(self, stack: ExitStack) -> None:
        """A vehicle on autopilot at a free spawn point for every rig, then its two cameras."""
        carla, spec = self.server.carla, self.server.spec
        actors: list[Any] = []
        stack.callback(self._destroy, actors)
        rng = random.Random(f"{spec.seed}:{self.town}:{self.weather}")
        library = self.world.get_blueprint_library()
        blueprints = [bp for bp in library.filter(spec.vehicle_filter) if _four_wheels(bp)]
        if not blueprints:
            raise CollectError(f"no four-wheeled vehicle matches vehicle_filter={spec.vehicle_filter!r}")
        points = list(self.world.get_map().get_spawn_points())
        rng.shuffle(points)
        (x, y, z), (pitch, yaw, roll) = spec.camera_location, spec.camera_rotation
        pose = carla.Transform(carla.Location(x=float(x), y=float(y), z=float(z)),
                               carla.Rotation(pitch=float(pitch), yaw=float(yaw), roll=float(roll)))
        for rig in self.rigs:
            blueprint = rng.choice(blueprints)
            if blueprint.has_attribute("role_name"):
                blueprint.set_attribute("role_name", rig.plan.name)
            while rig.vehicle is None and points:
                rig.vehicle = self.world.try_spawn_actor(blueprint, points.pop())
            if rig.vehicle is None:
                raise CollectError(f"{self.town}: no free spawn point left for {rig.plan.name}; "
                                   f"use fewer vehicles per town")
            actors.append(rig.vehicle)
            rig.blueprint = blueprint.id
            rig.vehicle.set_autopilot(True, self.tm.get_port())
            for kind, sensor in (("rgb", RGB_CAMERA), ("seg", SEG_CAMERA)):
                camera = self.world.spawn_actor(self._camera(library, sensor), pose, attach_to=rig.vehicle)
                actors.append(camera)
                rig.cameras[kind] = camera
                camera.listen(rig.queues[kind].put)

    def _camera(self, library: Any, sensor: str) -> Any:
        spec = self.server.spec
        blueprint = library.find(sensor)
        height, width = spec.image_size
        for key, value in (("image_size_x", width), ("image_size_y", height), ("fov", spec.fov),
                           ("sensor_tick", 0.0)):  # an image every tick; every k-th is written
            blueprint.set_attribute(key, str(value))
        return blueprint

    def _drive(self) -> None:
        """Tick until every rig is done; on every k-th tick after the warm-up write a frame per rig."""
        spec = self.server.spec
        active, tick = [r for r in self.rigs if not r.done], 0
        while active:
            frame = int(self.world.tick())
            tick += 1
            if tick <= spec.warmup_ticks or (tick - spec.warmup_ticks - 1) % spec.every:
                continue  # the cameras' queues keep these images until the next written tick
            for rig in active:
                self._write(rig, frame)
            for rig in [r for r in active if r.done]:
                for camera in rig.cameras.values():
                    camera.stop()
            active = [r for r in active if not r.done]

    def _write(self, rig: Rig, frame: int) -> None:
        """Wait for both cameras' images of ``frame`` and write them as one pair."""
        timeout = float(self.server.spec.sensor_timeout)
        rgb, seg = rig.image("rgb", frame, timeout), rig.image("seg", frame, timeout)
        seg.convert(self.server.carla.ColorConverter.Raw)  # tag ids, not the CityScapes palette
        rig.folder.write_pair(bgra_to_rgb(rgb.raw_data, rgb.height, rgb.width),
                              raw_seg_to_rgb(seg.raw_data, seg.height, seg.width, self.lut))
        rig.server_frames.append(frame)
        rig.on_frame()


def _four_wheels(blueprint: Any) -> bool:
    """Cars, vans, trucks: a camera 2.4 m up on a bicycle would see another world."""
    if not blueprint.has_attribute("number_of_wheels"):
        return True
    return int(blueprint.get_attribute("number_of_wheels").as_int()) == 4
