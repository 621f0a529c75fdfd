"""Grids around Flower's: one that meters what each protocol stage carries, one that runs a fleet in-process.

:class:`MeteredGrid` wraps the ``Grid`` a ServerApp gets and counts the payload of every message
each way (array bytes plus the protobuf size of config and metric records: what a deployment puts
on the wire, without transport framing), per SecAgg+ stage and per vehicle.

:class:`LoopbackGrid` is a whole fleet in this process, for tests and benchmarks: every message is
copied through protobuf, as the wire would, and handed to the ``ClientApp`` with that vehicle's own
``Context``. No Ray, so a SecAgg+ round with a handful of tiny vehicles takes milliseconds and a test
can make a vehicle vanish at a chosen stage of a chosen round.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import (
    config_record_to_proto,
    metric_record_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")


def content_bytes(content: RecordDict) -> int:
    """Payload of a message: serialized array bytes plus the protobuf size of its other records."""
    arrays = sum(len(a.data) for record in content.array_records.values() for a in record.values())
    configs = sum(config_record_to_proto(r).ByteSize() for r in content.config_records.values())
    metrics = sum(metric_record_to_proto(r).ByteSize() for r in content.metric_records.values())
    return arrays + configs + metrics


def stage_of(msg: Message) -> str:
    """The SecAgg+ stage a server message opens, else its message type (``train``, ``evaluate``)."""
    if msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records:
        return str(msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, msg.metadata.message_type))
    return msg.metadata.message_type


@dataclass
class StageTraffic:
    """What one ``send_and_receive`` call carried."""

    sent: int = 0
    replied: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    errors: list[str] = field(default_factory=list)
    up_by_node: dict[int, int] = field(default_factory=lambda: defaultdict(int))


class MeteredGrid(Grid):
    """Delegates to ``inner`` and records the traffic of every ``send_and_receive``, keyed by stage."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner
        self.stages: dict[str, StageTraffic] = {}

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        traffic = self.stages.setdefault(stage_of(messages[0]) if messages else "none", StageTraffic())
        traffic.sent += len(messages)
        traffic.bytes_down += sum(content_bytes(m.content) for m in messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error():
                traffic.errors.append(str(reply.error.reason))
                continue
            size = content_bytes(reply.content)
            traffic.replied += 1
            traffic.bytes_up += size
            traffic.up_by_node[reply.metadata.src_node_id] += size
        return replies

    @property
    def bytes_up(self) -> int:
        return sum(t.bytes_up for t in self.stages.values())

    @property
    def bytes_down(self) -> int:
        return sum(t.bytes_down for t in self.stages.values())

    def sent(self, stage: str) -> int:
        return self.stages[stage].sent if stage in self.stages else 0

    def replied(self, stage: str) -> int:
        return self.stages[stage].replied if stage in self.stages else 0

    def errors(self) -> list[str]:
        return [e for t in self.stages.values() for e in t.errors]

    def last_stage(self) -> str:
        return next(reversed(self.stages), "none")

    def up_by_node(self) -> dict[int, int]:
        """Bytes each vehicle sent over all stages."""
        total: dict[int, int] = defaultdict(int)
        for traffic in self.stages.values():
            for node, size in traffic.up_by_node.items():
                total[node] += size
        return dict(total)

    def stage_summary(self) -> dict[str, dict[str, int]]:
        return {name: {"sent": t.sent, "replied": t.replied, "up": t.bytes_up, "down": t.bytes_down}
                for name, t in self.stages.items()}


class LoopbackGrid(Grid):
    """Vehicles ``contexts`` (node id -> Context) served by ``app`` in this process, one message at a time.

    ``vanish(node, round, stage)`` makes a vehicle stop answering from that stage of that round on
    (as one that drives out of coverage; the server sees no reply, as after a timeout); it answers
    again from the next round. ``received`` keeps every reply that reached the server, for tests.
    """

    def __init__(self, app: ClientApp, contexts: Mapping[int, Context], run_id: int = 1) -> None:
        self.app = app
        self.contexts = dict(contexts)
        self._run = Run.create_empty(run_id)
        # Server messages take their run and sender from the process' task identity, which Flower's
        # runtimes set; this grid is the runtime here (as Flower's legacy run_simulation does).
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
        self._replies: dict[str, Message] = {}
        self._vanish: dict[tuple[int, int], str] = {}
        self.received: list[Message] = []
        self.client_s = 0.0  # wall seconds inside the vehicles' ClientApps
        self.transport_s = 0.0  # wall seconds copying messages through protobuf (the wire's share)

    def vanish(self, node_id: int, server_round: int, stage: str) -> None:
        self._vanish[(node_id, server_round)] = stage

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            ids.append(uuid.uuid4().hex)
            if not self._gone(msg):
                self._replies[ids[-1]] = self._deliver(msg)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = [self._replies.pop(i) for i in message_ids if i in self._replies]
        self.received.extend(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))

    def _gone(self, msg: Message) -> bool:
        """Has this vehicle vanished by the stage ``msg`` opens?"""
        node, stage = msg.metadata.dst_node_id, stage_of(msg)
        server_round = int(msg.metadata.group_id or 0)
        first = self._vanish.get((node, server_round))
        return first is not None and stage in STAGES and STAGES.index(stage) >= STAGES.index(first)

    def _deliver(self, msg: Message) -> Message:
        """Copy ``msg`` as the wire would, run the vehicle's ClientApp, copy the reply back."""
        start = time.perf_counter()
        delivered = Message(_copy(msg.content), msg.metadata.dst_node_id, msg.metadata.message_type,
                            group_id=msg.metadata.group_id)
        delivered.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what a SuperLink assigns
        copied = time.perf_counter()
        self.transport_s += copied - start
        try:
            reply = self.app(delivered, self.contexts[msg.metadata.dst_node_id])
        except Exception as ex:  # noqa: BLE001  (as Flower's simulation: the server gets an error reply)
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(ex)}:<'{ex}'>"),
                           reply_to=delivered)
        finally:
            self.client_s += time.perf_counter() - copied
        copied = time.perf_counter()
        if reply.has_content():
            reply.content = _copy(reply.content)
        self.transport_s += time.perf_counter() - copied
        return reply


def _copy(content: RecordDict) -> RecordDict:
    return recorddict_from_proto(recorddict_to_proto(content))
