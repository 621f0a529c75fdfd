"""A fleet's frame lists, known without reading a frame, and made readable one vehicle at a time.

Each data source (``fedseg.data.DATA_SOURCES``) describes its fleet as a :class:`FleetFrames`:

* :class:`ListedFleet`: a user's CARLA-format folder, listed (never opened) and split up front;
* :class:`LazySyntheticFleet`: the embedded synthetic fleet. Its frame paths, and with
  ``partition=vehicle`` its partition sizes, follow from the config alone; a frame is rendered into
  the on-disk cache when a process first needs it (:meth:`FleetFrames.ready`), so a vehicle costs
  nothing until it is sampled and start-up does not grow with the fleet. ``partition=iid`` and
  ``dirichlet`` pool every vehicle's frames, so they name (but still do not render) the whole
  fleet's frames in every process that asks for one share.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fedseg.data.carla import Fleet
from fedseg.data.frames import Frame
from fedseg.data.partition import partition_frames
from fedseg.data.synthetic import SyntheticFleet, vehicle_folder
from fedseg.errors import DataError


class FleetFrames(Protocol):
    """Which frames each vehicle and the server's held-out set hold; nothing is read to say so."""

    @property
    def num_clients(self) -> int:
        """How many vehicles the fleet has."""
        ...

    def client(self, index: int) -> list[Frame]:
        """Vehicle ``index``'s frames (0 <= index < ``num_clients``)."""
        ...

    def heldout(self) -> list[Frame]:
        """The server's held-out evaluation frames."""
        ...

    def sizes(self) -> list[int] | None:
        """Every vehicle's frame count, or ``None`` where this process cannot know them."""
        ...

    def ready(self, frames: Sequence[Frame], *, progress: bool = False) -> None:
        """Make ``frames`` readable on disk (synthetic: render those not cached yet)."""
        ...


@dataclass(frozen=True)
class ListedFleet:
    """A CARLA-format folder, listed and split; ``fleet.clients`` is empty when it holds only a
    held-out split (a server's data root may)."""

    root: Path
    fleet: Fleet
    num_clients: int

    def client(self, index: int) -> list[Frame]:
        if not self.fleet.clients:
            raise DataError(f"{self.root}: only a held-out folder here; no vehicle's frames")
        return self.fleet.clients[index]

    def heldout(self) -> list[Frame]:
        return self.fleet.heldout

    def sizes(self) -> list[int] | None:
        return [len(frames) for frames in self.fleet.clients] or None

    def ready(self, frames: Sequence[Frame], *, progress: bool = False) -> None:
        """Nothing to do: the user's files are there (``validate`` checks them)."""


@dataclass(frozen=True)
class LazySyntheticFleet:
    """The synthetic fleet of ``num_clients`` vehicles over the on-disk cache ``frames``.

    Vehicle ``i``'s frames are ``frames.vehicle(i)`` whatever the fleet size; the held-out set
    cycles through the fleet's towns, so it is stored per fleet size (``heldout_<n>``).
    """

    frames: SyntheticFleet
    num_clients: int
    heldout_frames: int
    partition: str = "vehicle"
    alpha: float = 0.5
    seed: int = 0

    def client(self, index: int) -> list[Frame]:
        if self.partition == "vehicle":
            if not 0 <= index < self.num_clients:
                raise IndexError(f"vehicle {index} outside 0..{self.num_clients - 1}")
            return list(self.frames.vehicle(index))
        return self._pooled[index]

    def heldout(self) -> list[Frame]:
        return list(self.frames.heldout(self.num_clients, self.heldout_frames, folder=f"heldout_{self.num_clients}"))

    def sizes(self) -> list[int] | None:
        if self.partition == "vehicle":  # from the config: no frame is named, let alone rendered
            return [self.frames.frames_per_vehicle] * self.num_clients
        return [len(frames) for frames in self._pooled]

    def ready(self, frames: Sequence[Frame], *, progress: bool = False) -> None:
        self.frames.render_missing(frames, progress=progress)

    @functools.cached_property
    def _pooled(self) -> list[list[Frame]]:
        """``iid``/``dirichlet``: every vehicle's frames (names only) split like a folder's would be."""
        sources: dict[str, list[Frame]] = {vehicle_folder(v): list(self.frames.vehicle(v))
                                           for v in range(self.num_clients)}
        return partition_frames(sources, self.num_clients, self.partition, alpha=self.alpha, seed=self.seed)
