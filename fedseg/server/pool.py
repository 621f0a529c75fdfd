"""The server's half of a pooled fleet (:mod:`fedseg.vehicle_pool`): Flower's workflow addresses vehicles,
the grid below addresses the simulation nodes that carry them.

:class:`VehicleGrid` tells Flower's client manager that the fleet's vehicles ``0..n-1`` are its nodes, so
the strategy samples vehicles from the whole fleet with Flower's own rules (FedAvg's count, central DP's
``m`` of ``n`` without replacement); every message to a vehicle goes to the node the round gave it and
names the vehicle, and every reply comes back as the vehicle's. Everything above (strategy chain,
recorder, SecAgg+ workflow, the metered grid) sees vehicle ids where it saw node ids.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, Metadata, RecordDict
from flwr.app.message import make_message
from flwr.serverapp import Grid

from fedseg.errors import RunFailed
from fedseg.server.grids import GridWrapper
from fedseg.vehicle_pool import VEHICLE_KEY, VEHICLE_RECORD, NodeAssignment, PoolTooSmall


class VehicleGrid(GridWrapper):
    """``vehicles`` virtual vehicles over the simulation nodes of ``inner`` (see the module docstring)."""

    def __init__(self, inner: Grid, vehicles: int) -> None:
        super().__init__(inner)
        self.vehicles = vehicles
        self.assignment = NodeAssignment()

    def get_node_ids(self) -> Iterable[int]:
        return range(self.vehicles)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(self._to_nodes(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._as_vehicle(m) for m in self.inner.pull_messages(message_ids)]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        replies = self.inner.send_and_receive(self._to_nodes(messages), timeout=timeout)
        return [self._as_vehicle(m) for m in replies]

    def _to_nodes(self, messages: Iterable[Message]) -> list[Message]:
        """Each message (Flower's workflows address it to a vehicle) readdressed to the node carrying that
        vehicle this round, and naming the vehicle."""
        messages = list(messages)
        for msg in messages:
            vehicle, group = msg.metadata.dst_node_id, msg.metadata.group_id
            if not 0 <= vehicle < self.vehicles:
                raise ValueError(f"vehicle {vehicle} outside the fleet 0..{self.vehicles - 1}")
            pool = list(self.inner.get_node_ids()) if self.assignment.needs_nodes(group) else None
            try:
                msg.metadata.dst_node_id = self.assignment.node_for(vehicle, group, pool)
            except PoolTooSmall as err:
                raise RunFailed(str(err)) from None
            named = RecordDict(dict(msg.content.items()))  # a copy: SecAgg+ hands all its messages one content
            named[VEHICLE_RECORD] = ConfigRecord({VEHICLE_KEY: vehicle})
            msg.content = named
        return messages

    def _as_vehicle(self, reply: Message) -> Message:
        """``reply`` as its vehicle's: the same message with the vehicle's id as its source."""
        md = reply.metadata
        vehicle = self.assignment.vehicle_of(md.src_node_id, md.group_id)
        if vehicle is None:  # not a node of this or the last round: left as it came (the workflow drops it)
            return reply
        metadata = Metadata(run_id=md.run_id, message_id=md.message_id, src_node_id=vehicle,
                            dst_node_id=md.dst_node_id, reply_to_message_id=md.reply_to_message_id,
                            group_id=md.group_id, created_at=md.created_at, ttl=md.ttl,
                            message_type=md.message_type)
        if reply.has_error():
            return make_message(metadata, error=reply.error)
        return make_message(metadata, content=reply.content)
