"""What crosses the client/server boundary in one round, independent of the transport that carries it.

The round protocol (`protocol.py`) hands a transport `Request`s and gets back one `Reply` per request; the
in-process transport turns them into function calls on `ClientSide`, the Flower transport into Messages to
nodes. A transport moves these and measures bytes; it decides nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

Payload = dict[str, torch.Tensor]
TRAIN, EVALUATE = "train", "evaluate"


@dataclass
class EvalAsk:
    """Evaluate the model a client receives before doing anything else with it.

    `round`: the round whose global model this is (a train request carries the previous round's evaluation:
    its download is exactly that model). `global_test`: also score the balanced global test set.
    `kstep`: also K-step fine-tune and score (after the last round). `join`: a held-out client joining once
    after the last round: score the global model on its test set, then the method's `join_view` (instead of
    the usual evaluation)."""

    round: int
    global_test: bool = False
    kstep: bool = False
    join: bool = False


@dataclass
class Request:
    kind: str  # TRAIN or EVALUATE
    cid: int
    round: int
    payload: Payload
    evaluate: EvalAsk | None = None
    config: dict[str, Any] = field(default_factory=dict)  # e.g. a Flower strategy's proximal-mu


@dataclass
class Answer:
    """What a client's side returns for a request."""

    upload: Payload | None = None  # train requests only
    metrics: dict[str, float] = field(default_factory=dict)  # num-examples, loss, ...
    # client-acc, personal-acc, global-acc, kstep-acc, ...; personal-right/kstep-right: a string of 0/1 per test example
    evaluation: dict[str, float | str] | None = None


@dataclass
class Reply:
    """A request's outcome as the server sees it."""

    cid: int
    answer: Answer | None = None  # None: the client failed (no reply, or an error reply)
    error: str = ""  # why it failed, or why its upload could not be decoded
    delivered: bool = True  # False: the request never left the server (no node for the client)
    up_bytes: int = 0  # length of the upload in the project's encoding (the ledger's bytes)
    down_bytes: int | None = None  # the same for the download, where the transport encoded it anyway
    down_wire: int | None = None  # Flower's serialized bytes of the payload in and out (Flower only)
    up_wire: int | None = None
    raw: Any = None  # the transport's own reply object

    @property
    def ok(self) -> bool:
        return self.answer is not None and not self.error


class Transport(Protocol):
    def exchange(self, requests: list[Request], tick: Callable[[], None] = lambda: None) -> dict[int, Reply]:
        """Deliver every request and return a Reply for each (failed ones included), by client id; `tick`
        after each client's answer (progress)."""
        ...
