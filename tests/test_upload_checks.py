"""Bad uploads are rejected at the server, on both transports: never averaged, one warning, a ledger row
marked rejected, and the run goes on."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedslip.federation.checks import update_norm, upload_problem
from fedslip.federation.inprocess import Simulation
from fedslip.federation.payload import decode, encode
from fedslip.methods import METHODS

from conftest import tiny_config

BAD = 1  # the client whose round-1 upload is tampered with


def first(p):
    return sorted(p)[0]


CRAFTED = {
    "missing name": lambda p: {k: v for k, v in p.items() if k != first(p)},
    "extra name": lambda p: {**p, "evil.tensor": torch.zeros(3)},
    "wrong shape": lambda p: {**p, first(p): torch.zeros(*[s + 1 for s in p[first(p)].shape])},
    "float64": lambda p: {**p, first(p): p[first(p)].double()},
    "NaN": lambda p: {**p, first(p): torch.full_like(p[first(p)], float("nan"))},
    "Inf": lambda p: {**p, first(p): torch.full_like(p[first(p)], float("inf"))},
    "huge norm": lambda p: {k: v * 1e6 for k, v in p.items()},
    "empty payload": lambda p: {},
    "truncated bytes": None,  # transport-specific: the upload's bytes cut in half
}
SECTIONS = {"train": {"max_update_norm": 1e3}, "method": {"kstep": False}}


def check_rejected(result, ledger, seen, capsys, case):
    r1, r2 = result.rounds[0], result.rounds[1]
    assert r1.rejected == [BAD] and r1.participants == [0, 2, 3], case
    assert r2.rejected == [] and r2.participants == [0, 1, 2, 3], case  # the run went on
    row = next(e for e in ledger.entries if (e.round, e.client, e.direction) == (1, BAD, "up"))
    assert row.status == "rejected" and row.note, case
    assert all(e.status == "ok" for e in ledger.entries if e is not row), case
    rnd, participants, ups = seen[0]
    assert participants == [0, 2, 3] and len(ups) == 3
    for p, _ in ups:  # nothing crafted reached the aggregation
        assert all(torch.isfinite(t).all() and t.dtype == torch.float32 for t in p.values())
    warnings = [line for line in capsys.readouterr().err.splitlines() if "rejected" in line]
    assert len(warnings) == 1 and f"client {BAD}" in warnings[0], warnings


def spy_aggregate(method):
    seen = []
    real = method.aggregate

    def spy(ups, glob, rnd, participants):
        seen.append((rnd, list(participants), [(dict(p), n) for p, n in ups]))
        return real(ups, glob, rnd, participants)

    method.aggregate = spy
    return seen


@pytest.mark.parametrize("case", list(CRAFTED))
def test_inprocess_rejects_crafted_uploads(tiny_prep, capsys, case):
    def tamper(cid, rnd, blob):
        if (cid, rnd) != (BAD, 1):
            return blob
        if CRAFTED[case] is None:
            return blob[: len(blob) // 2]
        return encode(CRAFTED[case](decode(blob)))

    method = METHODS["fedavg"](tiny_config("fedavg", **SECTIONS))
    seen = spy_aggregate(method)
    result, ledger = Simulation(tiny_prep, method, tamper=tamper).run()
    check_rejected(result, ledger, seen, capsys, case)


@pytest.mark.parametrize("case", list(CRAFTED))
def test_flower_rejects_crafted_uploads(tiny_prep, capsys, case):
    pytest.importorskip("flwr", reason="the Flower runtime needs the `flower` extra: pip install -e '.[flower]'")
    from flwr.app import Array, ArrayRecord

    from flower_util import run_config
    from fedslip.federation.flower.app import client_app
    from fedslip.federation.flower.local_grid import LocalGrid
    from fedslip.federation.flower.records import ARRAYS, payload_to_record, record_to_payload
    from fedslip.federation.flower.runtime import config_from_run, runtime_for
    from fedslip.federation.flower.server import FlowerServer

    def alter(partition, msg, reply):
        if (partition, msg.metadata.group_id, msg.metadata.message_type) != (BAD, "1", "train"):
            return reply
        record = reply.content[ARRAYS]
        if CRAFTED[case] is None:
            name = first(record)
            a = record[name]
            cut = ArrayRecord()
            for n in record:
                cut[n] = record[n] if n != name else Array(dtype=a.dtype, shape=a.shape, stype=a.stype,
                                                             data=a.data[: len(a.data) // 2])
            reply.content[ARRAYS] = cut
        else:
            reply.content[ARRAYS] = payload_to_record(CRAFTED[case](record_to_payload(record)))
        return reply

    rc = run_config("fedavg", **SECTIONS)
    cfg = config_from_run(rc)
    rt = runtime_for(cfg, dataclasses.replace(tiny_prep, cfg=cfg))
    grid = LocalGrid(client_app, [{"partition-id": k, "num-partitions": 4} for k in range(4)], rc, run_id=41,
                     alter=alter)
    server = FlowerServer(grid, cfg, rc, rt)
    seen = spy_aggregate(server.method)
    try:
        result, ledger = server.run()
    finally:
        del server.method.aggregate  # the runtime (and its method) is cached for the process
    check_rejected(result, ledger, seen, capsys, case)


def test_checks_name_the_problem():
    down = {"a": torch.zeros(2, 3), "b": torch.zeros(3)}
    spec = {"a": ((2, 3), torch.float32), "b": ((3,), torch.float32)}
    assert upload_problem(dict(down), spec, down, None) == ""
    assert "missing a" in upload_problem({"b": down["b"]}, spec, down, None)
    assert "unexpected c" in upload_problem({**down, "c": torch.zeros(1)}, spec, down, None)
    assert "float64" in upload_problem({**down, "a": down["a"].double()}, spec, down, None)
    assert "shape (3, 2)" in upload_problem({**down, "a": torch.zeros(3, 2)}, spec, down, None)
    moved = {"a": torch.full((2, 3), 2.0), "b": torch.zeros(3)}
    assert update_norm(moved, down) == pytest.approx(2.0 * 6 ** 0.5)  # ‖Δ‖ = 2·√6
    assert "update norm" in upload_problem(moved, spec, down, 4.8)
    assert upload_problem(moved, spec, down, 5.0) == ""
