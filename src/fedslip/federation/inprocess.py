"""Transport 1, in-process: one frozen backbone shared by every virtual client, requests as function calls.

Each client's own state (private adapters, masks, local head, optimizer state) lives here, apart, and is
swapped into the shared model by loading tensors. Every payload is encoded and decoded both ways, exactly
as over a network, so the ledger's bytes are the bytes a network would carry.

Failures are simulated as in a real federation: `train.failure_rate` (seeded per client and round) and
`train.failures` ([round, client] pairs) make a client drop out of a round's training: it sends nothing
and keeps the state it had before the round. Evaluation-only requests always reach it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from fedslip.config import TrainConfig
from fedslip.errors import UserError
from fedslip.federation.client import ClientSide
from fedslip.federation.exchange import TRAIN, Reply, Request
from fedslip.federation.payload import decode, encode
from fedslip.federation.protocol import RoundProtocol
from fedslip.methods.base import ClientData, ClientState, Method
from fedslip.prepare import Prepared
from fedslip.seeding import numpy_gen

Tamper = Callable[[int, int, bytes], bytes]  # (client, round, upload bytes) -> what reaches the server


class Failures:
    """Which client drops out of which round: seeded by (client, round), independent of everything else."""

    def __init__(self, t: TrainConfig):
        self.rate, self.seed = t.failure_rate, t.seed
        self.scheduled = {(int(r), int(c)) for r, c in t.failures}

    def __call__(self, cid: int, rnd: int) -> bool:
        if (rnd, cid) in self.scheduled:
            return True
        return self.rate > 0 and numpy_gen(self.seed, "failure", cid, rnd).random() < self.rate


def check_failures(methods: list[Method]) -> None:
    """`train.failures` within the run: its last round is train.rounds or, where a method adds rounds (fedsb's
    setup round), that method's last; a method with fewer (local's one) simply has no such round. Checked
    once the methods are known, not by the config's validation."""
    last = max(m.rounds() for m in methods)
    late = [f for f in methods[0].cfg.train.failures if f[0] > max(last, methods[0].cfg.train.rounds)]
    if late:
        raise UserError(f"train.failures: round {late[0][0]} of {late[0]} is after the run's last round "
                        f"({max(last, methods[0].cfg.train.rounds)})")


class InProcessTransport:
    def __init__(self, side: ClientSide, n_clients: int, tamper: Tamper | None = None):
        self.side = side
        self.states: list[ClientState] = [side.fresh_state(k) for k in range(n_clients)]
        self.fails = Failures(side.cfg.train)
        self.tamper = tamper  # tests: a client's upload altered on its way to the server

    def exchange(self, requests: list[Request], tick: Callable[[], None] = lambda: None) -> dict[int, Reply]:
        replies = {}
        for req in requests:
            replies[req.cid] = self.deliver(req)
            tick()
        return replies

    def deliver(self, req: Request) -> Reply:
        if req.kind == TRAIN and self.fails(req.cid, req.round):
            return Reply(req.cid, error="simulated failure")
        down = encode(req.payload)
        received = replace(req, payload=decode(down))
        answer, self.states[req.cid] = self.side.handle(received, self.states[req.cid])
        if answer.upload is None:
            return Reply(req.cid, answer, down_bytes=len(down))
        blob = encode(answer.upload)
        if self.tamper is not None:
            blob = self.tamper(req.cid, req.round, blob)
        try:
            answer.upload = decode(blob)
        except UserError as e:
            return Reply(req.cid, answer, error=str(e), up_bytes=len(blob), down_bytes=len(down))
        return Reply(req.cid, answer, up_bytes=len(blob), down_bytes=len(down))


class Simulation(RoundProtocol):
    """The round protocol over the in-process transport: `Simulation(prep, method).run()`."""

    def __init__(self, prep: Prepared, method: Method, progress=None, tamper: Tamper | None = None):
        check_failures([method])
        model = method.build(prep.backbone)
        side = ClientSide(method.cfg, prep, method, model)
        super().__init__(prep, method, model, InProcessTransport(side, len(prep.split.train), tamper), progress)
        self.side = side

    @property
    def clients(self) -> list[ClientState]:
        return self.transport.states

    def client_data(self, cid: int, rnd: int) -> ClientData:
        return self.side.data(cid, rnd)
