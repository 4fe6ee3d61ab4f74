"""The goal's paired comparison: clients report which test examples the personal and K-step views got right
(`train.eval_per_example`), and the goal check counts the examples won and lost and bounds the difference."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedslip.evaluation.goal import goal_rows, paired, to_markdown
from fedslip.evaluation.records import ClientRecord, MethodResult
from fedslip.evaluation.tables import comparison_rows
from fedslip.federation.inprocess import Simulation
from fedslip.federation.protocol import RoundProtocol
from fedslip.methods import METHODS

from conftest import tiny_config


def bits(right) -> str:
    return "".join("1" if r else "0" for r in right)


def test_won_and_lost_are_the_examples_only_one_side_got_right():
    ours, theirs = ["1100", "101"], ["1010", "011"]  # client 0: won 1 lost 1; client 1: won 1 lost 1
    assert {k: paired(ours, theirs)[k] for k in ("won", "lost")} == {"won": 2, "lost": 2}
    same = paired(["1101", "01"], ["1101", "01"])
    assert (same["won"], same["lost"], same["low"], same["high"]) == (0, 0, 0.0, 0.0)
    everywhere = paired(["111", "11"], ["000", "00"])  # every resample: a difference of 1
    assert everywhere["low"] == everywhere["high"] == pytest.approx(1.0)


def test_the_interval_matches_the_normal_approximation_of_the_paired_difference():
    """With large test sets the bootstrap interval of the mean client difference is close to
    mean ± 1.96 · sqrt(Σ_k var(d_k) / n_k) / K, computed here from the per-example differences."""
    gen = np.random.default_rng(5)
    ours, theirs, means, variances = [], [], [], []
    for n, p_ours, p_theirs in [(600, 0.93, 0.90), (500, 0.85, 0.88), (700, 0.95, 0.91)]:
        a, b = gen.random(n) < p_ours, gen.random(n) < p_theirs
        ours.append(bits(a)), theirs.append(bits(b))
        d = a.astype(float) - b.astype(float)
        means.append(d.mean()), variances.append(d.var() / n)
    centre, se = np.mean(means), math.sqrt(sum(variances)) / len(means)
    got = paired(ours, theirs)
    assert got["low"] == pytest.approx(centre - 1.96 * se, abs=0.15 * se)
    assert got["high"] == pytest.approx(centre + 1.96 * se, abs=0.15 * se)
    assert paired(ours, theirs) == got  # the same answers, the same interval


def test_examples_that_are_not_the_same_are_not_compared():
    assert paired(["1100"], ["110"]) is None
    assert paired(["1100", "1"], ["1100"]) is None
    assert paired([], []) is None
    assert paired([""], [""]) is None


def result(method, view, right, glob=0.85):
    clients = [ClientRecord(k, 100, len(r), 0, None, None) for k, r in enumerate(right)]
    for c, r in zip(clients, right):
        setattr(c, f"{view}_acc", r.count("1") / len(r))
        setattr(c, f"{view}_right", r)
    final = {"global_acc": glob, "mib_per_round": 2.0,
             f"{view}_acc_mean": float(np.mean([r.count("1") / len(r) for r in right]))}
    return MethodResult(method, clients=clients, final=final)


def test_the_goal_table_says_won_lost_and_the_interval_and_only_for_one_seed():
    fedavg = result("fedavg", "kstep", ["1101", "1110"])
    plus = result("fedslip-plus", "personal", ["1111", "1010"])  # won 1 (client 0), lost 1 (client 1)
    rows = comparison_rows([fedavg, plus])
    (goal,) = goal_rows(rows)
    part = goal["parts"][0]
    assert (part["net"], part["paired"]["won"], part["paired"]["lost"]) == (0, 1, 1)
    text = to_markdown([goal])
    assert "(net +0 of 8 examples: 1 won, 1 lost; difference " in text and "95 % interval)" in text
    assert "won / lost: test examples only" in text
    means = [{k: v for k, v in r.items() if not k.endswith(("_right", "_correct"))} for r in rows]
    (over_seeds,) = goal_rows(means, {0: rows, 1: rows})  # the seeds' answers pooled: twice the counts
    assert {k: over_seeds["parts"][0]["paired"][k] for k in ("won", "lost")} == {"won": 2, "lost": 2}
    assert "(2 of 2 seeds; pooled: 2 won, 2 lost; difference " in to_markdown([over_seeds])
    one_short = {0: rows, 1: [{k: v for k, v in r.items() if not k.endswith("_right")} for r in rows]}
    assert "paired" not in goal_rows(means, one_short)[0]["parts"][0]  # a seed without answers: no pooling


def test_pooling_seeds_narrows_the_interval():
    """Three seeds' answers, each as one seed alone gives them: pooled, the interval is narrower than any one's."""
    gen = np.random.default_rng(7)
    seeds = [([bits(gen.random(200) < 0.92)], [bits(gen.random(200) < 0.90)]) for _ in range(3)]
    alone = [paired(o, t) for o, t in seeds]
    pooled = paired([c for o, _ in seeds for c in o], [c for _, t in seeds for c in t])
    assert pooled["won"] == sum(a["won"] for a in alone) and pooled["lost"] == sum(a["lost"] for a in alone)
    assert pooled["high"] - pooled["low"] < min(a["high"] - a["low"] for a in alone)


def test_clients_report_the_right_answers_of_the_views_they_score(tiny_prep, tmp_path):
    """Each reported string is the final personal (synced) view's and the K-step view's right answers on the
    client's test examples, in the order of its test split, recomputed here from the trained states."""
    from fedslip.evaluation.outputs import write_outputs

    sim = Simulation(tiny_prep, METHODS["fedslip-plus"](tiny_config("fedslip-plus")))
    plus, ledger = sim.run()
    method, model = sim.method, sim.model
    for c in plus.clients:
        idx = tiny_prep.split.test[c.client]
        model.load(method.personal_view(model, method.down_payload(sim.glob, c.client), sim.clients[c.client]))
        with torch.inference_mode(), model.mode("both"):
            b = next(iter(tiny_prep.test.eval_batches(idx, 10_000)))  # ordered as the batch says (b.index)
            right = dict(zip(b.index.tolist(), (model.logits(b.input_ids, b.attention_mask).argmax(-1)
                                                == b.labels).tolist()))
        assert c.personal_right == bits(right[i] for i in idx)
        assert c.personal_right.count("1") == round(c.personal_acc * c.n_test)
    fedavg, fedavg_ledger = Simulation(tiny_prep, METHODS["fedavg"](tiny_config("fedavg"))).run()
    for c in fedavg.clients:
        assert len(c.kstep_right) == c.n_test and c.kstep_right.count("1") == round(c.kstep_acc * c.n_test)
    (goal,) = goal_rows(comparison_rows([fedavg, plus]))
    assert "paired" in goal["parts"][0]
    write_outputs(tmp_path, tiny_prep, [(fedavg, fedavg_ledger), (plus, ledger)])
    saved = json.loads((tmp_path / "results.json").read_text())["methods"]["fedslip-plus"]["clients"]
    assert [c["personal_right"] for c in saved] == [c.personal_right for c in plus.clients]
    assert "_right" not in (tmp_path / "clients.csv").read_text().splitlines()[0]


