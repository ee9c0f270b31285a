"""An in-process Flower Grid: runs the real ServerApp and ClientApp functions with every message round-
tripped through Flower's wire encoding, but without ray or sockets. Used by fast end-to-end tests and by
``fedlora run --engine inprocess`` for debugging. Relies on flwr internals: flwr is pinned to 1.42.0.

Faults can be injected as they happen in a deployment: a node whose ClientApp raises (an error reply), a
node that never answers (``silent_nodes``, or a ClientApp raising :class:`NodeVanished` mid-round: no reply,
the server's round-timeout expires), and a node the SuperLink reports as gone (``unavailable_nodes``: an
error reply that comes from the SuperLink, not from the node, as flwr's link state makes it).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


class NodeVanished(Exception):  # noqa: N818 (an event, not an error of the grid)
    """Raised by a ClientApp under test to disappear mid-round: the grid sends no reply at all."""


def roundtrip(msg: Message) -> tuple[Message, int]:
    """A wire-faithful copy of ``msg`` and its serialised size in bytes."""
    contents = {oid: o.deflate() for oid, o in get_all_nested_objects(msg).items()}
    size = sum(map(len, contents.values()))  # before inflating: inflation pops entries
    return inflate_object_from_contents(msg.object_id, contents), size


class LocalGrid(Grid):
    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict | None = None,
                 fail_nodes: Iterable[int] = (), silent_nodes: Iterable[int] = (),
                 unavailable_nodes: Iterable[int] = ()) -> None:
        TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
        self.client_app = client_app
        self._run = Run.create_empty(run_id=1)
        self.contexts = {
            1000 + i: Context(run_id=1, node_id=1000 + i, node_config={"partition-id": i, "num-partitions": num_nodes},
                              state=RecordDict(), run_config=dict(run_config or {}))
            for i in range(num_nodes)
        }
        self.fail_nodes = set(fail_nodes)
        self.silent_nodes = set(silent_nodes)
        self.unavailable_nodes = set(unavailable_nodes)
        self.timeouts: list[float | None] = []  # the timeout of every send_and_receive call
        self.bytes_down = self.bytes_up = 0
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self._pending: dict[str, Message] = {}

    def set_run(self, run_id: int) -> None:  # noqa: ARG002 (fixed run)
        pass

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            wire, n = roundtrip(m)
            wire.metadata.__dict__["_message_id"] = m.metadata.message_id  # as the SuperLink delivers it
            self.bytes_down += n
            self.sent.append(wire)
            node = m.metadata.dst_node_id
            ids.append(m.metadata.message_id)
            if node in self.unavailable_nodes:
                reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=f"node {node} missed its heartbeats"),
                                reply_to=wire)
                reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            else:
                try:
                    if node in self.fail_nodes:
                        raise RuntimeError(f"simulated failure of node {node}")
                    if node in self.silent_nodes:
                        raise NodeVanished
                    reply = self.client_app(wire, self.contexts[node])
                except NodeVanished:
                    continue  # no reply: the server waits until its timeout and goes on without it
                except Exception as e:  # the real runtime turns client exceptions into error replies too
                    reply = Message(Error(code=0, reason=repr(e)), reply_to=wire)
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            reply, n = roundtrip(reply)
            self.bytes_up += n
            self.replies.append(reply)
            self._pending[m.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._pending.pop(i) for i in message_ids if i in self._pending]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Every reply there will ever be is ready at once, so ``timeout`` only has to be recorded."""
        self.timeouts.append(timeout)
        return self.pull_messages(self.push_messages(messages))
