"""The round, written once: select → down → exchange → ledger → check uploads → aggregate → evaluate → records.

Both runtimes run this loop; they differ only in the transport that carries requests to clients
(`inprocess.InProcessTransport`: calls on `ClientSide`; `flower.server.FlowerTransport`: Messages to
nodes). Methods learn who took part from `aggregate(..., participants)`: the clients whose uploads
arrived and passed the checks, never a replay of the sampling.

Evaluation of round t rides on round t+1's downloads, which are exactly round t's global model; a client
that gets none (not selected, or failed) and every client after the last round get an evaluation-only
download, which the ledger counts with kind "eval".

Held-out clients (`partition.holdout_clients`: the last k ids) never take part in a round: never selected,
never aggregated, not in the rounds' per-client lists. After the final evaluation each joins once
(`finish`): an evaluation-only download of the final global model (kind "eval", note "join") with an
`EvalAsk(join=True)`, answered by `ClientSide.join`.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fedslip.atomic import atomic_file
from fedslip.errors import UserError, warn
from fedslip.evaluation.ledger import Ledger
from fedslip.evaluation.metrics import summarize
from fedslip.evaluation.records import ClientRecord, MethodResult, RoundRecord
from fedslip.federation.checkpoint import (fingerprint, ledger_from_json, ledger_to_json, result_from_json,
                                           rounds_from_json, rounds_to_json)
from fedslip.federation.checkpoint import check as check_checkpoint
from fedslip.federation.checkpoint import load as load_checkpoint
from fedslip.federation.checkpoint import save as save_checkpoint
from fedslip.federation.checks import size_problem, upload_problem
from fedslip.federation.exchange import EVALUATE, TRAIN, EvalAsk, Payload, Reply, Request, Transport
from fedslip.federation.payload import encode
from fedslip.methods.base import Method, mean
from fedslip.model.adapted import AdaptedModel
from fedslip.model.placement import compute_kind
from fedslip.prepare import Prepared
from fedslip.progress import NullProgress
from fedslip.seeding import numpy_gen, torch_gen


def select_clients(n_clients: int, fraction: float, seed: int, rnd: int) -> list[int]:
    m = max(1, round(fraction * n_clients))
    if m >= n_clients:
        return list(range(n_clients))
    return sorted(int(c) for c in numpy_gen(seed, "select", rnd).choice(n_clients, m, replace=False))


def strategy_aggregation(method: Method):
    """The Flower strategy `method.strategy` as an aggregation step, or None for the method's own rule."""
    spec = (method.cfg.method.strategy or "method").strip()
    if spec.lower() == "method":
        return None
    try:
        from fedslip.federation.flower.strategies import StrategyAggregation
    except ImportError:
        raise UserError(f"method.strategy = {spec!r} is a Flower strategy: pip install -e '.[flower]'") from None
    agg = StrategyAggregation(spec)
    if "proximal_mu" in vars(agg.strategy):
        method.set_proximal_mu(float(agg.strategy.proximal_mu))
    return agg


def check_strategies(methods: list[Method]) -> None:
    """Every method's `method.strategy` (by_method ones included) made once, before any data loads: a typo
    in the last method of a comparison stops it now, not hours later."""
    for m in methods:
        strategy_aggregation(m)


def warn_settings(methods: list[Method]) -> None:
    """One warning line per setting a method would run with but surely not as meant."""
    for m in methods:
        for line in m.setting_warnings():
            warn(line)


