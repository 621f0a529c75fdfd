"""A whole fleet in this process, for tests and benchmarks: :class:`LoopbackGrid`.

Every message is copied through protobuf, as the wire would, and handed to the ``ClientApp`` with
that vehicle's own ``Context``. No Ray, so a SecAgg+ round with a handful of tiny vehicles takes
milliseconds and a test can make a vehicle vanish at a chosen stage of a chosen round. Not used by
any production path (the Simulation and Deployment Engines carry real runs).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedseg.server.grids import STAGES, stage_of


class LoopbackGrid(Grid):
    """Vehicles ``contexts`` (node id -> Context) served by ``app`` in this process, one message at a time.

    ``vanish(node, round, stage)`` makes a vehicle stop answering from that stage of that round on
    (as one that drives out of coverage; the server sees no reply, as after a timeout); it answers
    again from the next round. ``received`` keeps every reply that reached the server, for tests.
    """

    # Pushed messages are answered at once, a vanished vehicle's never: send_and_receive returns what came,
    # as after a timeout (fedseg.server.grids.PollingGrid leaves the waiting to it).
    answers_on_push = True

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
