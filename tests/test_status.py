"""`fedslip status`: rounds, time left and the latest accuracies, read from checkpoints alone."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from fedslip.cli import main

from test_cli import sets


def rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()[2:]]


def rewrite(path, changes) -> None:
    """The checkpoint at `path` with its JSON part updated by `changes(meta)` (its tensors as they were)."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["fedslip"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(changes(meta))
    save_file(tensors, str(path), metadata={"fedslip": json.dumps(meta)})


def test_status_reads_rounds_time_and_the_last_evaluated_round(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--method", "fedavg", "--quiet", "--out", str(out), *sets()]) == 0
    capsys.readouterr()
    done = out / "state" / "fedavg.safetensors"
    with safe_open(str(done), framework="pt") as f:  # the run timed each of its rounds
        timed = json.loads(f.metadata()["fedslip"])["round_seconds"]
    assert sorted(timed) == ["1", "2"] and all(t > 0 for t in timed.values())
    seed_dir = out / "seed-7" / "state"  # a multi-seed folder's checkpoints are found too
    seed_dir.mkdir(parents=True)
    shutil.copy(done, seed_dir / "fedavg.safetensors")

    def known_accuracies(meta):
        first, second = meta["rounds"]
        first.update(evaluated=True, global_acc=0.25, client_acc=[0.1, 0.2, 0.3, 0.4])
        second.update(evaluated=True, global_acc=0.75, client_acc=[0.5, 0.5, 0.6, 0.6],
                      personal_acc=[0.9, 0.8, 0.7, 0.6], persistent_acc=None)
        return {"rounds": [first, second], "wall_time_s": 7200.0}

    rewrite(done, known_accuracies)
    # the seed-7 copy: unfinished after its first round, as after a crash in round 2
    rewrite(seed_dir / "fedavg.safetensors", lambda meta: {"finished": False, "rounds": meta["rounds"][:1],
                                                           "wall_time_s": 600.0, "round_seconds": {}})

    assert main(["status", str(out)]) == 0
    finished, unfinished = rows(capsys.readouterr().out)
    assert finished[:4] == ["fedavg", "0", "2/2", "finished"] and finished[4:6] == ["2.0 h", "—"]
    assert finished[7:] == ["2", "75.0", "55.0", "75.0", "—"]  # round 2's global, mean client, mean synced
    assert unfinished[2:6] == ["1/2", "unfinished", "10 min", "≈ 10 min"]  # 600 s a round, one to go
    # with its round timed (a pause made the run's wall time longer than the round): the round's pace
    rewrite(seed_dir / "fedavg.safetensors", lambda meta: {"round_seconds": {"1": 300.0}})
    assert main(["status", str(out)]) == 0
    assert rows(capsys.readouterr().out)[1][4:6] == ["10 min", "≈ 5 min"]


def test_time_left_follows_the_median_pace_of_recent_rounds():
    """Per cost unit: the recent rounds' median pace, so one round slowed by a pause does not move it;
    without per-round times, the whole run's pace."""
    from fedslip.run_status import time_left

    costs = [1, 1, 2, 2, 2, 2, 2]
    seconds = {"1": 100.0, "2": 100.0, "3": 200.0, "4": 9000.0}  # round 4 ran through a pause
    assert time_left(10_000.0, 4, costs, seconds) == 100.0 * 6  # paces 100, 100, 100, 4500: median 100
    assert time_left(10_000.0, 4, costs, {**seconds, "5": 10.0, "6": 10.0}) == 100.0 * 6  # later rounds ignored
    assert time_left(10_000.0, 4, costs) == pytest.approx(10_000.0)  # 10,000 s for 6 units, 6 to go
    recent = {str(r): (50.0 if r > 4 else 1e6) * costs[r - 1] for r in range(1, 8)}  # only the last 5 count
    assert time_left(0.0, 7, costs + [2, 2], recent) == 50.0 * 4


def test_status_of_a_folder_without_checkpoints_is_one_line(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fedslip: error: ") and "no checkpoint" in err


def test_status_of_a_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "fedslip.safetensors").write_bytes(b"\x00" * 100)
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unreadable" in err


def test_status_of_a_comparison_under_way_lists_the_methods_still_to_come(tmp_path, capsys):
    """A comparison killed in its second method's first round: it and the third have no checkpoint yet."""
    import os
    import subprocess
    import sys

    out = tmp_path / "cmp"
    env = {**os.environ, "FEDSLIP_CRASH": "fedslip:1:train", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "fedslip", "compare", "--methods", "fedavg,fedslip,local", "--quiet",
                    "--out", str(out), *sets()], env=env, capture_output=True, timeout=600)
    assert main(["status", str(out)]) == 0
    table = {r[0]: r for r in rows(capsys.readouterr().out)}
    assert table["fedavg"][3] == "finished"
    assert table["fedslip"][3] == table["local"][3] == "no checkpoint yet" and table["local"][2] == "0"


def test_status_counts_the_methods_own_rounds_and_leaves_out_clients_not_evaluated(tmp_path, capsys):
    """local runs one round and fedsb a setup round more than train.rounds; a client not evaluated (NaN)
    is left out of the mean, as the run's own tables do."""
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "local,fedsb", "--quiet", "--out", str(out), *sets()]) == 0
    capsys.readouterr()
    rewrite(out / "state" / "fedsb.safetensors", lambda meta: {"rounds": [
        *meta["rounds"][:-1], {**meta["rounds"][-1], "evaluated": True, "personal_acc": [0.5, float("nan"), 1.0, 0.75]}]})
    assert main(["status", str(out)]) == 0
    table = {r[0]: r for r in rows(capsys.readouterr().out)}
    assert table["local"][2] == "1/1" and table["fedsb"][2] == "3/3"
    assert table["fedsb"][10] == "75.0"
