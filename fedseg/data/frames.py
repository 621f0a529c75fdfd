"""The frame record every loader and split passes around, in a module of its own.

Kept apart from ``carla`` (which discovers frames) and ``partition`` (which splits them), so that
each of those imports it and neither has to import the other for a type.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Frame:
    """One camera frame: the RGB image, its semantic-tag image, and its source folder's name."""

    rgb: Path
    seg: Path
    source: str
