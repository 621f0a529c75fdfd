"""A grid around Flower's that meters what each protocol stage carries.

:class:`MeteredGrid` wraps the ``Grid`` a ServerApp gets and counts the payload of every message
each way (array bytes plus the protobuf size of config and metric records: what a deployment puts
on the wire, without transport framing), per SecAgg+ stage and per vehicle.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import (
    config_record_to_proto,
    metric_record_to_proto,
)
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedseg.packing import pack_content, unpack_content

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


class GridWrapper(Grid):
    """A grid that delegates every call to ``inner``; wrappers override only what they change."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

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
        return self.inner.send_and_receive(messages, timeout=timeout)

    @property
    def innermost(self) -> Grid:
        """The grid at the bottom of the wrappers (Flower's, or the in-process ``LoopbackGrid``)."""
        inner = self.inner
        return inner.innermost if isinstance(inner, GridWrapper) else inner


class PackingGrid(GridWrapper):
    """Sends each message's arrays packed into one (:mod:`fedseg.packing`) and unpacks the replies: the
    wire carries a few objects where it carried one per array; everything above sees the arrays."""

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(self._packed(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._unpacked(self.inner.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self._unpacked(self.inner.send_and_receive(self._packed(messages), timeout=timeout))

    @staticmethod
    def _packed(messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for msg in messages:
            if msg.has_content():
                msg.content = pack_content(msg.content)
        return messages

    @staticmethod
    def _unpacked(replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        for reply in replies:
            if reply.has_content():
                reply.content = unpack_content(reply.content)
        return replies


class PollingGrid(GridWrapper):
    """``send_and_receive`` through the grid's own ``push_messages`` and ``pull_messages``, looking for
    replies every ``interval`` seconds in both engines.

    Flower 1.42's grids wait between looks 0.1 s in the Simulation Engine (``InMemoryGrid``) and 3 s
    on the Deployment Engine (``superlink/grid/http_grid.py``, no setting), so a deployed round (four
    messages under SecAgg+) waited up to 3 s a message longer than a simulated one. Looking asks the
    SuperLink on its own host: 10 looks a second cost it little.
    """

    def __init__(self, inner: Grid, interval: float = 0.1) -> None:
        super().__init__(inner)
        self.interval = interval

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        if getattr(self.innermost, "answers_on_push", False):  # in-process: its own send_and_receive
            return self.inner.send_and_receive(messages, timeout=timeout)
        pending = set(self.inner.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            pulled = list(self.inner.pull_messages(pending))
            replies.extend(pulled)
            pending -= {m.metadata.reply_to_message_id for m in pulled}
            if pending:
                time.sleep(self.interval)
        return replies


class MeteredGrid(GridWrapper):
    """Delegates to ``inner`` and records the traffic of every ``send_and_receive``, keyed by stage."""

    def __init__(self, inner: Grid) -> None:
        super().__init__(inner)
        self.stages: dict[str, StageTraffic] = {}

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


class TimeoutGrid(MeteredGrid):
    """A grid whose ``send_and_receive`` waits at most ``timeout`` seconds unless the caller says otherwise.

    Flower's default fit workflow calls ``send_and_receive`` without a timeout (it would wait forever
    for a vehicle that hangs); a vehicle that has not answered by then counts as failed.
    """

    def __init__(self, inner: Grid, timeout: float | None) -> None:
        super().__init__(inner)
        self.timeout = timeout

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return super().send_and_receive(messages, timeout=self.timeout if timeout is None else timeout)