class RoundProtocol:
    def __init__(self, prep: Prepared, method: Method, model: AdaptedModel, transport: Transport, progress=None):
        self.prep, self.method, self.model, self.transport = prep, method, model, transport
        self.cfg = method.cfg
        self.seed = self.cfg.train.seed
        self.progress = progress or NullProgress()
        self.n_total = len(prep.split.train)
        self.n_clients = self.n_total - self.cfg.partition.holdout_clients  # the clients that train: 0..n-1
        self.newcomers: dict[int, dict[str, float]] | None = None  # held-out clients' join scores, once joined
        self.glob = method.init_global(model, torch_gen(self.seed, "global"))
        self.ledger = Ledger(method.name)
        self.aggregation = strategy_aggregation(method)
        self.pending: RoundRecord | None = None  # a round awaiting its evaluation
        self.kstep: dict[int, float] = {}
        self.right: dict[int, dict[str, str]] = {}  # the final evaluation's right answers by client and view
        self.round_seconds: dict[int, float] = {}  # each round's wall time (for `fedslip status`'s pace)
        self.current_round = 0
        self.states_restored = False  # `restore` put the clients' states from its checkpoint in this process
        self.global_test_everywhere = False  # every client scores the global test set it may hold

    # --- one round ------------------------------------------------------------------------------------
    def run_round(self, rnd: int) -> RoundRecord:
        method, t = self.method, self.cfg.train
        self.current_round = rnd
        selected = select_clients(self.n_clients, t.client_fraction, self.seed, rnd)
        before = self.glob  # the previous round's global model: what a pending evaluation scores
        glob = method.open_round(self.glob, rnd, selected)
        downs = {cid: method.down_payload(glob, cid) for cid in selected}
        config = self.aggregation.configure(rnd, downs[selected[0]], len(selected)) if self.aggregation else {}
        asks = self._asks(self.pending.round, selected, final=False) if self.pending else {}
        requests = [Request(TRAIN, cid, rnd, downs[cid], asks.get(cid), config) for cid in selected]
        replies = self._exchange(requests, f"round {rnd} clients")
        self.crash("train")
        record = RoundRecord(round=rnd, train_loss=float("nan"), mib_round=0.0, mib_cumulative=0.0)
        ups, participants, losses, answers = [], [], [], {}
        for cid in selected:
            reply = replies[cid]
            if reply.delivered:
                self.ledger.record(rnd, cid, "down", downs[cid], down_bytes(reply, downs[cid]), reply.down_wire)
            if reply.answer is not None and reply.answer.evaluation is not None:
                answers[cid] = reply.answer.evaluation
            accepted = self._accept(rnd, cid, reply, downs[cid], glob, record)
            if accepted is not None:
                ups.append((accepted, int(reply.answer.metrics["num-examples"])))
                participants.append(cid)
                losses.append(float(reply.answer.metrics["loss"]))
        if self.pending:
            missing = {k: ask for k, ask in asks.items() if k not in answers}
            answers.update(self._evaluate_only(self.pending.round, before, missing))
            self._fill(self.pending, answers)
            self.pending = None
        if method.communicates and ups:
            self.glob = (self.aggregation or method.aggregate)(ups, glob, rnd, participants)
        else:
            self.glob = glob  # nothing arrived: the global model stays as it was
        record.participants = participants
        record.train_loss = mean(losses)
        record.mib_round = self.ledger.mib_round(rnd)
        record.mib_cumulative = sum(self.ledger.mib_round(r) for r in range(1, rnd + 1))
        if rnd % t.eval_every == 0 or rnd == method.rounds():
            self.pending = record
        return record

    def _accept(self, rnd: int, cid: int, reply: Reply, down: Payload, glob, record: RoundRecord) -> Payload | None:
        """The upload if it passes the checks; otherwise a ledger row and one warning line saying why."""
        if reply.answer is None:
            self.ledger.record(rnd, cid, "up", {}, 0, status="failed", note=reply.error)
            record.failed.append(cid)
            warn(f"{self.method.name} round {rnd}: client {cid} failed ({reply.error}); "
                 "aggregating the others")
            return None
        up = reply.answer.upload or {}
        spec = self.method.upload_spec(self.model, glob, cid, rnd)
        bound = self.cfg.train.max_update_norm if self.method.checks_update_norm(glob) else None
        problem = reply.error or size_problem(reply.up_bytes, spec) or upload_problem(
            up, spec, {} if self.method.uploads_deltas else down, bound)
        self.ledger.record(rnd, cid, "up", up, reply.up_bytes, reply.up_wire,
                           status="rejected" if problem else "ok", note=problem)
        if problem:
            record.rejected.append(cid)
            warn(f"{self.method.name} round {rnd}: upload of client {cid} rejected: {problem}")
            return None
        return up

    # --- evaluation -----------------------------------------------------------------------------------
    def _asks(self, rnd: int, riders: list[int], final: bool) -> dict[int, EvalAsk]:
        """One ask per client; the balanced global test goes to one client (every client with a local head)."""
        scorer = min(riders) if riders else 0
        everyone = self.method.head == "local" or self.global_test_everywhere
        return {k: EvalAsk(rnd, global_test=everyone or k == scorer, kstep=final) for k in range(self.n_clients)}

    def _evaluate_only(self, rnd: int, glob, asks: dict[int, EvalAsk], note: str = "") -> dict[int, dict[str, float]]:
        if not asks:
            return {}
        downs = {cid: self.method.down_payload(glob, cid) for cid in asks}
        requests = [Request(EVALUATE, cid, rnd, downs[cid], ask) for cid, ask in asks.items()]
        replies = self._exchange(requests, f"round {rnd} {'newcomer ' if note else ''}evaluation")
        self.crash(note or "evaluate")
        out = {}
        for cid in asks:
            reply = replies[cid]
            if reply.delivered:
                self.ledger.record(rnd, cid, "down", downs[cid], down_bytes(reply, downs[cid]), reply.down_wire,
                                   kind="eval", note=note)
            if reply.answer is not None and reply.answer.evaluation is not None:
                out[cid] = reply.answer.evaluation
            else:
                warn(f"{self.method.name} round {rnd}: client {cid} did not evaluate ({reply.error})")
        return out

    def _fill(self, record: RoundRecord, answers: dict[int, dict[str, float]]) -> None:
        nan = float("nan")

        def per_client(key: str) -> list[float]:
            return [float(answers[k][key]) if k in answers and key in answers[k] else nan
                    for k in range(self.n_clients)]

        if not any("client-acc" in a for a in answers.values()):
            record.global_acc, record.client_acc = None, None
        else:
            scores = [float(answers[k]["global-acc"]) for k in sorted(answers) if "global-acc" in answers[k]]
            record.global_acc = float(np.mean(scores)) if scores else None
            record.client_acc = per_client("client-acc")
        record.personal_acc = per_client("personal-acc") if self.method.personalizes else record.client_acc
        persistent = per_client("persistent-acc")
        record.persistent_acc = persistent if any(not math.isnan(a) for a in persistent) else None
        record.eval_mib = self.ledger.mib_round(record.round, kind="eval")
        record.evaluated = True
        self.kstep = {k: float(a["kstep-acc"]) for k, a in answers.items() if "kstep-acc" in a}
        self.right = {k: right for k, a in answers.items() if (right := self._right_answers(k, a))}

    def test_size(self, cid: int) -> int:
        """How many test examples client `cid` holds."""
        return int(self.prep.clients[cid]["n_test"])

    def _right_answers(self, cid: int, answer: dict) -> dict[str, str]:
        """A client's reported right answers by view ("personal", "kstep"), each kept only when it is one 0 or 1
        per test example and agrees with the accuracy reported beside it (else a warning, and no paired
        comparison for that view)."""
        out = {}
        n = self.test_size(cid)
        for view in ("personal", "kstep"):
            bits, acc = answer.get(f"{view}-right"), answer.get(f"{view}-acc")
            if bits is None:
                continue
            if (isinstance(bits, str) and len(bits) == n and set(bits) <= {"0", "1"}
                    and isinstance(acc, (int, float)) and math.isfinite(acc) and bits.count("1") == round(acc * n)):
                out[view] = bits
            else:
                warn(f"{self.method.name}: client {cid}'s {view}-right is not one 0/1 per test example "
                     f"matching its {view}-acc; left out of the paired comparison")
        return out

    def finish(self) -> None:
        """Evaluate the last round (every client gets the final model, with K-step where the method has it),
        then let the held-out clients join, once."""
        last = self.pending
        if self.pending:
            rnd = self.pending.round
            self._fill(self.pending, self._evaluate_only(rnd, self.glob, self._asks(rnd, [], final=True)))
            self.pending = None
        if self.newcomers is None:
            self.newcomers = self._join()
            if last is not None and self.newcomers:  # the join's downloads are the last round's too
                last.eval_mib = self.ledger.mib_round(last.round, kind="eval")

    def _join(self) -> dict[int, dict[str, float]]:
        """Each held-out client gets the final global model once and answers with its join scores (a method
        that communicates nothing has no global model to join: no download, no scores)."""
        held_out = range(self.n_clients, self.n_total)
        if not held_out or not self.method.communicates:
            return {}
        rnd = self.method.rounds()
        self.current_round = rnd
        return self._evaluate_only(rnd, self.glob, {k: EvalAsk(rnd, join=True) for k in held_out}, note="join")

    def _exchange(self, requests: list[Request], label: str) -> dict[int, Reply]:
        bar = self.progress.task(label, len(requests))
        try:
            return self.transport.exchange(requests, bar.advance)
        finally:
            bar.done()

    # --- a whole run ----------------------------------------------------------------------------------
    def run(self, checkpoint: Path | None = None, resume: bool = False,
            rescore: bool = False) -> tuple[MethodResult, Ledger]:
        """All rounds; with `checkpoint`, one after every `train.checkpoint_every` rounds and at the end.
        `resume`: go on from that checkpoint (a finished one returns its result at once; with `rescore`, after
        its final evaluation runs again: `rescore`)."""
        start = time.perf_counter()
        result = MethodResult(method=self.method.name)
        rounds = self.method.rounds()
        done_before = 0.0
        if resume and checkpoint is not None and checkpoint.exists():
            finished, result, done_before = self.restore(checkpoint)
            if finished:
                return (self.rescore(result, checkpoint) if rescore else result), self.ledger
        bar = self.progress.task(f"{self.method.name}: rounds", rounds, self.round_costs())
        for _ in result.rounds:
            bar.advance()
        shown = None
        for rnd in range(len(result.rounds) + 1, rounds + 1):
            began = time.perf_counter()
            record = self.run_round(rnd)
            self.round_seconds[rnd] = time.perf_counter() - began
            result.rounds.append(record)
            if checkpoint is not None and (rnd % self.cfg.train.checkpoint_every == 0 or rnd == rounds):
                self.save(checkpoint, result, done_before + time.perf_counter() - start)
                record.checkpoint = str(checkpoint)
            if rnd == rounds:
                self.finish()
            shown = next((r for r in reversed(result.rounds) if r.evaluated), shown)
            bar.advance(record, shown)
        bar.done()
        self.finish()  # a run resumed from the last round's checkpoint still owes its final evaluation
        result.clients = self.client_records(result.rounds[-1])
        result.wall_time_s = done_before + time.perf_counter() - start
        result.final = summarize(result, self.ledger)
        if checkpoint is not None:
            self.save(checkpoint, result, result.wall_time_s, finished=True)
        return result, self.ledger

    def rescore(self, result: MethodResult, checkpoint: Path) -> MethodResult:
        """A finished run's final evaluation once more, from the models in its checkpoint: every client scores
        the final global model with its own state (K-step included), held-out clients join again; then the
        checkpoint holds the new scores (where one differs, a copy of it as it was is kept beside it). For
        what a run made before it lacks (`train.eval_per_example`'s right answers). Nothing trains, nothing new is counted as sent; a recorded score the new one does not
        reproduce gets a warning (other hardware or code)."""
        if not self.states_restored:
            raise UserError(f"--rescore: {checkpoint} holds no clients' states (a Flower run keeps them on its "
                            "nodes): only an in-process run can be scored again from its checkpoint")
        before = result_scores(result)
        ledger = copy.deepcopy(self.ledger)
        self.pending, self.newcomers = result.rounds[-1], None
        self.finish()  # counts the downloads of the evaluation and the join again: the ledger as it was, below
        self.ledger = ledger  # the evaluation's downloads were counted when the run finished
        last = result.rounds[-1]
        last.eval_mib = self.ledger.mib_round(last.round, kind="eval")
        result.clients = self.client_records(last)
        result.final = summarize(result, self.ledger)
        changed = [k for k, v in result_scores(result).items() if not _same(v, before.get(k))]
        if changed:
            kept = checkpoint.with_name(checkpoint.name + ".before-rescore")
            with atomic_file(kept, binary=True) as f:  # a copy cut short is never left under that name
                f.write(checkpoint.read_bytes())
            warn(f"{self.method.name}: scored again from {checkpoint}, {len(changed)} score(s) differ from the "
                 f"recorded ones (e.g. {changed[0]}: {before.get(changed[0])} → {result_scores(result)[changed[0]]}); "
                 f"the checkpoint as it was is kept in {kept}")
        self.save(checkpoint, result, result.wall_time_s, finished=True)
        return result

    # --- checkpoints ----------------------------------------------------------------------------------
    def client_states(self):
        """The clients' private states where this process holds them (in-process), else None (nodes)."""
        return getattr(self.transport, "states", None)

    def save(self, path: Path, result: MethodResult, wall_time_s: float, finished: bool = False) -> None:
        meta = {"fingerprint": fingerprint(self.prep, self.method.name), "finished": finished,
                "rounds": rounds_to_json(result.rounds), "ledger": ledger_to_json(self.ledger),
                "pending": self.pending.round if self.pending else None, "kstep": self.kstep,
                "wall_time_s": wall_time_s, "round_costs": self.round_costs(),
                "round_seconds": {str(r): t for r, t in self.round_seconds.items() if r <= len(result.rounds)},
                "compute": compute_kind(self.prep.backbone.placement.device),
                "label_names": self.prep.data.label_names if self.prep.data else self.prep.cfg.data.label_names,
                "transport": getattr(self.transport, "checkpoint_meta", dict)()}
        if finished:
            meta["result"] = {"clients": [asdict(c) for c in result.clients], "final": result.final}
        server = None
        if self.aggregation is not None:
            server, meta["strategy_state"] = self.aggregation.state()
        save_checkpoint(path, self.glob, self.client_states(), meta, self.crash, server)

    def restore(self, path: Path) -> tuple[bool, MethodResult, float]:
        check_checkpoint(path, self.prep, self.method.name)
        glob, clients, meta = load_checkpoint(path)
        here = self.client_states() is not None
        if not meta["finished"] and (clients is not None) != here:  # the clients' states would start afresh
            made = "in process (the clients' states are in it)" if clients is not None else \
                "on Flower (the clients' states are on its nodes)"
            raise UserError(f"{path} was made {made}: resume it with the same runtime")
        self.glob = glob
        self.states_restored = clients is not None and here
        if self.states_restored:
            self.transport.states[:] = clients
            if not meta["finished"]:  # a finished run trains nothing more here
                self.warn_other_compute(path, meta.get("compute"))
        self.ledger = ledger_from_json(self.method.name, meta["ledger"])
        rounds = rounds_from_json(meta["rounds"])
        self.pending = next((r for r in rounds if r.round == meta["pending"]), None)
        self.kstep = {int(k): v for k, v in meta["kstep"].items()}
        self.round_seconds = {int(r): t for r, t in meta.get("round_seconds", {}).items()}
        if self.aggregation is not None:
            self.aggregation.restore(meta["server"], meta.get("strategy_state", {}))
        if hasattr(self.transport, "restore_meta"):
            self.transport.restore_meta(meta.get("transport", {}))
        result = MethodResult(method=self.method.name, rounds=rounds)
        if meta["finished"]:
            result = result_from_json({"method": self.method.name, "rounds": meta["rounds"],
                                       "wall_time_s": meta["wall_time_s"], **meta["result"]})
        return meta["finished"], result, meta["wall_time_s"]

    def round_costs(self) -> list[float]:
        return [self.method.round_cost(r) for r in range(1, self.method.rounds() + 1)]

    def warn_other_compute(self, path: Path, saved: dict | None) -> None:
        """Resuming on another CPU kind or thread count is allowed (a long run may move machines), but its
        numbers then differ in the last bits from an uninterrupted run: say so once."""
        now = compute_kind(self.prep.backbone.placement.device)
        if saved is not None and saved != now:
            changed = ", ".join(f"{k} {saved.get(k)!r} → {now.get(k)!r}" for k in sorted(set(saved) | set(now))
                                if saved.get(k) != now.get(k))
            warn(f"{path} was written on other hardware or threads ({changed}): the run goes on, but its "
                 "numbers will not be bit-identical to an uninterrupted run there")

    def crash(self, point: str) -> None:
        """Tests: FEDSLIP_CRASH="<method>:<round>:<point>" kills the process there, as a power cut would."""
        if os.environ.get("FEDSLIP_CRASH") == f"{self.method.name}:{self.current_round}:{point}":
            os.kill(os.getpid(), signal.SIGKILL)

    def client_records(self, last: RoundRecord) -> list[ClientRecord]:
        prep = self.prep

        def sizes(k: int) -> dict:
            return {"client": k, "n_train": prep.clients[k]["n_train"], "n_test": prep.clients[k]["n_test"],
                    "dominant_label": prep.clients[k]["dominant_label"]}

        trained = [ClientRecord(**sizes(k), client_acc=_finite(last.client_acc[k]) if last.client_acc else None,
                                personal_acc=_finite(last.personal_acc[k]) if last.personal_acc else None,
                                kstep_acc=self.kstep.get(k),
                                personal_right=self.right.get(k, {}).get("personal"),
                                kstep_right=self.right.get(k, {}).get("kstep"),
                                persistent_acc=_finite(last.persistent_acc[k]) if last.persistent_acc else None)
                   for k in range(self.n_clients)]
        joined = self.newcomers or {}
        return trained + [ClientRecord(**sizes(k), client_acc=None, personal_acc=None, held_out=True,
                                       newcomer_acc=joined.get(k, {}).get("newcomer-acc"),
                                       newcomer_global_acc=joined.get(k, {}).get("newcomer-global-acc"))
                          for k in range(self.n_clients, self.n_total)]


def result_scores(result: MethodResult) -> dict[str, float | None]:
    """Every final score of a result by name: the global accuracy and each client's accuracies."""
    scores: dict[str, float | None] = {"global_acc": result.rounds[-1].global_acc}
    for c in result.clients:
        for key in ("client_acc", "personal_acc", "persistent_acc", "kstep_acc", "newcomer_acc",
                    "newcomer_global_acc"):
            scores[f"client {c.client} {key}"] = getattr(c, key)
    return scores


def _same(a: float | None, b: float | None) -> bool:
    return a == b or (a is not None and b is not None and math.isnan(a) and math.isnan(b))


def _finite(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else x


def down_bytes(reply: Reply, payload) -> int:
    """The download's length in the project's encoding: the transport's count, or encoded here."""
    return reply.down_bytes if reply.down_bytes is not None else len(encode(payload))
