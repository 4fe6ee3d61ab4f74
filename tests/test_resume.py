"""Checkpoint and resume: a run killed with SIGKILL (mid-round, mid-evaluation, while writing its checkpoint)
and resumed ends with the same outputs, byte for byte, as an uninterrupted one (wall times excepted)."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedslip.cli import main
from fedslip.federation.checkpoint import load, path_for
from fedslip.federation.protocol import RoundProtocol

from test_cli import sets

ROUNDS = ["train.rounds=3", "train.failure_rate=0.25", "train.seed=3"]
FILES = ("rounds.csv", "clients.csv", "ledger.csv")


def argv(out: Path, command: list[str], extra: list[str] = (), resume: bool = False) -> list[str]:
    return [*command, "--out", str(out), "--quiet", *sets([*ROUNDS, *extra])] + (["--resume"] if resume else [])


def killed_at(out: Path, command: list[str], crash: str) -> subprocess.CompletedProcess:
    """A real process, SIGKILLed at `crash`; one thread, like this test process, so floats sum alike."""
    env = {**os.environ, "FEDSLIP_CRASH": crash, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fedslip", *argv(out, command)], env=env, capture_output=True,
                          text=True, timeout=600)


def fedslip(out: Path, command: list[str], extra: list[str] = (), resume: bool = False, capsys=None):
    """The CLI in this process: (exit code, stderr)."""
    code = main(argv(out, command, extra, resume))
    return code, capsys.readouterr().err if capsys is not None else ""


def without_wall_times(obj):
    if isinstance(obj, dict):
        return {k: without_wall_times(v) for k, v in obj.items() if k != "wall_time_s"}
    if isinstance(obj, list):
        return [without_wall_times(v) for v in obj]
    return obj


def assert_same_outputs(a: Path, b: Path, methods: list[str]) -> None:
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ja, jb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert without_wall_times(ja) == without_wall_times(jb)
    rows = [[{k: v for k, v in r.items() if k != "wall_time_s"}
             for r in csv.DictReader(io.StringIO((d / "comparison.csv").read_text()))] for d in (a, b)]
    assert rows[0] == rows[1]
    for m in methods:  # the final states, bit for bit; every round's wall time, the resumed run's earlier ones too
        (ga, ca, ma), (gb, cb, mb) = load(path_for(a, m)), load(path_for(b, m))
        assert set(ga) == set(gb) and all(torch.equal(ga[n], gb[n]) for n in ga)
        every_round = sorted(str(r) for r in range(1, len(ma["rounds"]) + 1))
        assert sorted(ma["round_seconds"]) == sorted(mb["round_seconds"]) == every_round
        for sa, sb in zip(ca, cb, strict=True):
            assert set(sa.tensors) == set(sb.tensors)
            assert all(torch.equal(sa.tensors[n], sb.tensors[n]) for n in sa.tensors)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    outs = {}
    for method in ("fedavg", "fedslip", "flora"):
        out = tmp_path_factory.mktemp("whole") / method
        assert fedslip(out, ["run", "--method", method])[0] == 0
        outs[method] = out
    return outs


@pytest.mark.parametrize("method,crash", [("fedavg", "fedavg:2:train"), ("fedslip", "fedslip:3:checkpoint"),
                                          ("fedslip", "fedslip:3:evaluate"), ("flora", "flora:3:train")])
def test_killed_and_resumed_run_equals_the_uninterrupted_one(uninterrupted, tmp_path, capsys, method, crash):
    out = tmp_path / "run"
    killed = killed_at(out, ["run", "--method", method], crash)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "results.json").exists()
    code, err = fedslip(out, ["run", "--method", method], capsys=capsys)
    assert code == 2 and "--resume" in err and len(err.strip().splitlines()) == 1
    assert fedslip(out, ["run", "--method", method], resume=True)[0] == 0
    assert_same_outputs(out, uninterrupted[method], [method])


def test_compare_resumes_without_rerunning_finished_methods(tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    assert fedslip(whole, ["compare", "--methods", "fedavg,fedslip"])[0] == 0
    out = tmp_path / "run"
    killed = killed_at(out, ["compare", "--methods", "fedavg,fedslip"], "fedslip:2:train")
    assert killed.returncode == -signal.SIGKILL
    finished = load(path_for(out, "fedavg"))[2]
    assert finished["finished"] and not load(path_for(out, "fedslip"))[2]["finished"]
    # the outputs were written when fedavg finished, before fedslip was killed: fedavg's row, as in the whole run
    rows = [{r["method"]: {k: v for k, v in r.items() if k != "wall_time_s"}
             for r in csv.DictReader(io.StringIO((d / "comparison.csv").read_text()))} for d in (out, whole)]
    assert list(rows[0]) == ["fedavg"] and rows[0]["fedavg"] == rows[1]["fedavg"]
    trained = []
    real = RoundProtocol.run_round
    monkeypatch.setattr(RoundProtocol, "run_round", lambda self, rnd: trained.append(self.method.name) or real(self, rnd))
    assert fedslip(out, ["compare", "--methods", "fedavg,fedslip"], resume=True)[0] == 0
    assert trained == ["fedslip", "fedslip"]  # fedavg came back from its checkpoint; fedslip redid rounds 2, 3
    assert_same_outputs(out, whole, ["fedavg", "fedslip"])
    doc = json.loads((out / "results.json").read_text())  # the run's wall time: both processes' work
    assert doc["wall_time_s"] == sum(m["wall_time_s"] for m in doc["methods"].values())
    assert doc["methods"]["fedavg"]["wall_time_s"] == finished["wall_time_s"]


def test_resume_refuses_another_config_a_missing_or_a_corrupt_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert killed_at(out, ["run", "--method", "fedavg"], "fedavg:2:train").returncode == -signal.SIGKILL
    code, err = fedslip(out, ["run", "--method", "fedavg"], extra=["train.lr=0.5"], resume=True, capsys=capsys)
    assert code == 2 and "train.lr" in err
    code, err = fedslip(tmp_path / "empty", ["run", "--method", "fedavg"], resume=True, capsys=capsys)
    assert code == 2 and "no checkpoint" in err and "leave out --resume" in err
    path = path_for(out, "fedavg")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, err = fedslip(out, ["run", "--method", "fedavg"], resume=True, capsys=capsys)
    assert code == 2 and "unreadable" in err


def test_a_run_with_a_stateful_flower_strategy_resumes_exactly(tmp_path):
    """FedAdam's moments live in the strategy: the checkpoint keeps them, so a run killed after round 2's
    checkpoint and resumed equals the uninterrupted one (a fresh FedAdam at round 3 would not)."""
    pytest.importorskip("flwr")
    strategy = ['method.strategy="fedadam:eta=0.05"']
    whole = tmp_path / "whole"
    assert fedslip(whole, ["run", "--method", "fedavg"], extra=strategy)[0] == 0
    out = tmp_path / "run"
    env = {**os.environ, "FEDSLIP_CRASH": "fedavg:3:train", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-m", "fedslip", *argv(out, ["run", "--method", "fedavg"], strategy)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert any(n.startswith("m_t/") for n in load(path_for(out, "fedavg"))[2]["server"])
    assert fedslip(out, ["run", "--method", "fedavg"], strategy, resume=True)[0] == 0
    assert_same_outputs(out, whole, ["fedavg"])


def csv_files(folder: Path, flip: bool = False) -> list[str]:
    """A small two-class CSV dataset in `folder`; `flip` changes one training label."""
    folder.mkdir(parents=True)
    for split, n in (("train", 120), ("test", 60)):
        rows = [f"{'good' if i % 2 else 'bad'} text number {i},{i % 2}" for i in range(n)]
        if flip and split == "train":
            rows[0] = rows[0][:-1] + "1"
        (folder / f"{split}.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    return ['data.source="csv"', f'data.train_file="{folder}/train.csv"', f'data.test_file="{folder}/test.csv"',
            "partition.scheme=\"iid\"", "partition.n_train=20", "partition.n_test=10", "partition.n_global_test=5",
            "train.rounds=1"]


def test_resume_reads_the_same_data_from_another_path_but_not_other_data(tmp_path, capsys):
    out = tmp_path / "run"
    assert fedslip(out, ["run", "--method", "fedavg"], extra=csv_files(tmp_path / "a"))[0] == 0
    before = (out / "rounds.csv").read_bytes()
    moved = csv_files(tmp_path / "b")  # the same files, elsewhere (a run that moved machines)
    assert fedslip(out, ["run", "--method", "fedavg"], extra=moved, resume=True, capsys=capsys)[0] == 0
    assert (out / "rounds.csv").read_bytes() == before
    other = csv_files(tmp_path / "c", flip=True)
    code, err = fedslip(out, ["run", "--method", "fedavg"], extra=other, resume=True, capsys=capsys)
    assert code == 2 and "data:" in err


def test_checkpoints_without_a_data_digest_compare_resolved_paths():
    from fedslip.federation.checkpoint import comparable, differences

    def fp(path, digest):
        return {"config": {"data": {"data_dir": path}, "train": {"precision": "auto", "device": "auto"}},
                "data": digest, "precision": "fp32", "device": "cpu"}

    old = fp("/x/ag_news/", None)
    old.pop("data")
    assert differences(*comparable(old, fp("/x/ag_news", "d1"))) == []
    assert differences(*comparable(old, fp("/x/other", "d1")))
    assert differences(*comparable(fp("/x/a", "d1"), fp("/y/b", "d1"))) == []  # digests: paths do not matter
    assert differences(*comparable(fp("/x/a", "d1"), fp("/x/a", "d2")))


def test_resume_keeps_the_precision_auto_chose_and_refuses_another(tmp_path, capsys, monkeypatch):
    from fedslip.model import placement

    out = tmp_path / "run"
    assert fedslip(out, ["run", "--method", "fedavg"], extra=["train.rounds=1"])[0] == 0  # fp32 (TINY_SETS)
    chose = []  # a probe here that would now choose bf16 must not be asked
    monkeypatch.setattr(placement, "probe", lambda device: chose.append(device) or {"bf16_speedup": 9.0})
    code, _ = fedslip(out, ["run", "--method", "fedavg"], extra=["train.rounds=1", 'train.precision="auto"'],
                      resume=True, capsys=capsys)
    assert code == 0 and chose == []
    assert load(path_for(out, "fedavg"))[2]["fingerprint"]["precision"] == "fp32"
    code, err = fedslip(out, ["run", "--method", "fedavg"], extra=["train.rounds=1", 'train.precision="bf16"'],
                        resume=True, capsys=capsys)
    assert code == 2 and "precision: 'fp32' in the checkpoint, 'bf16' now" in err


def test_resume_refuses_to_drop_a_method_of_the_folder(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert fedslip(out, ["compare", "--methods", "fedavg,local"], extra=["train.rounds=1"])[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, err = fedslip(out, ["run", "--method", "fedavg"], extra=["train.rounds=1"], resume=True, capsys=capsys)
    assert code == 2 and "local" in err and "--methods fedavg,local" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_auto_on_a_gpu_and_naming_that_gpu_resume_each_other():
    """`auto` resolves to "cuda" (the current device); `train.device = "cuda:0"` names it: the same GPU."""
    from fedslip.federation.checkpoint import comparable, differences

    def fp(device):
        return {"config": {"train": {"device": "auto"}}, "data": "d", "precision": "bf16", "device": device}

    assert differences(*comparable(fp("cuda"), fp("cuda:0"))) == []
    assert differences(*comparable(fp("cuda"), fp("cuda:1")))
    assert differences(*comparable(fp("cuda:0"), fp("cpu")))
