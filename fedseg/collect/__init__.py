"""Collecting CARLA camera frames for fedseg: a fleet on autopilot, one folder per vehicle.

``collect(CollectSpec(out=..., host=..., port=...))`` connects to a CARLA server, drives the fleet
in synchronous mode and writes ``<out>/vehicle_<i>/CameraRGB|CameraSeg/<frame>.png`` (tag id in
the red channel) plus manifests: the format ``data=carla`` reads. The ``carla`` client package is
imported only when a collection starts, so ``fedseg`` imports without it.
"""

from fedseg.collect.collector import CollectResult, collect, episodes
from fedseg.collect.spec import CollectSpec

__all__ = ["CollectResult", "CollectSpec", "collect", "episodes"]
