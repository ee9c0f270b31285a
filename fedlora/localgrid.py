"""An in-process Flower Grid: runs the real ServerApp and ClientApp functions with every message round-
tripped through Flower's wire encoding, but without ray or sockets. Used by fast end-to-end tests and by
``fedlora run --engine inprocess`` for debugging. Relies on flwr internals: flwr is pinned to 1.42.0.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


def roundtrip(msg: Message) -> tuple[Message, int]:
    """A wire-faithful copy of ``msg`` and its serialised size in bytes."""
    contents = {oid: o.deflate() for oid, o in get_all_nested_objects(msg).items()}
    size = sum(map(len, contents.values()))  # before inflating: inflation pops entries
    return inflate_object_from_contents(msg.object_id, contents), size


class LocalGrid(Grid):
    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict | None = None,
                 fail_nodes: Iterable[int] = ()) -> None:
        TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
        self.client_app = client_app
        self._run = Run.create_empty(run_id=1)
        self.contexts = {
            1000 + i: Context(run_id=1, node_id=1000 + i, node_config={"partition-id": i, "num-partitions": num_nodes},
                              state=RecordDict(), run_config=dict(run_config or {}))
            for i in range(num_nodes)
        }
        self.fail_nodes = set(fail_nodes)
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
            self.bytes_down += n
            self.sent.append(wire)
            node = m.metadata.dst_node_id
            try:
                if node in self.fail_nodes:
                    raise RuntimeError(f"simulated failure of node {node}")
                reply = self.client_app(wire, self.contexts[node])
            except Exception as e:  # the real runtime turns client exceptions into error replies too
                reply = Message(Error(code=0, reason=repr(e)), reply_to=wire)
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            reply, n = roundtrip(reply)
            self.bytes_up += n
            self.replies.append(reply)
            self._pending[m.metadata.message_id] = reply
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._pending.pop(i) for i in message_ids if i in self._pending]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))
