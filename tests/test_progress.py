"""Progress lines in a log: the time left follows the cost of the rounds to come, also after a resume."""

from __future__ import annotations

import io

import fedslip.progress as progress
from fedslip.evaluation.records import RoundRecord
from fedslip.methods import METHODS
from fedslip.run_status import time_left

from conftest import tiny_config


def test_time_left_weighs_rounds_by_cost_and_ignores_rounds_done_before_a_resume(monkeypatch):
    clock = iter([1000.0, 1100.0])  # the task starts, then one round takes 100 s
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    task = progress.PlainProgress(out).task("fedslip: rounds", 4, [1.0, 1.0, 2.0, 2.0])
    task.advance()  # round 1, done before the resume: not timed
    task.advance(RoundRecord(round=2, train_loss=0.5, mib_round=1.0, mib_cumulative=2.0))
    line = out.getvalue()
    assert "fedslip 2/4" in line and "elapsed 0:01:40" in line
    assert "left ~0:06:40" in line  # 100 s for a round of cost 1; rounds of cost 2 + 2 to come


def test_fedslip_rounds_with_private_steps_cost_twice():
    cfg = tiny_config("fedslip", train={"rounds": 4}, method={"warmup_rounds": 2})
    assert [METHODS["fedslip"](cfg).round_cost(r) for r in range(1, 5)] == [1.0, 1.0, 2.0, 2.0]
    assert [METHODS["fedavg"](tiny_config("fedavg")).round_cost(r) for r in (1, 2)] == [1.0, 1.0]
    assert time_left(600.0, 1, [1.0, 2.0, 2.0]) == 2400.0
