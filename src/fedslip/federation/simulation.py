"""The in-process engine: one frozen backbone, N virtual clients, payloads serialized both ways.

Each client's own state (private adapters, masks, local head, optimizer state) lives in a `ClientState`
and is swapped into the shared model by loading tensors. Every payload goes through `encode`/`decode`,
exactly as it would over a network, and the ledger records the encoded length. Randomness comes from the
root seed through `seeding`: client selection, batch order and dropout for (client, round) do not depend
on which other clients ran before, so the same config gives the same numbers.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fedslip.evaluation.metrics import group_accuracy, summarize
from fedslip.evaluation.records import ClientRecord, MethodResult, RoundRecord
from fedslip.federation.ledger import Ledger
from fedslip.federation.payload import decode, encode
from fedslip.methods.base import ClientData, Method, mean
from fedslip.prepare import Prepared
from fedslip.progress import NullProgress
from fedslip.seeding import derive, numpy_gen, torch_gen


def select_clients(n_clients: int, fraction: float, seed: int, rnd: int) -> list[int]:
    m = max(1, round(fraction * n_clients))
    if m >= n_clients:
        return list(range(n_clients))
    return sorted(int(c) for c in numpy_gen(seed, "select", rnd).choice(n_clients, m, replace=False))


class Simulation:
    def __init__(self, prep: Prepared, method: Method, progress=None):
        self.prep, self.method = prep, method
        self.cfg = method.cfg
        self.seed = self.cfg.train.seed
        self.progress = progress or NullProgress()
        self.model = method.build(prep.backbone)
        self.ledger = Ledger(method.name)
        self.n_clients = len(prep.split.train)
        self.glob = method.init_global(self.model, torch_gen(self.seed, "global"))
        self.clients = [method.init_client(self.model, k, torch_gen(self.seed, "client", k))
                        for k in range(self.n_clients)]

    def client_data(self, cid: int, rnd: int) -> ClientData:
        return ClientData(cid, self.prep.train, self.prep.split.train[cid], self.cfg.train.batch_size,
                          numpy_gen(self.seed, "batches", cid, rnd))

    def run_round(self, rnd: int) -> RoundRecord:
        t, method = self.cfg.train, self.method
        selected = select_clients(self.n_clients, t.client_fraction, self.seed, rnd)
        ups, losses = [], []
        bar = self.progress.task(f"round {rnd} clients", len(selected))
        for cid in selected:
            down = method.down_payload(self.glob, cid)
            blob = encode(down)
            self.ledger.record(rnd, cid, "down", down, len(blob))
            torch.manual_seed(derive(self.seed, "dropout", cid, rnd))
            data = self.client_data(cid, rnd)
            up, self.clients[cid], metrics = method.local_update(self.model, decode(blob), self.clients[cid], data, rnd)
            blob = encode(up)
            self.ledger.record(rnd, cid, "up", up, len(blob))
            ups.append((decode(blob), len(data)))
            losses.append(metrics["loss"])
            bar.advance()
        bar.done()
        if method.communicates:
            self.glob = method.aggregate(ups, self.glob, rnd)
        previous = sum(self.ledger.mib_round(r) for r in range(1, rnd))
        mib = self.ledger.mib_round(rnd)
        return RoundRecord(round=rnd, train_loss=mean(losses), mib_round=mib, mib_cumulative=previous + mib)

    def evaluate(self, record: RoundRecord) -> None:
        prep, method, model = self.prep, self.method, self.model
        bs = self.cfg.train.eval_batch_size
        tests = prep.split.test
        views = [method.global_view(model, self.glob, c) for c in self.clients]
        if views[0] is None:
            record.global_acc, record.client_acc = None, None
        elif method.head == "local":  # one global model per client head
            per = [group_accuracy(model, v, "global", prep.test, [prep.split.global_test, tests[k]], bs)
                   for k, v in enumerate(views)]
            record.global_acc = float(np.mean([p[0] for p in per]))
            record.client_acc = [p[1] for p in per]
        else:
            accs = group_accuracy(model, views[0], "global", prep.test, [prep.split.global_test, *tests], bs)
            record.global_acc, record.client_acc = accs[0], accs[1:]
        if method.personalizes:
            record.personal_acc = [
                group_accuracy(model, method.personal_view(model, self.glob, c), "both", prep.test, [tests[k]], bs)[0]
                for k, c in enumerate(self.clients)]
        else:
            record.personal_acc = record.client_acc
        record.evaluated = True

    def kstep(self) -> list[float | None]:
        if not (hasattr(self.method, "kstep_view") and self.cfg.method.kstep):
            return [None] * self.n_clients
        out = []
        for k, client in enumerate(self.clients):
            torch.manual_seed(derive(self.seed, "kstep-dropout", k))
            data = self.client_data(k, 0)
            view = self.method.kstep_view(self.model, self.glob, client, data)
            out.append(group_accuracy(self.model, view, "global", self.prep.test, [self.prep.split.test[k]],
                                      self.cfg.train.eval_batch_size)[0])
        return out

    def run(self) -> tuple[MethodResult, Ledger]:
        start = time.perf_counter()
        result = MethodResult(method=self.method.name)
        rounds = self.method.rounds()
        bar = self.progress.task(f"{self.method.name}: rounds", rounds)
        for rnd in range(1, rounds + 1):
            record = self.run_round(rnd)
            if rnd % self.cfg.train.eval_every == 0 or rnd == rounds:
                self.evaluate(record)
            result.rounds.append(record)
            bar.advance(record)
        bar.done()
        last = result.rounds[-1]
        kstep = self.kstep()
        for k in range(self.n_clients):
            info = self.prep.clients[k]
            result.clients.append(ClientRecord(
                client=k, n_train=len(self.prep.split.train[k]), n_test=len(self.prep.split.test[k]),
                dominant_label=info["dominant_label"],
                client_acc=last.client_acc[k] if last.client_acc else None,
                personal_acc=last.personal_acc[k] if last.personal_acc else None,
                kstep_acc=kstep[k]))
        result.wall_time_s = time.perf_counter() - start
        result.final = summarize(result, self.ledger.total_mib(), self.ledger.up_params())
        return result, self.ledger
