"""The command line: a tiny run writes every output; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from fedslip.cli import main

from conftest import ag_news_dir

TINY_SETS = ["data.source=\"synthetic\"", "data.synthetic_per_class=40", "partition.n_train=24",
             "partition.n_test=12", "partition.n_global_test=6", "model.backbone=\"tiny-random:bert\"",
             "model.max_length=24", "train.rounds=2", "train.batch_size=8", "train.local_only_epochs=1",
             "method.warmup_rounds=1", "method.r_p=4", "method.r_g=2", "train.precision=\"fp32\""]


def sets(extra=()):
    out = []
    for s in [*TINY_SETS, *extra]:
        out += ["--set", s]
    return out


def test_compare_writes_all_outputs(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--methods", "local,fedavg,dualtrack-naive,fedslip", "--quiet", "--out", str(out), *sets()])
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {"results.json", "rounds.csv", "clients.csv", "ledger.csv", "comparison.md", "comparison.csv",
            "figure.png"} <= names
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["methods"]) == {"local", "fedavg", "dualtrack-naive", "fedslip"}
    assert doc["seed"] == 0 and doc["config"]["train"]["rounds"] == 2
    with open(out / "rounds.csv") as f:
        rounds = list(csv.DictReader(f))
    assert sum(r["method"] == "fedslip" for r in rounds) == 2 and sum(r["method"] == "local" for r in rounds) == 1
    with open(out / "clients.csv") as f:
        clients = list(csv.DictReader(f))
    assert len(clients) == 4 * 4
    # under the table, the goal: each personalizing method with a global model against fedavg's numbers
    table = {r["method"]: r for r in csv.DictReader(open(out / "comparison.csv"))}
    goal = (out / "comparison.md").read_text().split("Goal:")[1]
    assert "| local |" not in goal and "| fedavg |" not in goal
    def right(method, view):  # test examples a view got right, from clients.csv: accuracy × test size
        return sum(round(float(c[view]) * int(c["n_test"])) for c in clients if c["method"] == method)

    examples = sum(int(c["n_test"]) for c in clients if c["method"] == "fedavg")
    answers = {m: [c[f"{'kstep' if m == 'fedavg' else 'personal'}_right"] for c in doc["methods"][m]["clients"]]
               for m in ("fedavg", "dualtrack-naive", "fedslip")}  # results.json: each client's right answers
    for method in ("dualtrack-naive", "fedslip"):
        ours, avg = table[method], table["fedavg"]
        met = float(ours["personal_acc_mean"]) >= float(avg["kstep_acc_mean"]) - 1e-9
        net = right(method, "personal_acc") - right("fedavg", "kstep_acc")
        pairs = [(a, b) for mine, theirs in zip(answers[method], answers["fedavg"]) for a, b in zip(mine, theirs)]
        won, lost = pairs.count(("1", "0")), pairs.count(("0", "1"))
        assert won - lost == net
        cell = (f"{100 * float(ours['personal_acc_mean']):.1f} vs {100 * float(avg['kstep_acc_mean']):.1f}: "
                + ("met" if met else "NOT met") + f" (net {net:+d} of {examples:,} examples: {won} won, {lost} lost; "
                "difference ")
        assert f"| {method} | {cell}" in goal
    assert all(c["kstep_acc"] != "" for c in clients if c["method"] == "fedavg")
    assert all(c["kstep_acc"] == "" for c in clients if c["method"] == "fedslip")
    table = capsys.readouterr().out
    for m in ("local", "fedavg", "dualtrack-naive", "fedslip"):
        assert f"| {m} |" in table
    assert goal in table  # printed as written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"


def bad(tmp_path, capsys, argv):
    out = tmp_path / "out"
    rc = main([*argv, "--quiet", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("fedslip: error: "), err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.iterdir()), "something was written"
    return err


def test_missing_data_dir(tmp_path, capsys):
    err = bad(tmp_path, capsys, ["run", "--data-dir", str(tmp_path / "nope")])
    assert "nope" in err


def test_csv_without_label_column(tmp_path, capsys):
    f = tmp_path.parent / f"{tmp_path.name}-data.csv"
    f.write_text("text,category\nhello,0\nworld,1\n")
    err = bad(tmp_path, capsys, ["run", *sets(["data.source=\"csv\"", f"data.train_file=\"{f}\""])])
    assert "label" in err


def test_label_outside_class_range(tmp_path, capsys):
    d = tmp_path.parent / f"{tmp_path.name}-ag"
    d.mkdir()
    for split in ("train", "test"):
        (d / f"{split}.csv").write_text("label,title,description\n0,a,b\n7,c,d\n")
    err = bad(tmp_path, capsys, ["run", "--data-dir", str(d)])
    assert "7" in err


@pytest.mark.parametrize("argv,needle", [
    (["run", "--method", "nope"], "unknown method"),
    (["compare", "--methods", "fedavg,nope"], "unknown method"),
    (["run", "--set", "train.rounds=0"], "train.rounds"),
    (["run", "--set", "train.rounds=-3"], "train.rounds"),
    (["run", "--set", "method.sparsity=1.0"], "method.sparsity"),
    (["run", "--set", "method.sparsity=-0.1"], "method.sparsity"),
    (["run", "--set", "train.rounds=abc"], "train.rounds"),
    (["run", "--set", "nosection"], "--set"),
    (["run", "--set", "train.nokey=1"], "train.nokey"),
    (["run", "--preset", "huge"], "preset"),
    (["run", "--config", "missing.toml"], "missing.toml"),
    (["run", "--bogus-flag"], "bogus"),
    (["run", "--set", "train.rounds=1_000_000_000_000"], "train.rounds"),
    (["run", "--set", "train.seed=-1"], "train.seed"),
    (["run", "--set", "train.lr=inf"], "train.lr"),
    (["compare", "--methods", "fedavg,fedavg"], "more than once"),
    (["compare", "--methods", "fedavg", "--set", "by_method.fedavgg.train={lr=0.1}"], "by_method.fedavgg"),
    (["run", "--seeds", ""], "--seeds"),
])
def test_bad_arguments(tmp_path, capsys, argv, needle):
    assert needle in bad(tmp_path, capsys, argv)


def test_n_train_larger_than_pool(tmp_path, capsys):
    err = bad(tmp_path, capsys, ["run", *sets(["partition.n_train=500"])])
    assert "partition" in err


def test_n_train_larger_than_ag_news_pool(tmp_path, capsys):
    err = bad(tmp_path, capsys, ["run", "--data-dir", str(ag_news_dir()), "--set", "partition.n_train=3000"])
    assert "pool" in err


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedslip.cli", "run", "--set", "train.rounds=0"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == "fedslip: error: train.rounds = 0: must be in [1, 100,000]"
    assert not list(tmp_path.iterdir())


def test_a_log_gets_one_plain_line_per_round(tmp_path, capsys):
    assert main(["run", "--method", "fedslip", "--out", str(tmp_path / "run"), *sets()]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fedslip ")]
    assert [line.split(" | ")[0] for line in lines] == ["fedslip 1/2", "fedslip 2/2"]
    assert "loss" in lines[0] and "MiB" in lines[0] and "left ~" in lines[0]
    assert "round 2:" in lines[1] and "personal" in lines[1]  # scored after the last round
    assert "\x1b[" not in err  # no terminal control codes in a log


def test_run_takes_the_method_a_config_file_names(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[method]\nname = "fedavg"\n', encoding="utf-8")
    out = tmp_path / "run"
    assert main(["run", "--config", str(toml), "--out", str(out), "--quiet", *sets(["method.kstep=false"])]) == 0
    assert list(json.loads((out / "results.json").read_text())["methods"]) == ["fedavg"]


def test_compare_over_seeds_reports_mean_and_sample_std_of_each_seed(tmp_path, capsys):
    import statistics

    out = tmp_path / "seeds"
    rc = main(["compare", "--methods", "fedavg,fedslip", "--seeds", "0,3", "--quiet", "--out", str(out), *sets()])
    assert rc == 0
    assert {"comparison.md", "comparison.csv", "seeds.csv", "figure.png", "seed-0", "seed-3"} <= {
        p.name for p in out.iterdir()}
    per_seed = {s: {r["method"]: r for r in csv.DictReader(open(out / f"seed-{s}" / "comparison.csv"))} for s in (0, 3)}
    # a seed folder is exactly the single-seed comparison with that seed
    single = tmp_path / "single"
    assert main(["compare", "--methods", "fedavg,fedslip", "--quiet", "--out", str(single),
                 *sets(["train.seed=3"])]) == 0
    alone = {r["method"]: r for r in csv.DictReader(open(single / "comparison.csv"))}
    for key in ("global_acc", "personal_acc_mean", "persistent_acc_mean", "kstep_acc_mean", "mib_per_round"):
        assert alone["fedavg"][key] == per_seed[3]["fedavg"][key], key
    summary = {r["method"]: r for r in csv.DictReader(open(out / "comparison.csv"))}
    for method in ("fedavg", "fedslip"):
        for key in ("global_acc", "personal_acc_mean", "persistent_acc_mean"):
            xs = [float(per_seed[s][method][key]) for s in (0, 3)]
            assert float(summary[method][key]) == pytest.approx(statistics.fmean(xs))
            assert float(summary[method][f"{key}_std"]) == pytest.approx(statistics.stdev(xs))
        assert summary[method]["n_seeds"] == "2"
    assert summary["fedslip"]["kstep_acc_mean"] == ""  # a metric the method lacks stays empty
    from fedslip.federation.checkpoint import path_for, read_meta

    split = {(s, m): read_meta(path_for(out / f"seed-{s}", m))["fingerprint"]["split"]  # a digest of every index
             for s in (0, 3) for m in ("fedavg", "fedslip")}
    assert split[0, "fedavg"] != split[3, "fedavg"]  # each seed its own split
    assert " ± " in (out / "comparison.md").read_text()
    seeds_met = sum(float(per_seed[s]["fedslip"]["global_acc"]) >= float(per_seed[s]["fedavg"]["global_acc"]) - 0.005 - 1e-9
                    for s in (0, 3))
    goal = (out / "comparison.md").read_text().split("Goal:")[1]
    cells = next(line for line in goal.splitlines() if line.startswith("| fedslip |")).split(" | ")
    assert cells[2].endswith(f"({seeds_met} of 2 seeds)")  # the global part, counted from the seed folders
    won = lost = 0  # the personal part pools every seed's right answers, read here from each seed's results.json
    for s in (0, 3):
        doc = json.loads((out / f"seed-{s}" / "results.json").read_text())["methods"]
        for mine, theirs in zip(doc["fedslip"]["clients"], doc["fedavg"]["clients"], strict=True):
            pairs = list(zip(mine["personal_right"], theirs["kstep_right"], strict=True))
            won, lost = won + pairs.count(("1", "0")), lost + pairs.count(("0", "1"))
    assert f"of 2 seeds; pooled: {won} won, {lost} lost; difference " in cells[1]


@pytest.mark.parametrize("spec", ["0,x", "1,1", "-1", ","])
def test_bad_seeds_are_one_line_and_exit_2(tmp_path, capsys, spec):
    rc = main(["compare", "--methods", "fedavg", "--seeds", spec, "--quiet", "--out", str(tmp_path / "o"), *sets()])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--seeds" in err
    assert not (tmp_path / "o").exists()


def test_an_empty_out_or_one_under_a_file_is_one_line_and_writes_nothing(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    for out in ("", str(blocker / "sub")):
        assert main(["run", "--quiet", "--out", out, *sets()]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("fedslip: error: --out"), err
    assert [p.name for p in tmp_path.iterdir()] == ["afile"] and blocker.read_text() == "x"


def test_a_second_run_into_a_folder_in_use_stops_and_leaves_it_alone(tmp_path, capsys):
    """The first run holds the folder from its start, before it has written anything."""
    from fedslip.cli_common import LOCK, exclusive

    out = tmp_path / "run"
    with exclusive(out):  # as a first run, still in its first round, would
        assert main(["run", "--quiet", "--out", str(out), *sets()]) == 2
        err = capsys.readouterr().err
        assert "in use by another fedslip run" in err and f"pid {os.getpid()}" in err
        assert [p.name for p in out.iterdir()] == [LOCK]
    assert not out.exists()  # the holder created it and wrote nothing into it: gone again
    assert main(["run", "--quiet", "--out", str(out), *sets()]) == 0


def test_outputs_get_the_mode_a_plain_open_gives(tmp_path):
    """Files written to a temporary name and renamed are not left private (mkstemp makes them 0600)."""
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert main(["run", "--quiet", "--out", str(out), *sets(["train.rounds=1"])]) == 0
    finally:
        os.umask(old)
    for path in (out / "comparison.csv", out / "figure.png", out / "results.json", out / "state" / "fedslip.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_split_refuses_a_used_folder_and_prints_a_run_config_line_that_parses(tmp_path, capsys):
    import tomllib

    out = tmp_path / "clients"
    argv = ["split", "--out", str(out), *sets()]
    assert main(argv) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("run config: "))
    toml = line.removeprefix("run config: ").replace(", overrides", "\noverrides")
    overrides = tomllib.loads(toml)["overrides"]
    parts = dict(p.split("=", 1) for p in overrides.split("; "))  # these class names hold no "; "
    names = tomllib.loads("v = " + parts["data.label_names"])["v"]
    assert len(names) >= 2 and all(isinstance(n, str) for n in names)
    assert tomllib.loads("v = " + parts["data.text_columns"])["v"] == ["text"]
    assert tomllib.loads("v = " + parts["data.label_column"])["v"] == "label"
    before = sorted(p.name for p in out.rglob("*"))
    assert main(argv) == 2 and "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before


def test_max_length_beyond_the_backbone_is_one_line(tmp_path, capsys):
    from fedslip.model.backbone import load_backbone

    limit = load_backbone("tiny-random:bert", 4, 0).model.config.max_position_embeddings
    err = bad(tmp_path, capsys, ["run", *sets([f"model.max_length={limit + 1}"])])
    assert "model.max_length" in err and str(limit) in err


def test_methods_lists_whole_first_paragraphs(capsys):
    assert main(["methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["flora"].rstrip().endswith("heterogeneous-rank LoRAs.")


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tmp_path, capsys, monkeypatch):
    from fedslip.errors import UserError
    from fedslip.federation.protocol import RoundProtocol

    def fail(self, rnd):
        raise UserError("a failure in round 1")

    monkeypatch.setattr(RoundProtocol, "run_round", fail)
    assert main(["compare", "--methods", "fedavg,fedslip", "--quiet", "--out", str(tmp_path / "run"), *sets()]) == 2
    assert "a failure in round 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_failure_scheduled_after_the_last_round_is_one_line(tmp_path, capsys):
    err = bad(tmp_path, capsys, ["run", *sets(["train.failures=[[3, 1]]"])])  # 2 rounds
    assert "train.failures" in err and "last round (2)" in err


def test_a_comparison_with_local_keeps_failures_after_locals_one_round(tmp_path):
    """local trains in one round; a failure scheduled in round 2 is the other methods' business."""
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "fedavg,local", "--quiet", "--out", str(out),
                 *sets(["train.failures=[[2, 1]]", "method.kstep=false"])]) == 0
    rounds = list(csv.DictReader(open(out / "rounds.csv")))
    assert [r["failed"] for r in rounds if r["method"] == "fedavg"] == ["", "1"]


