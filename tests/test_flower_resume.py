"""A Flower run whose server dies resumes from its checkpoint to the numbers of an uninterrupted run, with
restarted nodes that find their private state on disk, one round back where they had gone ahead."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from flower_util import flower_run

from fedslip.federation.checkpoint import load, path_for
from fedslip.federation.client_state import load_state_file
from fedslip.federation.protocol import RoundProtocol

SECTIONS = {"train": {"rounds": 3}, "method": {"warmup_rounds": 0, "kstep": False}}


def test_flower_server_crash_then_resume_equals_the_uninterrupted_run(tiny_prep, tmp_path, monkeypatch):
    whole, _, whole_out = flower_run(tmp_path / "whole", "fedslip", tiny_prep, SECTIONS)

    def power_cut(self, point):  # after round 2's uploads arrived, before the round-2 checkpoint
        if self.current_round == 2 and point == "train":
            raise RuntimeError("power cut")

    with monkeypatch.context() as mp:
        mp.setattr(RoundProtocol, "crash", power_cut)
        with pytest.raises(RuntimeError, match="power cut"):
            flower_run(tmp_path / "b", "fedslip", tiny_prep, SECTIONS, run_id=11)
    assert json.loads(json.dumps(load(path_for(tmp_path / "b" / "out", "fedslip"))[2]["rounds"]))[-1]["round"] == 1
    # the nodes trained round 2 already: their newest state is one round ahead of the server's checkpoint
    assert (tmp_path / "b" / "node0" / "run-11-partition-0-round-2.safetensors").is_file()

    # a new Flower run (new run id, fresh node processes) on the same state folders, resumed
    resumed, _, out = flower_run(tmp_path / "b", "fedslip", tiny_prep, SECTIONS, run_id=12, resume=True)
    assert [(e.round, e.client, e.direction, e.kind, e.status, e.bytes) for e in resumed.ledger.entries] == \
        [(e.round, e.client, e.direction, e.kind, e.status, e.bytes) for e in whole.ledger.entries]
    for name, t in whole.glob.items():
        torch.testing.assert_close(resumed.glob[name], t, rtol=0, atol=0)
    a = json.loads((whole_out / "results.json").read_text())["methods"]["fedslip"]
    b = json.loads((out / "results.json").read_text())["methods"]["fedslip"]
    assert a["clients"] == b["clients"] and a["final"] == b["final"]
    for k in range(4):  # each node's final private state, bit for bit (the global track never sees it)
        mine, _ = load_state_file(tmp_path / "b" / f"node{k}" / f"run-11-partition-{k}.safetensors")
        theirs, _ = load_state_file(tmp_path / "whole" / f"node{k}" / f"run-11-partition-{k}.safetensors")
        assert set(mine.tensors) == set(theirs.tensors)
        assert all(torch.equal(mine.tensors[n], theirs.tensors[n]) for n in mine.tensors), k


def test_a_node_without_the_state_the_server_expects_stops_the_run(tiny_prep, tmp_path):
    """A node restarted without its state-dir files (another disk, none configured) cannot go on from the
    round the server says: it says so, and the server stops with that line instead of letting the partition
    train on from a fresh private state."""
    import shutil

    from fedslip.errors import UserError
    from fedslip.federation.flower.client import NO_STATE

    def lose_node0(grid):
        grid.restart(0)  # a new process: empty Context.state
        shutil.rmtree(tmp_path / "node0")

    with pytest.raises(UserError, match=f"partition 0: {NO_STATE} 2 for partition 0"):
        flower_run(tmp_path, "fedslip", tiny_prep, SECTIONS, before_round={3: lose_node0})


def test_a_checkpoint_resumes_only_on_the_runtime_that_made_it(tiny_prep, tmp_path, monkeypatch):
    """In-process checkpoints hold the clients' private states, Flower's are on the nodes: resumed on the
    other runtime, every client would start afresh, silently. Refused with one line."""
    from fedslip.errors import UserError
    from fedslip.federation.inprocess import Simulation
    from fedslip.methods import METHODS

    from conftest import tiny_config

    def power_cut(self, point):
        if self.current_round == 2 and point == "train":
            raise RuntimeError("power cut")

    with monkeypatch.context() as mp:
        mp.setattr(RoundProtocol, "crash", power_cut)
        with pytest.raises(RuntimeError, match="power cut"):
            flower_run(tmp_path / "f", "fedslip", tiny_prep, SECTIONS)
    cfg = tiny_config("fedslip", train={"rounds": 3}, method={"warmup_rounds": 0, "kstep": False})
    prep = dataclasses.replace(tiny_prep, cfg=cfg)
    with pytest.raises(UserError, match="made on Flower"):
        Simulation(prep, METHODS["fedslip"](cfg)).run(path_for(tmp_path / "f" / "out", "fedslip"), resume=True)
    with monkeypatch.context() as mp:
        mp.setattr(RoundProtocol, "crash", power_cut)
        with pytest.raises(RuntimeError, match="power cut"):
            Simulation(prep, METHODS["fedslip"](cfg)).run(path_for(tmp_path / "i", "fedslip"))
    (tmp_path / "i2").mkdir()
    (tmp_path / "i2" / "out").symlink_to(tmp_path / "i")
    with pytest.raises(UserError, match="made in process"):
        flower_run(tmp_path / "i2", "fedslip", tiny_prep, SECTIONS, resume=True)
