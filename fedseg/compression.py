"""Update compression codecs: what a vehicle's update becomes on the wire.

One registry, ``CODECS``, mirrored one to one by ``conf/compression/*.yaml``. Today it holds only
``none``: updates travel as Flower's float32 NumPy arrays, and ``bytes_up``/``bytes_down`` in
``metrics.jsonl`` are those arrays' real serialized sizes. A codec added here declares whether the
server can still decode a SecAgg+ sum of its outputs (``secagg_compatible``); composition refuses
the others before training.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from fedseg.config import parse_choice


@dataclass(frozen=True)
class NoCompression:
    """``compression=none``: float32 arrays as Flower serializes them (the identity codec)."""

    name: ClassVar[str] = "none"
    secagg_compatible: ClassVar[bool] = True  # the identity: SecAgg+ sums what it would sum anyway


CompressionSpec = NoCompression
CODECS: dict[str, type[CompressionSpec]] = {"none": NoCompression}


def parse_compression(block: Mapping[str, Any] | None) -> CompressionSpec:
    """The ``compression`` block as its registry spec."""
    return parse_choice(CODECS, block, key="compression", default="none")
