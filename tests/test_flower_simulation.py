"""`flwr run` on Flower's simulation engine (Ray), behind a SuperLink started for the test: the same ledger
and results as the in-process engine, and nothing left running afterwards. About a minute: marked slow."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest

from flower_util import run_config

from fedslip.federation.flower import loopback as deploy
from fedslip.federation.flower.runtime import config_from_run
from fedslip.federation.inprocess import Simulation
from fedslip.flower_cli import run_simulation
from fedslip.methods import METHODS

pytestmark = pytest.mark.slow
pytest.importorskip("ray")


def test_ray_simulation_matches_inprocess(tiny_prep, tmp_path, monkeypatch):
    started = {}
    real_stop = deploy.Loopback.stop

    def stop(self):  # remember what ran, then stop it
        started.update(self.all_pids())
        real_stop(self)

    monkeypatch.setattr(deploy.Loopback, "stop", stop)
    out = tmp_path / "out"
    rc = run_config("fedslip", out=out, method={"warmup_rounds": 0})
    info = run_simulation(rc, tmp_path / "work", 4, cpus=2, timeout=1200)
    assert info["status"] == "finished:completed"
    assert len(started) > 3 and not deploy.alive(started)  # SuperLink, SuperExec, simulation, Ray workers...

    cfg = config_from_run(rc)
    result, ledger = Simulation(dataclasses.replace(tiny_prep, cfg=cfg), METHODS["fedslip"](cfg)).run()
    with open(out / "ledger.csv", encoding="utf-8") as f:
        rows = [(int(r["round"]), int(r["client"]), r["direction"], int(r["bytes"])) for r in csv.DictReader(f)]
    assert rows == [(e.round, e.client, e.direction, e.bytes) for e in ledger.entries]
    doc = json.loads((out / "results.json").read_text())["methods"]["fedslip"]
    assert doc["final"]["train_loss"] == pytest.approx(result.final["train_loss"], rel=1e-5)
    for c, ref in zip(doc["clients"], result.clients, strict=True):
        assert abs(c["personal_acc"] - ref.personal_acc) <= 1.0 / ref.n_test + 1e-9
