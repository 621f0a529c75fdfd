"""A virtual fleet on a bounded pool of simulation nodes: how a message names its vehicle, which node
carries which vehicle in a round, and where a vehicle's state waits between its rounds.

Flower 1.42's simulation driver looks at every virtual node every 0.1 s (``vce_api``: one
``get_message_ins`` per node, each scanning the pending messages), so a round with one node per vehicle
costs nodes x messages: 7.7x at 10,000 vehicles against 10, with 10 sampled each. ``fedseg-sim`` therefore
starts ``federation.sim_nodes`` nodes (by default as many as a round samples) when that is fewer than the
fleet; the server samples vehicle ids from the whole fleet, as Flower samples nodes, and
:class:`NodeAssignment` gives each of a round's vehicles a node of its own. The message names the
vehicle (:data:`VEHICLE_RECORD`); the node trains that vehicle with its frames and its state, which
:class:`VehicleStore` keeps on disk, one file per vehicle that has trained, so memory follows the pool
and the round, not the fleet. The Deployment Engine never does this: there a vehicle is a real node.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto

VEHICLE_RECORD = "fedseg.vehicle"  # config record of a pooled message: the vehicle the node trains
VEHICLE_KEY = "vehicle-id"  # its key: the vehicle's number (its partition id)


class PoolTooSmall(ValueError):
    """A round sampled more vehicles than there are simulation nodes."""


class NodeAssignment:
    """Which simulation node carries which vehicle, one round (Flower's message group) at a time.

    A round's ``k``-th new vehicle gets the ``k``-th node (node ids sorted), so no node hosts two
    vehicles in one round: SecAgg+'s per-round protocol state stays in the node's own context. The
    previous round's map is kept for its late replies.
    """

    def __init__(self) -> None:
        self.group: str | None = None
        self.nodes: list[int] = []
        self.to_node: dict[int, int] = {}
        self.to_vehicle: dict[str, dict[int, int]] = {}  # group -> node -> vehicle

    def node_for(self, vehicle: int, group: str, nodes: list[int] | None = None) -> int:
        """The node carrying ``vehicle`` in round ``group``; ``nodes`` (the pool) is read at a new round."""
        if group != self.group:
            if nodes is None:
                raise ValueError("a new round needs the pool's node ids")
            last = {self.group: self.to_vehicle[self.group]} if self.group is not None else {}
            self.group, self.nodes, self.to_node, self.to_vehicle = group, sorted(nodes), {}, {**last, group: {}}
        node = self.to_node.get(vehicle)
        if node is None:
            if len(self.to_node) >= len(self.nodes):
                raise PoolTooSmall(f"round {group} samples more than the {len(self.nodes)} simulation nodes "
                                   "(federation.sim_nodes): set it to at least the vehicles a round samples")
            node = self.to_node[vehicle] = self.nodes[len(self.to_node)]
            self.to_vehicle[group][node] = vehicle
        return node

    def vehicle_of(self, node: int, group: str) -> int | None:
        """The vehicle ``node`` carried in round ``group``, if it carried one."""
        return self.to_vehicle.get(group, {}).get(node)

    def needs_nodes(self, group: str) -> bool:
        """Whether round ``group`` is new (:meth:`node_for` then needs the pool's node ids)."""
        return group != self.group


class VehicleStore:
    """Each vehicle's own records (its ``context.state`` between its rounds), one file per vehicle.

    ``<folder>/vehicle_<id>.pb``: Flower's protobuf of a ``RecordDict``, written atomically (a crash
    leaves the previous file), so a vehicle sampled again, or a resumed run, goes on from its last round.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, vehicle: int) -> Path:
        return self.folder / f"vehicle_{vehicle}.pb"

    def load(self, vehicle: int) -> RecordDict:
        """The vehicle's records; empty before its first round."""
        path = self.path(vehicle)
        if not path.is_file():
            return RecordDict()
        proto = RecordDictProto()
        proto.ParseFromString(path.read_bytes())
        return recorddict_from_proto(proto)

    def save(self, vehicle: int, records: RecordDict) -> None:
        """Replace the vehicle's file with ``records``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(vehicle)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(recorddict_to_proto(records).SerializeToString())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