@pytest.mark.parametrize("text", ['a"b\\c', "line\nbreak\ttab\r", "ctl\x01\x7f", "it's", "Sci/Tech"])
def test_toml_str_round_trips(text):
    import tomllib

    from fedslip.cli_common import toml_str

    assert tomllib.loads(f"x = {toml_str(text)}")["x"] == text


def test_a_multi_seed_run_lists_every_seeds_methods_and_leaves_nothing_when_it_fails_early(tmp_path, capsys,
                                                                                             monkeypatch):
    from fedslip.errors import UserError
    from fedslip.federation.protocol import RoundProtocol
    from fedslip.run_status import queued

    seen = []

    def fail(self, rnd):
        seen.append(sorted(queued(tmp_path / "run")))  # what `fedslip status` would list at this point
        raise UserError("a failure in round 1")

    monkeypatch.setattr(RoundProtocol, "run_round", fail)
    argv = ["compare", "--methods", "fedavg,fedslip", "--seeds", "0,1", "--quiet", "--out", str(tmp_path / "run")]
    assert main([*argv, *sets()]) == 2
    assert seen == [[("fedavg", "0"), ("fedavg", "1"), ("fedslip", "0"), ("fedslip", "1")]]
    assert not list(tmp_path.iterdir())


def test_run_with_several_methods_is_refused_not_cut_to_the_first(tmp_path, capsys):
    err = bad(tmp_path, capsys, ["run", "--method", "fedavg,fedslip", *sets()])
    assert "fedslip compare --methods fedavg,fedslip" in err