def test_with_eval_per_example_off_only_accuracies_leave_the_clients(tiny_prep):
    off = {"train": {"eval_per_example": False}}
    plus, _ = Simulation(tiny_prep, METHODS["fedslip-plus"](tiny_config("fedslip-plus", **off))).run()
    fedavg, _ = Simulation(tiny_prep, METHODS["fedavg"](tiny_config("fedavg", **off))).run()
    assert all(c.personal_right is None and c.personal_acc is not None for c in plus.clients)
    assert all(c.kstep_right is None and c.kstep_acc is not None for c in fedavg.clients)
    (goal,) = goal_rows(comparison_rows([fedavg, plus]))
    assert "net" in goal["parts"][0] and "paired" not in goal["parts"][0]


class Reported:
    """Just what `_right_answers` reads of a protocol: a client's test size and the method's name."""

    def __init__(self, n_test: int):
        self.n_test = n_test
        self.method = type("M", (), {"name": "fedslip-plus"})()

    def test_size(self, cid: int) -> int:
        return self.n_test


@pytest.mark.parametrize("bad,acc", [("10", 0.75), ("1021", 0.75), ("1111", 0.75), (1101, 0.75), ("11 1", 0.75),
                                     ("1101", float("nan")), ("1101", float("inf")), ("1101", "0.75")])
def test_a_report_that_does_not_fit_its_test_set_or_its_accuracy_is_left_out(bad, acc, capsys):
    """4 test examples: too short, not 0/1, disagreeing with the accuracy, not a string; an accuracy that is
    not a finite number (a client's report is checked, it does not stop the server)."""
    answer = {"personal-acc": acc, "personal-right": bad, "kstep-acc": 0.5, "kstep-right": "0101"}
    kept = RoundProtocol._right_answers(Reported(4), 0, answer)
    assert kept == {"kstep": "0101"}
    assert "personal-right" in capsys.readouterr().err


def test_the_reports_cross_a_flower_message_unchanged():
    from fedslip.federation.exchange import Answer
    from fedslip.federation.flower.client import answer_content, content_answer

    answer = Answer(None, {"num-examples": 3}, {"personal-acc": 2 / 3, "personal-right": "101"})
    assert content_answer(answer_content(answer)).evaluation == {"personal-acc": 2 / 3, "personal-right": "101"}
