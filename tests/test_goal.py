"""The goal's check under a comparison: each part against fedavg, the half-point slack, seeds counted."""

from __future__ import annotations

from fedslip.evaluation.goal import goal_rows, to_markdown


def row(method, glob=None, personal=None, kstep=None, mib=2.0):
    return {"method": method, "global_acc": glob, "personal_acc_mean": personal, "kstep_acc_mean": kstep,
            "mib_per_round": mib}


FEDAVG = row("fedavg", glob=0.85, personal=0.86, kstep=0.90)


def verdicts(goals):
    return {g["method"]: [p["met"] for p in g["parts"]] + [g["met"]] for g in goals}


def test_each_part_against_fedavg_and_only_personalizing_methods_with_a_global_model():
    rows = [row("local", personal=0.95), FEDAVG, row("fedprox", 0.80, 0.81, 0.85),
            row("fedslip-plus", glob=0.845, personal=0.90), row("fedslip", glob=0.8449, personal=0.95),
            row("dualtrack-naive", glob=0.90, personal=0.8999, mib=2.0001), row("fedsa", personal=0.99)]
    assert verdicts(goal_rows(rows)) == {
        "fedslip-plus": [True, True, True, True],  # equal to K-step, exactly half a point below fedavg: met
        "fedslip": [True, False, True, False],  # 0.51 point below fedavg's global accuracy
        "dualtrack-naive": [False, True, False, False],
    }  # local and fedsa have no global model; fedprox does not personalize


def test_without_fedavg_or_its_k_step_nothing_is_checked_and_nothing_is_written():
    assert goal_rows([row("fedslip", 0.8, 0.9)]) == []
    assert goal_rows([row("fedavg", 0.85, 0.86), row("fedslip", 0.8, 0.9)]) == []
    assert to_markdown([]) == ""


def test_over_seeds_the_verdict_is_on_the_means_with_the_seeds_that_met_each_part():
    per_seed = {0: [row("fedavg", 0.85, 0.86, 0.90), row("fedslip-plus", 0.85, 0.95)],
                1: [row("fedavg", 0.85, 0.86, 0.90), row("fedslip-plus", 0.85, 0.89)],
                2: [row("fedavg", 0.85, 0.86, 0.90), row("fedslip-plus", 0.83, 0.88)]}
    means = [row("fedavg", 0.85, 0.86, 0.90), row("fedslip-plus", (0.85 + 0.85 + 0.83) / 3, (0.95 + 0.89 + 0.88) / 3)]
    (goal,) = goal_rows(means, per_seed)
    assert [(p["met"], p["seeds_met"], p["seeds"]) for p in goal["parts"]] == [
        (True, 1, 3),  # mean 90.7 ≥ 90.0, but only seed 0 reaches its K-step
        (False, 2, 3),  # mean 84.3 < 84.5
        (True, 3, 3)]
    text = to_markdown([goal])
    assert "| fedslip-plus | 90.7 vs 90.0: met (1 of 3 seeds) | 84.3 vs 85.0: NOT met (2 of 3 seeds) |" in text
    assert text.rstrip().endswith("| NOT met |") and "all three (means)" in text


def test_values_that_round_alike_get_the_decimals_that_tell_them_apart():
    """A verdict is on the unrounded numbers: '90.0 vs 90.0: NOT met' would read as a contradiction."""
    (goal,) = goal_rows([FEDAVG, row("fedslip-plus", glob=0.85, personal=0.89996)])
    text = to_markdown([goal])
    assert "| 89.996 vs 90.000: NOT met |" in text
    (goal,) = goal_rows([FEDAVG, row("fedslip-plus", glob=0.85, personal=0.90)])
    assert "| 90.0 vs 90.0: met |" in to_markdown([goal])
    # the same counts, averaged in another order, differ in the last bit: still equal, no extra decimals
    (goal,) = goal_rows([FEDAVG, row("fedslip-plus", glob=0.85, personal=0.90 + 1e-15)])
    assert "| 90.0 vs 90.0: met |" in to_markdown([goal])


def test_the_personal_part_says_how_many_test_examples_the_difference_is():
    from fedslip.evaluation.records import ClientRecord, MethodResult
    from fedslip.evaluation.tables import comparison_rows

    def result(method, view, accs, n_tests, held=()):
        clients = [ClientRecord(k, 100, n, 0, 0.8, None, held_out=k in held) for k, n in enumerate(n_tests)]
        for c, a in zip(clients, accs):
            setattr(c, view, a)
        final = {"global_acc": 0.85, "mib_per_round": 2.0, f"{view}_mean": sum(accs) / len(accs)}
        return MethodResult(method, clients=clients, final=final)

    fedavg = result("fedavg", "kstep_acc", [0.9, 0.95], [500, 400])  # 450 + 380 right
    plus = result("fedslip-plus", "personal_acc", [0.92, 0.94], [500, 400])  # 460 + 376 right
    (goal,) = goal_rows(comparison_rows([fedavg, plus]))
    personal = goal["parts"][0]
    assert (personal["net"], personal["examples"]) == (460 + 376 - 450 - 380, 900)
    assert "(net +6 of 900 examples)" in to_markdown([goal])
    other = result("fedslip-plus", "personal_acc", [0.92, 0.94, 0.5], [500, 400, 10], held=(2,))  # held out: uncounted
    assert goal_rows(comparison_rows([fedavg, other]))[0]["parts"][0]["net"] == 6
    fewer = result("fedslip-plus", "personal_acc", [0.92, float("nan")], [500, 400])  # one client never scored
    assert "net" not in goal_rows(comparison_rows([fedavg, fewer]))[0]["parts"][0]