def test_a_strategy_typo_in_the_last_method_stops_the_comparison_before_any_training(tmp_path, capsys):
    err = bad(tmp_path, capsys, ["compare", "--methods", "fedavg,fedprox",
                                 *sets(['by_method.fedprox.method.strategy="fedmedain"'])])
    assert "unknown strategy 'fedmedain'" in err


def test_method_strategy_is_case_blind_and_infinite_values_are_refused(tmp_path, capsys):
    assert main(["run", "--method", "fedavg", "--quiet", "--out", str(tmp_path / "ok"),
                 *sets(['method.strategy="Method"', "train.rounds=1"])]) == 0
    capsys.readouterr()
    for k, setting in enumerate(("method.alpha_g=inf", "method.mu=nan", "partition.alpha=inf")):
        (tmp_path / str(k)).mkdir()
        err = bad(tmp_path / str(k), capsys, ["run", "--method", "fedslip", *sets([setting])])
        assert setting.split("=")[0] in err and "finite" in err


def test_a_run_of_the_other_kind_in_the_folder_is_not_overwritten(tmp_path, capsys):
    """A multi-seed run into a single-seed run's folder (and the reverse) would overwrite its comparison
    files and leave a mixed folder: refused, as any run into a used folder is; --resume of the wrong kind
    says which kind the folder holds."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main(["run", "--method", "fedavg", "--quiet", "--out", str(single), *sets(["train.rounds=1"])]) == 0
    assert main(["run", "--method", "fedavg", "--quiet", "--seeds", "0", "--out", str(multi),
                 *sets(["train.rounds=1"])]) == 0
    capsys.readouterr()
    before = (single / "comparison.md").read_bytes()
    for out, extra, says in ((single, ["--seeds", "0"], "earlier run"), (multi, [], "earlier run"),
                             (single, ["--seeds", "0", "--resume"], "a single-seed run"),
                             (multi, ["--resume"], "a multi-seed run")):
        rc = main(["run", "--method", "fedavg", "--quiet", "--out", str(out), *extra, *sets(["train.rounds=1"])])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and says in err, err
    assert (single / "comparison.md").read_bytes() == before and not (single / "seed-0").exists()


def test_an_empty_module_list_is_refused_not_read_as_the_default(tmp_path, capsys):
    err = bad(tmp_path, capsys, ["run", "--method", "fedavg", *sets(["model.target_modules=[]"])])
    assert "model.target_modules = []" in err


def test_a_per_method_epoch_count_that_a_step_budget_overrides_is_refused(tmp_path, capsys):
    err = bad(tmp_path, capsys, ["run", "--preset", "quick", "--method", "fedavg",
                                 *sets(["by_method.fedavg.train.local_epochs=3", "train.local_steps=4"])])
    assert "by_method.fedavg.train.local_epochs has no effect" in err


def test_a_lock_file_removed_between_open_and_lock_is_not_held_in_vain(tmp_path, monkeypatch):
    """The run we waited for may remove its folder (lock file included) between our open and our flock: a
    lock on that deleted file would let a third run in. We take the folder's lock file as it is then."""
    import fcntl
    import shutil

    from fedslip import cli_common
    from fedslip.cli_common import LOCK, exclusive

    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_text("")
    real, raced = cli_common._lock, []

    def racing(handle, folder):
        if not raced:
            raced.append(True)
            shutil.rmtree(folder)  # the previous holder's clean-up, just before we lock
        return real(handle, folder)

    monkeypatch.setattr(cli_common, "_lock", racing)
    with exclusive(out):
        assert raced == [True]  # the folder really went away between the open and the lock
        with open(out / LOCK, "a+") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a third run is kept out


def test_files_are_on_disk_before_they_are_renamed_and_the_rename_after(tmp_path, monkeypatch):
    import os

    from fedslip import atomic

    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: calls.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: calls.append(("replace",)) or real_replace(a, b))
    with atomic.atomic_file(tmp_path / "x.txt") as f:
        f.write("data")
    assert calls == [("fsync", False), ("replace",), ("fsync", True)]
    assert (tmp_path / "x.txt").read_text() == "data"


def test_no_clipping_is_still_a_setting(tmp_path, monkeypatch):
    import torch

    clips = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, clip, *a, **k: clips.append(clip)
                        or real(params, clip, *a, **k))
    assert main(["run", "--method", "fedavg", "--quiet", "--out", str(tmp_path / "x"),
                 *sets(["train.clip=inf", "train.rounds=1"])]) == 0
    assert clips and set(clips) == {float("inf")}  # every step ran with no bound on the gradient norm
