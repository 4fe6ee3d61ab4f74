"""`fedslip flower` / `fedslip deploy` (fedslip.flower_cli): same flags and outputs as `fedslip run`."""

from __future__ import annotations

import json

import pytest
import torch

import flower_util  # noqa: F401  (skips without Flower)

from fedslip import cli_common
from fedslip.errors import UserError
from fedslip.flower_cli import add_commands

from test_cli import sets


def parser():
    p = cli_common.Parser(prog="fedslip")
    sub = p.add_subparsers(dest="command", required=True, parser_class=cli_common.Parser)
    add_commands(sub, cli_common.add_common)
    return p


def test_flower_local_runtime_writes_the_run_outputs(tmp_path, capsys):
    out = tmp_path / "out"
    args = parser().parse_args(["flower", "--runtime", "local", "--method", "fedavg", "--quiet", "--out", str(out),
                                "--workdir", str(tmp_path / "work"), *sets(["train.rounds=1"])])
    assert args.flower_handler(args) == 0
    for name in ("results.json", "rounds.csv", "clients.csv", "ledger.csv", "comparison.md", "figure.png",
                 "wire.csv", "flower.json"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["method"]["name"] == "fedavg" and doc["config"]["train"]["rounds"] == 1
    assert (tmp_path / "work" / "node0" / "wire.jsonl").is_file()
    assert "fedavg" in capsys.readouterr().out
    from flwr.common.logger import ConsoleHandler, LOGGER_NAME
    import logging

    consoles = [h for h in logging.getLogger(LOGGER_NAME).handlers if isinstance(h, ConsoleHandler)]
    assert consoles and not any(h.colored for h in consoles)  # stderr is no terminal here: no colour codes


def test_bad_config_stops_before_anything_starts(tmp_path):
    args = parser().parse_args(["deploy", "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work"),
                                *sets(["train.rounds=0"])])
    with pytest.raises(UserError, match="train.rounds"):
        args.flower_handler(args)
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_failed_run_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    from fedslip.federation.flower import deploy as deploy_module

    def failing(*args, **kwargs):
        raise RuntimeError("run 7 ended as finished:failed; see work/run.log\nTraceback (most recent call last): ...")

    monkeypatch.setattr(deploy_module, "deploy", failing)
    args = parser().parse_args(["deploy", "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work"),
                                *sets()])
    assert args.flower_handler(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "finished:failed" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra,says", [
    ([], "--resume needs --workdir"),
    (["--runtime", "simulation", "--workdir", "w"], "keeps no node state"),
])
def test_resume_that_would_lose_the_nodes_private_states_is_refused(tmp_path, extra, says):
    args = parser().parse_args(["flower", "--resume", "--out", str(tmp_path / "out"), *extra, *sets(["train.rounds=1"])])
    with pytest.raises(UserError, match=says):
        args.flower_handler(args)


def test_relative_data_paths_reach_the_nodes_absolute(tmp_path, monkeypatch):
    """SuperNodes run in the workdir, not here: a relative data path would name another file there."""
    from fedslip.flower_cli import _prepare_run

    monkeypatch.chdir(tmp_path)
    args = parser().parse_args(["flower", "--out", str(tmp_path / "out"), "--data-dir", "ag",
                                *sets(['data.source="csv"', 'data.train_file="data/train.csv"'])])
    _, rc, _ = _prepare_run(args, "runs/x")
    assert f'data.train_file="{tmp_path / "data" / "train.csv"}"' in rc["overrides"]
    assert f'data.data_dir="{tmp_path / "ag"}"' in rc["overrides"]


def test_an_auto_precision_is_resolved_once_for_the_server_and_every_node(tmp_path, monkeypatch):
    from fedslip.flower_cli import _prepare_run
    from fedslip.model import placement

    probes = []

    def probe(device):
        probes.append(device)
        return {"bf16_speedup": 9.0 if len(probes) == 1 else 0.1}  # a second probe would choose otherwise

    monkeypatch.setattr(placement, "probe", probe)
    args = parser().parse_args(["flower", "--out", str(tmp_path / "out"), *sets(['train.precision="auto"', 'train.device="cpu"'])])
    _, rc, _ = _prepare_run(args, "runs/x")
    assert rc["overrides"].endswith('train.precision="bf16"') and len(probes) == 1
    args = parser().parse_args(["flower", "--out", str(tmp_path / "out"), *sets(['train.precision="fp32"'])])
    assert "bf16" not in _prepare_run(args, "runs/x")[1]["overrides"] and len(probes) == 1  # named: no probe


def test_the_warmup_warning_is_said_once_on_flower(tmp_path, capsys, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="flwr")
    args = parser().parse_args(["flower", "--runtime", "local", "--method", "fedslip", "--quiet", "--out",
                                str(tmp_path / "out"), "--workdir", str(tmp_path / "work"),
                                *sets(["train.rounds=1", "method.warmup_rounds=1"])])
    assert args.flower_handler(args) == 0
    logged = [r for r in caplog.records if "the private track never trains" in r.getMessage()]
    assert len(logged) == 1 and logged[0].name == "flwr"  # the ServerApp's log, the console here
    assert "the private track never trains" not in capsys.readouterr().err.replace(logged[0].getMessage(), "")


@pytest.mark.parametrize("extra,device", [(["--runtime", "simulation", "--gpus", "0"], "cpu"),
                                          (["--runtime", "simulation"], "auto"), ([], "auto")])
def test_auto_precision_is_resolved_for_the_device_the_clients_get(tmp_path, monkeypatch, extra, device):
    """Ray hides every GPU from ClientApps given none: their precision is the CPU's, whatever the host has."""
    from fedslip.flower_cli import _prepare_run
    from fedslip.model import placement

    asked = []

    def resolve(dev, precision):
        asked.append(dev)
        return placement.Placement(torch.device("cpu"), torch.float32, {"precision": "fp32"})

    monkeypatch.setattr(placement, "resolve", resolve)
    args = parser().parse_args(["flower", *extra, "--out", str(tmp_path / "out"), *sets(['train.precision="auto"'])])
    _prepare_run(args, "runs/x")
    assert asked == [device]


def test_deploy_and_simulation_say_the_warmup_warning_before_they_start(tmp_path, capsys):
    """Their ServerApp's log is a file in the workdir: the warning goes to the terminal first."""
    from fedslip.flower_cli import _prepare_run

    for argv in (["deploy"], ["flower", "--runtime", "simulation"]):
        args = parser().parse_args([*argv, "--method", "fedslip", "--out", str(tmp_path / argv[-1]),
                                    *sets(["train.rounds=1", "method.warmup_rounds=1"])])
        _prepare_run(args, "runs/x")
        err = capsys.readouterr().err.splitlines()
        assert sum("the private track never trains" in line for line in err) == 1, argv
