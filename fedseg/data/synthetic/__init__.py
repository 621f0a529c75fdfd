"""Procedural CARLA-like driving scenes: the embedded default dataset.

Each vehicle of the fleet drives in its own *town* (a ``TownStyle``: archetype, palette, building
height and density, vegetation, lanes and markings, traffic, camera pose range) under its own mix
of weathers, so clients are non-IID as in a real fleet. Frames are written in CARLA's camera
format, and every frame is a pure function of ``(seed, vehicle, frame)``.

Modules, each importing only those listed before it (no import cycle):

* ``styles``: the ``TownStyle`` and ``Weather`` types and the ``WEATHERS`` presets (plain data);
* ``_streams``: the independent random streams of one seed;
* ``towns``: each vehicle's town (``town_style``) and weather mix (``weather_mix``);
* ``_canvas``, ``_ground``, ``_roadside``, ``_furniture``, ``_agents``: geometry and drawing;
* ``_scene``: one frame laid out, drawn and developed like a camera would;
* ``fleet``: ``render_scene`` and the on-disk fleet: ``SyntheticFleet`` (any vehicle's frames, rendered
  on first use) and ``generate_fleet`` (a whole fleet at once), ``FORMAT_VERSION``.
"""

from fedseg.data.synthetic.fleet import (
    FORMAT_VERSION,
    SyntheticFleet,
    SyntheticFrame,
    generate_fleet,
    render_scene,
    vehicle_folder,
)
from fedseg.data.synthetic.styles import WEATHERS, TownStyle, Weather
from fedseg.data.synthetic.towns import town_style, weather_mix

__all__ = [
    "FORMAT_VERSION",
    "WEATHERS",
    "SyntheticFleet",
    "SyntheticFrame",
    "TownStyle",
    "Weather",
    "generate_fleet",
    "render_scene",
    "town_style",
    "vehicle_folder",
    "weather_mix",
]
