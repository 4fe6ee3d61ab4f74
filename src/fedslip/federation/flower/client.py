"""The ClientApp's side: a Flower Message becomes a `Request` for the shared `ClientSide`, its `Answer` a reply.

A node's private state (`ClientState`) lives in its `Context.state` and, when the node config has
`state-dir`, on its disk after every round it trained: `run-<key>-partition-<k>-round-<t>.safetensors` (the
last few rounds) and `run-<key>-partition-<k>.safetensors` (the latest). `<key>` is the run key the server
sends (its first Flower run id, kept when a run resumes), so a restarted SuperNode, or a resumed run,
finds its private track. Each request says which round's state the node goes on from (`state-round`: the
last round whose train reply reached the server): a node whose reply came too late (the server counted it
as failed), or that trained a round the server then lost (it crashed before its checkpoint), goes back to
that round, as a failed client keeps its state in-process. Without that state on the node (no state-dir,
another disk) the node says so, and the server stops: training on from a fresh state would be silent.
The state is never put in a message. `<state-dir>/events.jsonl` records saves and resumes with value
digests of the private tensors, for the audit (`audit.py`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedslip.errors import UserError
from fedslip.federation.client_state import load_state_file, save_state_file, state_digest
from fedslip.federation.exchange import EVALUATE, TRAIN, Answer, EvalAsk, Payload, Request
from fedslip.federation.flower.audit import private_fingerprints
from fedslip.federation.flower.mods import partition_of
from fedslip.federation.flower.records import (ARRAYS, CONFIG, EVALUATION, METRICS, payload_to_record,
                                               record_to_payload, state_from_context, state_to_context)
from fedslip.methods.base import ClientState

log = logging.getLogger("flwr")
INFO = "info"  # the ConfigRecord of a query reply
NO_STATE = "no private state of round"  # how a node says it lacks the state the server expects


def partition(context: Context, n_clients: int | None = None) -> int:
    pid = partition_of(context)
    if pid < 0:
        raise UserError("this SuperNode has no partition: start it with "
                        "--node-config 'partition-id=K num-partitions=N'")
    n = context.node_config.get("num-partitions")
    if n_clients is not None and (pid >= n_clients or (n is not None and int(n) != n_clients)):
        raise UserError(f"node partition-id={pid} num-partitions={n} does not fit partition.n_clients={n_clients}")
    return pid


def query_reply(rt, msg: Message, context: Context) -> Message:
    """The node's partition, its data's sizes (the server holds no data in a node-data run) and its backbone's
    digest (the server leaves out a node whose model is not its own)."""
    pid = partition(context, rt.n_clients)
    own = rt.prep.clients[pid]
    info = {"partition-id": pid, "num-partitions": int(context.node_config.get("num-partitions", -1)),
            "n-train": int(own["n_train"]), "n-test": int(own["n_test"]),
            "dominant-label": int(own["dominant_label"])}
    if rt.prep.backbone.digest is not None:  # the server refuses a node whose model is not its own
        info["backbone-digest"] = rt.prep.backbone.digest
    return Message(RecordDict({INFO: ConfigRecord(info)}), reply_to=msg)


# --- messages <-> the shared exchange records ------------------------------------------------------------
def request_message(req: Request, node: int) -> Message:
    config = {"server-round": req.round, "partition-id": req.cid, **req.config}
    if req.evaluate is not None:
        config.update({"eval-round": req.evaluate.round, "global-test": req.evaluate.global_test,
                       "kstep": req.evaluate.kstep, "join": req.evaluate.join})
    content = RecordDict({ARRAYS: payload_to_record(req.payload), CONFIG: ConfigRecord(config)})
    kind = MessageType.TRAIN if req.kind == TRAIN else MessageType.EVALUATE
    return Message(content, node, kind, group_id=str(req.round))


def message_request(msg: Message, pid: int) -> Request:
    config = dict(msg.content[CONFIG])
    if int(config.get("partition-id", pid)) != pid:
        raise UserError(f"message for partition {config['partition-id']} reached partition {pid}")
    ask = None
    if "eval-round" in config:
        ask = EvalAsk(int(config["eval-round"]), bool(config["global-test"]), bool(config["kstep"]),
                      bool(config.get("join", False)))
    extra = {k: v for k, v in config.items()
             if k not in ("server-round", "partition-id", "eval-round", "global-test", "kstep", "join")}
    kind = TRAIN if msg.metadata.message_type == MessageType.TRAIN else EVALUATE
    return Request(kind, pid, int(config["server-round"]), record_to_payload(msg.content[ARRAYS]), ask, extra)


def answer_content(answer: Answer) -> RecordDict:
    content = RecordDict({METRICS: MetricRecord(answer.metrics or {"num-examples": 0})})
    if answer.upload is not None:
        content[ARRAYS] = payload_to_record(answer.upload)
    if answer.evaluation is not None:
        content[EVALUATION] = ConfigRecord({k: v if isinstance(v, str) else float(v)  # right answers: strings
                                            for k, v in answer.evaluation.items()})
    return content


def content_answer(content: RecordDict) -> Answer:
    """The answer in a reply, without its upload (`upload_of`)."""
    evaluation = dict(content[EVALUATION]) if EVALUATION in content.config_records else None
    return Answer(None, dict(content[METRICS]), evaluation)


def upload_of(content: RecordDict) -> Payload | None:
    """The upload in a reply, decoded (a malformed array raises)."""
    return record_to_payload(content[ARRAYS]) if ARRAYS in content.array_records else None


# --- the node's private state -----------------------------------------------------------------------------
KEEP_ROUNDS = 3  # per-round state files kept on a node, beyond `train.checkpoint_every` (a resume goes back that far)


def state_file(context: Context, pid: int, key: str, rnd: int | None = None) -> Path | None:
    folder = context.node_config.get("state-dir")
    suffix = "" if rnd is None else f"-round-{rnd}"
    return Path(str(folder)) / f"run-{key}-partition-{pid}{suffix}.safetensors" if folder else None


def saved_rounds(context: Context, pid: int, key: str) -> list[int]:
    first = state_file(context, pid, key, 0)
    if first is None or not first.parent.is_dir():
        return []
    prefix = first.name.removesuffix("0.safetensors")
    return sorted(int(p.name[len(prefix):-len(".safetensors")]) for p in first.parent.glob(f"{prefix}*.safetensors")
                  if p.name[len(prefix):-len(".safetensors")].isdigit())


def _event(context: Context, **row) -> None:
    folder = context.node_config.get("state-dir")
    if folder:
        Path(str(folder)).mkdir(parents=True, exist_ok=True)
        with open(Path(str(folder)) / "events.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), "run_id": int(context.run_id), **row}) + "\n")


def load_client_state(side, context: Context, pid: int, key: str, state_round: int, strict: bool = True) -> ClientState:
    """The node's state as of round `state_round` (0: fresh): from Context.state, else from its disk (a
    restarted node, or one a resumed run sends back a round). A newer state only in Context.state (a node
    without a state-dir whose late reply the server did not take) is used with a warning: it is all there is.
    `strict`: the server said which round; otherwise (a server resumed from an older checkpoint) the latest
    state up to `state_round`, else a fresh one."""
    got = state_from_context(context)
    if got is not None and str(got[1].get("run-key")) != key:
        got = None
    newer = got if got is not None and int(got[1]["round"]) > state_round else None
    if newer is not None:
        got = None
    if got is None:
        earlier = [r for r in saved_rounds(context, pid, key) if r <= state_round]
        if earlier:
            path = state_file(context, pid, key, earlier[-1])
            got = load_state_file(path)
            state, meta = got
            _event(context, event="resume", partition=pid, round=int(meta["round"]), digest=state_digest(state))
            log.info("partition %d: resumed private state of round %s from %s", pid, meta["round"], path)
    if got is None and newer is not None and not (strict and state_round == 0):  # round 0: fresh, exactly
        log.warning("partition %d: the server goes on from round %d, this node kept only round %s's state",
                    pid, state_round, newer[1]["round"])
        got = newer
    if got is None and state_round > 0 and strict:
        where = context.node_config.get("state-dir")
        raise UserError(f"{NO_STATE} {state_round} for partition {pid} on this node "
                        + (f"(state-dir {where})" if where else "(it has no state-dir: start the SuperNode with "
                           "--node-config 'state-dir=...', or fedslip flower/deploy with --workdir)"))
    return got[0] if got is not None else side.fresh_state(pid)


def store_client_state(context: Context, pid: int, state: ClientState, rnd: int, key: str, keep: int,
                       kept_from: int = 0) -> None:
    """Save round `rnd`'s state; of the older files keep the last `keep`, and every one from round `kept_from`
    (the round the server said it goes on from) on, however many late replies came since."""
    meta = {"round": rnd, "partition-id": pid, "run-key": key}
    state_to_context(context, state, meta)
    if (path := state_file(context, pid, key, rnd)) is not None:
        save_state_file(path, state, meta)
        save_state_file(state_file(context, pid, key), state, meta)
        for old in [r for r in saved_rounds(context, pid, key)[:-keep] if r < kept_from]:
            state_file(context, pid, key, old).unlink(missing_ok=True)
        _event(context, event="save", partition=pid, round=rnd, digest=state_digest(state),
               private=private_fingerprints(state))


def handle(side, n_clients: int, msg: Message, context: Context) -> Message:
    """Train and evaluate messages alike: the shared client side, the state kept on the node."""
    pid = partition(context, n_clients)
    req = message_request(msg, pid)
    key = str(req.config.pop("run-key", context.run_id))
    said = req.config.pop("state-round", None)
    default = req.round - 1 if req.kind == TRAIN else req.round  # a server that does not say: the last round
    state_round = default if said is None else int(said)
    state = load_client_state(side, context, pid, key, state_round, said is not None)
    answer, state = side.handle(req, state)
    if req.kind == TRAIN:
        store_client_state(context, pid, state, req.round, key, KEEP_ROUNDS + side.cfg.train.checkpoint_every,
                           state_round)
    return Message(answer_content(answer), reply_to=msg)
