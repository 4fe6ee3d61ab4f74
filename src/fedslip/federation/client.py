"""A client's side of every round, written once: both transports call `ClientSide.handle`.

Randomness comes from the root seed per (purpose, client, round), so a client's numbers do not depend on
which other clients ran before it, nor on the transport. A request that asks for an evaluation is
evaluated on the model as received, before the client trains on it.
"""

from __future__ import annotations

import torch

from fedslip.config import Config
from fedslip.evaluation.metrics import as_bits, group_accuracy, right_answers
from fedslip.federation.exchange import TRAIN, Answer, EvalAsk, Payload, Request
from fedslip.methods.base import ClientData, ClientState, Method
from fedslip.model.adapted import AdaptedModel
from fedslip.prepare import Prepared
from fedslip.seeding import client_gen, derive, numpy_gen


class ClientSide:
    def __init__(self, cfg: Config, prep: Prepared, method: Method, model: AdaptedModel):
        self.cfg, self.prep, self.method, self.model = cfg, prep, method, model
        self.seed = cfg.train.seed

    def fresh_state(self, cid: int) -> ClientState:
        return self.method.init_client(self.model, cid, client_gen(self.seed, cid))

    def data(self, cid: int, rnd: int) -> ClientData:
        return self._batched(cid, numpy_gen(self.seed, "batches", cid, rnd))

    def _batched(self, cid: int, gen) -> ClientData:
        return ClientData(cid, self.prep.train, self.prep.split.train[cid], self.cfg.train.batch_size, gen,
                          self.cfg.train.length_pool)

    def handle(self, req: Request, state: ClientState) -> tuple[Answer, ClientState]:
        """Evaluate what was received if asked, then train on it if it is a train request."""
        if "proximal-mu" in req.config:  # Flower's FedProx strategy: its μ replaces the method's own
            self.method.set_proximal_mu(float(req.config["proximal-mu"]))
        answer = Answer()
        if req.evaluate is not None:
            answer.evaluation = self.evaluate(req.cid, req.payload, state, req.evaluate)
        if req.kind == TRAIN:
            torch.manual_seed(derive(self.seed, "dropout", req.cid, req.round))
            data = self.data(req.cid, req.round)
            answer.upload, state, metrics = self.method.local_update(self.model, req.payload, state, data, req.round)
            if self.method.persistent:
                state.sent = {n: t.clone() for n, t in answer.upload.items()}
            answer.metrics = {"num-examples": len(data), **{k: float(v) for k, v in metrics.items()}}
        return answer, state

    def evaluate(self, cid: int, down: Payload, state: ClientState, ask: EvalAsk) -> dict[str, float | str]:
        """Accuracies by view; at the final evaluation (`ask.kstep`) with `train.eval_per_example`, also the
        personal and K-step views' right answers on the client's test set (`personal-right`, `kstep-right`)."""
        if ask.join:
            return self.join(cid, down, state)
        method, model, prep = self.method, self.model, self.prep
        bs = self.cfg.train.eval_batch_size
        own = prep.split.test[cid]
        out: dict[str, float | str] = {}
        bits = ask.kstep and self.cfg.train.eval_per_example

        def score(key: str, view, mode: str) -> None:
            right = right_answers(model, view, mode, prep.test, [own], bs)[0]
            out[f"{key}-acc"] = float(right.mean())
            if bits:
                out[f"{key}-right"] = as_bits(right)
        view = method.global_view(model, down, state)
        if view is not None:
            if ask.global_test and len(prep.split.global_test):
                out["global-acc"], out["client-acc"] = group_accuracy(
                    model, view, "global", prep.test, [prep.split.global_test, own], bs)
            else:
                out["client-acc"] = group_accuracy(model, view, "global", prep.test, [own], bs)[0]
        if method.personalizes:
            score("personal", method.personal_view(model, down, state), "both")
        persistent = method.persistent_view(model, down, state)
        if persistent is not None:
            out["persistent-acc"] = group_accuracy(model, persistent, "both", prep.test, [own], bs)[0]
        if ask.kstep and hasattr(method, "kstep_view") and self.cfg.method.kstep:
            torch.manual_seed(derive(self.seed, "kstep-dropout", cid))
            kview = method.kstep_view(model, down, state, self.data(cid, 0))
            score("kstep", kview, "global")
        return out

    def join(self, cid: int, down: Payload, state: ClientState) -> dict[str, float]:
        """A held-out client joins once, after the last round: the final global model on its own test set, then
        the method's `join_view` (its own seeds: batches and dropout per client), on the same test set. Its
        stored state is not changed."""
        method, model, prep = self.method, self.model, self.prep
        bs, own = self.cfg.train.eval_batch_size, [prep.split.test[cid]]
        out: dict[str, float] = {}
        view = method.global_view(model, down, state)
        if view is not None:
            out["newcomer-global-acc"] = group_accuracy(model, view, "global", prep.test, own, bs)[0]
        torch.manual_seed(derive(self.seed, "join-dropout", cid))
        data = self._batched(cid, numpy_gen(self.seed, "join-batches", cid))
        joined = method.join_view(model, down, state, data)
        if joined is not None:
            mode = "both" if method.personalizes else "global"
            out["newcomer-acc"] = group_accuracy(model, joined, mode, prep.test, own, bs)[0]
        return out
