"""A Flower `Grid` in one process: N virtual SuperNodes running the real ClientApp, no Ray, no network.

Every message is deflated into Flower's wire objects and inflated again on the other side (exactly what
SuperLink and SuperNode exchange), each node has its own `Context` (node config, `Context.state`), and
a ClientApp exception becomes an error reply as on a real SuperNode. Used by the tests and by
`fedslip flower --runtime local` for debugging an app without starting anything.

Nodes can be killed (`kill`: still listed as connected, as on a SuperLink before the node's heartbeat
expires, but never answering) and replaced by a fresh node for the same partition (`restart`: new node
id, empty `Context.state`, same node config, so the same state folder; the old node disappears).
`drops(partition, round)` makes a node ignore that round's train message (a transient failure), and
`alter(partition, message, reply) -> reply` changes a reply before it crosses the wire (tests craft bad
uploads with it).
"""

from __future__ import annotations

import random
import traceback
import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


def ensure_task_identity(run_id: int = 1) -> None:
    """Message constructors read the process's task identity; set one where no Flower runtime did."""
    for attr, value in (("run_id", run_id), ("node_id", 1), ("task_id", 1)):
        try:
            getattr(TaskIdentity, attr)
        except RuntimeError:
            setattr(TaskIdentity, attr, value)


def over_the_wire(msg: Message) -> Message:
    """The message as the receiver inflates it from Flower's serialized objects (message id kept)."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    copy = inflate_object_from_contents(msg.object_id, contents)
    copy.metadata.__dict__["_message_id"] = msg.metadata.message_id
    return copy


class LocalGrid(Grid):
    def __init__(self, client_app, node_configs: list[dict], run_config: dict, run_id: int = 1, seed: int = 0,
                 drops=None, alter=None, late=None):
        ensure_task_identity(run_id)
        self.drops, self.alter, self.late = drops, alter, late
        self.client_app, self.run_config, self.run_id = client_app, dict(run_config), run_id
        self._run = Run.create_empty(run_id)
        self._rng = random.Random(seed)
        self.contexts: dict[int, Context] = {}
        for cfg in node_configs:
            self._add(cfg)
        self.offline: set[int] = set()  # gone: not listed
        self.silent: set[int] = set()  # killed: listed, never answering
        self._replies: dict[str, Message] = {}
        self.delivered: list[tuple[Message, Message]] = []  # (instruction, reply) as they crossed the "wire"

    def _add(self, node_config: dict) -> int:
        node_id = self._rng.getrandbits(62) + 2  # Flower node ids are random; 1 is the SuperLink
        self.contexts[node_id] = Context(run_id=self.run_id, node_id=node_id, node_config=dict(node_config),
                                         state=RecordDict(), run_config=dict(self.run_config))
        return node_id

    def node_of(self, partition: int) -> int:
        return next(n for n, c in self.contexts.items()
                    if int(c.node_config.get("partition-id", -1)) == partition and n not in self.offline)

    def kill(self, partition: int) -> int:
        node = self.node_of(partition)
        self.silent.add(node)
        return node

    def restart(self, partition: int) -> int:
        """A new process for `partition`: new node id and empty Context.state, same node config."""
        old = next(n for n, c in self.contexts.items() if int(c.node_config.get("partition-id", -1)) == partition)
        self.offline.add(old)
        return self._add(self.contexts[old].node_config)

    def _drops(self, msg: Message, node: int, which=None) -> bool:
        which = self.drops if which is None else which
        if which is None or msg.metadata.message_type != "train":
            return False
        partition = int(self.contexts[node].node_config.get("partition-id", -1))
        return bool(which(partition, int(msg.metadata.group_id)))

    # --- Grid -------------------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            if node in self.offline or node in self.silent or node not in self.contexts or self._drops(msg, node):
                continue  # never answered: the server's timeout handles it
            received = over_the_wire(msg)
            try:
                reply = self.client_app(received, self.contexts[node])
            except Exception as e:  # noqa: BLE001 - a ClientApp failure is an error reply on a real SuperNode
                reply = Message(Error(code=1, reason=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"),
                                reply_to=received)
            if self.alter is not None and not reply.has_error():
                reply = self.alter(int(self.contexts[node].node_config.get("partition-id", -1)), received, reply)
            if self.late is not None and self._drops(msg, node, self.late):
                continue  # the node trained, but its reply arrives after the server's timeout
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            arrived = over_the_wire(reply)
            self.delivered.append((received, arrived))
            self._replies[msg.metadata.message_id] = arrived
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

