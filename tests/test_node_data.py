"""Nodes that read only their own files: the same run as the split-and-distribute one, with a server that
holds no data at all."""

from __future__ import annotations

import json

import pytest

from fedslip.cli import main
from fedslip.data.client_files import write_client_files
from fedslip.data.partition import make_split
from fedslip.data.sources import load_data
from fedslip.errors import UserError
from fedslip.federation.inprocess import Simulation
from fedslip.methods import METHODS

from conftest import tiny_config

flwr = pytest.importorskip("flwr", reason="the Flower runtime needs the `flower` extra: pip install -e '.[flower]'")


def test_node_data_run_matches_the_split_run_and_the_server_reads_no_data(tiny_prep, tmp_path, monkeypatch, capsys):
    from flwr.app import Context, RecordDict

    from flower_util import assert_same_state, run_config, snapshot_rounds
    from fedslip import prepare as prepare_module
    from fedslip.federation.flower import runtime as runtime_module
    from fedslip.federation.flower.app import client_app, server_app
    from fedslip.federation.flower.local_grid import LocalGrid
    from fedslip.federation.flower.server import FlowerServer

    cfg = tiny_config("fedslip", method={"kstep": False})
    data = load_data(cfg.data)
    paths = write_client_files(data, make_split(data, cfg.partition, cfg.train.seed), tmp_path / "files")
    sim = Simulation(tiny_prep, METHODS["fedslip"](cfg))
    sim_history = snapshot_rounds(sim)
    expected, _ = sim.run()

    names = ", ".join(f'"{n}"' for n in data.label_names)
    rc = run_config("fedslip", out=tmp_path / "out", method={"kstep": False})
    rc.update({"node-data": True, "overrides": rc["overrides"] + f"; data.label_names=[{names}]"})
    nodes = [{"partition-id": k, "num-partitions": 4, "train-file": str(paths[f"client{k}/train"]),
              "test-file": str(paths[f"client{k}/test"]), "global-test-file": str(paths["global_test"])}
             for k in range(4)]
    loads = []
    real_load = prepare_module.load_data
    monkeypatch.setattr(prepare_module, "load_data", lambda dc, **kw: loads.append(dc.train_file) or real_load(dc, **kw))
    monkeypatch.setattr(runtime_module, "_RUNTIMES", {})  # this test's runtimes, gone after it
    servers = []
    real_init = FlowerServer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.history = snapshot_rounds(self)
        servers.append(self)

    monkeypatch.setattr(FlowerServer, "__init__", init)
    grid = LocalGrid(client_app, nodes, rc, run_id=51)
    server_app(grid, Context(run_id=51, node_id=0, node_config={}, state=RecordDict(), run_config=rc))

    server = servers[0]
    assert server.prep.data is None  # the server never loaded any data
    # every load was a node reading its own files (the global test file read on its own)
    assert set(loads) == {str(paths[f"client{k}/train"]) for k in range(4)} | {str(paths["global_test"])}
    # a class a node's training file lacks may be another node's: no "no client can learn it" warning
    err = capsys.readouterr().err
    assert "no client can learn" not in err
    assert "-right" not in err  # the nodes' right answers fit the test sizes they reported
    for a, b in zip(server.history, sim_history, strict=True):
        assert_same_state(a, b)
    doc = json.loads((tmp_path / "out" / "results.json").read_text())["methods"]["fedslip"]
    n_test = min(c.n_test for c in expected.clients)
    for mine, theirs in zip(doc["clients"], expected.clients, strict=True):
        assert (mine["n_train"], mine["n_test"], mine["dominant_label"]) == \
            (theirs.n_train, theirs.n_test, theirs.dominant_label)
        assert abs(mine["personal_acc"] - theirs.personal_acc) <= 1 / n_test + 1e-9
        assert len(mine["personal_right"]) == theirs.n_test
    n_global = len(tiny_prep.split.global_test)  # the states agree to float tolerance: one example may flip
    assert abs(doc["final"]["global_acc"] - expected.final["global_acc"]) <= 1 / n_global + 1e-9


def test_a_node_data_node_without_files_is_one_clear_error(tmp_path):
    from flwr.app import Context, RecordDict

    from flower_util import run_config
    from fedslip.errors import UserError
    from fedslip.federation.flower.app import node_runtime
    from fedslip.federation.flower.local_grid import ensure_task_identity

    ensure_task_identity()
    rc = {**run_config("fedslip"), "node-data": True}
    context = Context(run_id=1, node_id=2, node_config={"partition-id": 0}, state=RecordDict(), run_config=rc)
    with pytest.raises(UserError, match="train-file"):
        node_runtime(context)


def test_split_command_writes_each_clients_files(tmp_path, capsys):
    from test_cli import sets

    assert main(["split", "--out", str(tmp_path / "files"), *sets([])]) == 0
    for k in range(4):
        assert (tmp_path / "files" / f"client{k}" / "train.csv").is_file()
    assert (tmp_path / "files" / "global_test.csv").is_file()
    printed = capsys.readouterr().out
    assert "node-data = true" in printed
    assert "data.text_columns=['text']; data.label_column='label'" in printed and "global-test-file=" in printed


def test_a_node_refuses_a_validation_fraction_it_cannot_apply(tmp_path):
    from fedslip.prepare import prepare_node

    cfg = tiny_config("fedavg", data={"label_names": ["a", "b", "c", "d"]}, partition={"validation_fraction": 0.2})
    with pytest.raises(UserError, match="partition.validation_fraction"):
        prepare_node(cfg, 0, str(tmp_path / "train.csv"))
