"""`--resume --rescore`: a finished run's final evaluation runs again from its checkpoint, so a run made before
the clients reported their right answers (`train.eval_per_example`) gets them without training again."""

from __future__ import annotations

import json

from fedslip.federation.checkpoint import load, path_for, read_meta, save
from fedslip.federation.protocol import RoundProtocol

from test_resume import assert_same_outputs, fedslip

METHODS = ["compare", "--methods", "fedavg,fedslip-plus"]
OFF = ["train.eval_per_example=false"]


def test_a_rescored_run_equals_one_that_reported_its_answers_from_the_start(tmp_path, capsys, monkeypatch):
    whole = tmp_path / "whole"
    assert fedslip(whole, METHODS)[0] == 0
    out = tmp_path / "old"
    assert fedslip(out, METHODS, OFF)[0] == 0
    before = json.loads((out / "results.json").read_text())["methods"]
    assert all(c["personal_right"] is None for c in before["fedslip-plus"]["clients"])
    ledger = (out / "ledger.csv").read_bytes()
    trained = []
    monkeypatch.setattr(RoundProtocol, "run_round", lambda self, rnd: trained.append(rnd))
    code, err = fedslip(out, [*METHODS, "--rescore"], resume=True, capsys=capsys)
    assert code == 0 and "differ" not in err and trained == []
    assert (out / "ledger.csv").read_bytes() == ledger  # the evaluation's downloads counted once, as before
    assert_same_outputs(out, whole, ["fedavg", "fedslip-plus"])  # right answers and all
    saved = read_meta(path_for(out, "fedslip-plus"))["result"]["clients"]  # the checkpoint holds them now
    assert all(c["personal_right"] for c in saved)
    assert "won" in (out / "comparison.md").read_text()


def test_a_score_the_models_do_not_reproduce_is_reported(tmp_path, capsys):
    out = tmp_path / "run"
    assert fedslip(out, ["run", "--method", "fedavg"], OFF)[0] == 0
    path = path_for(out, "fedavg")
    glob, clients, meta = load(path)
    meta["result"]["clients"][0]["kstep_acc"] = 0.123  # as if recorded by other code
    save(path, glob, clients, meta)
    code, err = fedslip(out, ["run", "--method", "fedavg", "--rescore"], resume=True, capsys=capsys)
    assert code == 0 and "1 score(s) differ" in err and "client 0 kstep_acc: 0.123 →" in err
    kept = path.with_name(path.name + ".before-rescore")  # the recorded scores are not lost
    assert f"kept in {kept}" in err and load(kept)[2]["result"]["clients"][0]["kstep_acc"] == 0.123
    assert load(path)[2]["result"]["clients"][0]["kstep_acc"] != 0.123


def test_a_flower_checkpoint_is_refused_before_anything_is_scored(tmp_path, capsys):
    out = tmp_path / "run"
    assert fedslip(out, ["compare", "--methods", "fedavg"], capsys=capsys)[0] == 0
    path = path_for(out, "fedavg")
    glob, _, meta = load(path)
    save(path, glob, None, meta)  # as a Flower run saves it: no clients' states
    def written():  # every file and its last change, but the lock a run takes on its folder
        return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != ".fedslip.lock"}

    listing = written()
    code, err = fedslip(out, ["compare", "--methods", "fedavg", "--rescore"], resume=True, capsys=capsys)
    assert code == 2 and "ran on Flower" in err and len(err.strip().splitlines()) == 1
    assert written() == listing


def test_rescore_needs_resume_and_finished_methods(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = fedslip(out, ["run", "--method", "fedavg", "--rescore"], capsys=capsys)
    assert code == 2 and "add --resume" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert fedslip(out, ["compare", "--methods", "fedavg"], capsys=capsys)[0] == 0
    listing = sorted(p.name for p in out.rglob("*"))
    code, err = fedslip(out, ["compare", "--methods", "fedavg,fedslip", "--rescore"], resume=True, capsys=capsys)
    assert code == 2 and "fedslip" in err and "has no finished checkpoint" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.rglob("*")) == listing  # nothing written
