"""Flower's strategies as `method.strategy`: each combines the uploads as its paper says, and touches only
the tensors the method shares. Expected values are computed here from the uploads, independently of Flower."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from flower_util import assert_same_state, run_config

from fedslip.errors import UserError
from fedslip.federation.flower.app import client_app
from fedslip.federation.flower.runtime import config_from_run, runtime_for
from fedslip.federation.flower.server import FlowerServer
from fedslip.federation.flower.local_grid import LocalGrid
from fedslip.federation.flower.strategies import StrategyAggregation, parse_spec
from fedslip.federation.inprocess import Simulation
from fedslip.methods import METHODS

from conftest import tiny_config

N = [1, 2, 3, 4, 5]  # examples per client


def uploads(seed: int, outlier: bool = False):
    g = torch.Generator().manual_seed(seed)
    center = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    ups = []
    for k, n in enumerate(N):
        p = {name: t + 0.1 * torch.randn(t.shape, generator=g) for name, t in center.items()}
        if outlier and k == 4:
            p = {name: t + 50.0 for name, t in p.items()}
        ups.append((p, n))
    return ups


def glob0():
    g = torch.Generator().manual_seed(99)
    return {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g),
            "private.like": torch.randn(2, generator=g)}


def stack(ups, name):
    return torch.stack([p[name].double() for p, _ in ups])


def weighted(ups, name):
    w = torch.tensor([n for _, n in ups], dtype=torch.float64)
    return (stack(ups, name) * (w / w.sum()).view(-1, *[1] * ups[0][0][name].dim())).sum(0)


def check(result, expected: dict, glob):
    assert result["private.like"] is glob["private.like"] or torch.equal(result["private.like"], glob["private.like"])
    for name, t in expected.items():
        assert result[name].dtype == glob[name].dtype
        assert torch.allclose(result[name].double(), t, atol=1e-5), name


def test_fedavg_and_fedprox_are_the_weighted_mean():
    ups, glob = uploads(0), glob0()
    for spec in ("fedavg", "fedprox:mu=0.3"):
        check(StrategyAggregation(spec).aggregate(ups, glob, 1), {k: weighted(ups, k) for k in ("a", "b")}, glob)


def test_fedmedian_and_fedtrimmedavg():
    ups, glob = uploads(1), glob0()
    median = {k: stack(ups, k).sort(0).values[2] for k in ("a", "b")}  # 5 uploads: the middle one
    check(StrategyAggregation("fedmedian").aggregate(ups, glob, 1), median, glob)
    trimmed = {k: stack(ups, k).sort(0).values[1:4].mean(0) for k in ("a", "b")}  # beta 0.2 of 5: drop 1 each end
    check(StrategyAggregation("fedtrimmedavg:beta=0.2").aggregate(ups, glob, 1), trimmed, glob)


def test_krum_picks_the_upload_closest_to_its_neighbours():
    ups, glob = uploads(2, outlier=True), glob0()
    flat = torch.stack([torch.cat([p["a"].flatten(), p["b"]]).double() for p, _ in ups])
    d = torch.cdist(flat, flat) ** 2
    scores = [sum(sorted(d[i, j].item() for j in range(5) if j != i)[:3]) for i in range(5)]  # n - f - 2 = 3
    best = min(range(5), key=lambda i: scores[i])
    assert best != 4  # never the outlier
    check(StrategyAggregation("krum").aggregate(ups, glob, 1), {k: ups[best][0][k].double() for k in ("a", "b")},
          glob)


def test_fedavgm_momentum_over_two_rounds():
    agg, glob = StrategyAggregation("fedavgm:server_momentum=0.9"), glob0()
    ups1, ups2 = uploads(3), uploads(4)
    x0 = {k: glob[k].double() for k in ("a", "b")}
    g1 = agg.aggregate(ups1, glob, 1)
    pg1 = {k: x0[k] - weighted(ups1, k) for k in x0}
    x1 = {k: x0[k] - pg1[k] for k in x0}  # first round: momentum = the pseudo-gradient itself
    check(g1, x1, glob)
    g2 = agg.aggregate(ups2, g1, 2)
    m2 = {k: 0.9 * pg1[k] + (x1[k] - weighted(ups2, k)) for k in x0}
    check(g2, {k: x1[k] - m2[k] for k in x0}, glob)


def test_fedadam_over_two_rounds():
    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    agg, glob = StrategyAggregation(f"fedadam:eta={eta},beta_1={b1},beta_2={b2},tau={tau}"), glob0()
    x = {k: glob[k].double() for k in ("a", "b")}
    m = {k: torch.zeros_like(v) for k, v in x.items()}
    v = {k: torch.zeros_like(t) for k, t in x.items()}
    current = glob
    for rnd, seed in ((1, 5), (2, 6)):
        ups = uploads(seed)
        current = agg.aggregate(ups, current, rnd)
        delta = {k: weighted(ups, k) - x[k] for k in x}
        m = {k: b1 * m[k] + (1 - b1) * delta[k] for k in x}
        v = {k: b2 * v[k] + (1 - b2) * delta[k] ** 2 for k in x}
        lr = eta * math.sqrt(1 - b2 ** (rnd + 1)) / (1 - b1 ** (rnd + 1))
        x = {k: x[k] + lr * m[k] / (v[k].sqrt() + tau) for k in x}
        check(current, x, glob)


def test_strategy_specs():
    assert parse_spec("FedTrimmedAvg: beta = 0.25") == ("fedtrimmedavg", {"beta": 0.25})
    assert parse_spec("fedprox:mu=0.1") == ("fedprox", {"proximal_mu": 0.1})
    for bad, says in (("fedmean", "unknown strategy 'fedmean'"), ("fedadam:eta", "expected name:key=value"),
                      ("method:x=1", "takes no parameters"), ("fedtrimmedavg:beta=0.7", "`beta` must be in"),
                      ("krum:nope=1", "unexpected keyword argument 'nope'")):
        with pytest.raises(UserError, match=f"^method.strategy = '{re.escape(bad)}': .*{re.escape(says)}"):
            StrategyAggregation(bad)


def test_flower_fedprox_strategy_equals_inprocess_fedavg_with_mu(tiny_prep):
    """On Flower, `fedprox:mu=0.5` sends proximal-mu in the train config; clients use it as the global step's
    μ; the server's FedAvg equals the in-process weighted mean (float32 vs float64 accumulation)."""
    rc = run_config("fedavg", method={"strategy": "fedprox:mu=0.5"})
    cfg = config_from_run(rc)
    runtime_for(cfg, dataclasses.replace(tiny_prep, cfg=cfg))
    grid = LocalGrid(client_app, [{"partition-id": k, "num-partitions": 4} for k in range(4)], rc, run_id=31)
    server = FlowerServer(grid, cfg, rc)
    server.run_round(1)
    sent = [m for m, _ in grid.delivered if m.metadata.message_type == "train"]
    assert sent and all(float(m.content["config"]["proximal-mu"]) == 0.5 for m in sent)
    ref_cfg = tiny_config("fedavg", method={"fedavg_mu": 0.5})
    sim = Simulation(tiny_prep, METHODS["fedavg"](ref_cfg))
    sim.run_round(1)
    assert_same_state(server.glob, sim.glob)
    plain = Simulation(tiny_prep, METHODS["fedavg"](tiny_config("fedavg")))
    plain.run_round(1)
    assert any(not torch.allclose(plain.glob[k], sim.glob[k], atol=1e-7) for k in sim.glob)  # μ did matter


def test_the_inprocess_engine_aggregates_with_the_strategy_too(tiny_prep):
    cfg = tiny_config("fedavg", method={"strategy": "fedmedian"})
    sim = Simulation(tiny_prep, METHODS["fedavg"](cfg))
    seen = []
    real = sim.aggregation.aggregate

    def spy(ups, glob, rnd, sent=None):
        seen.append([{k: v.clone() for k, v in p.items()} for p, _ in ups])
        return real(ups, glob, rnd, sent)

    sim.aggregation.aggregate = spy
    sim.run_round(1)
    ups = seen[0]
    for k, t in sim.glob.items():  # 4 uploads: the median is the mean of the middle two
        middle = torch.stack([u[k] for u in ups]).sort(0).values[1:3].mean(0)
        assert torch.allclose(t, middle, atol=1e-6), k


@pytest.mark.parametrize("name", ["flora", "floral", "fedsb"])
def test_methods_with_their_own_aggregation_refuse_a_strategy(name):
    """Their aggregate is part of the method (stacks, masks, the setup's SVD): a Flower strategy averaging
    their uploads would crash or be wrong, so the config is refused with one line, before any data loads."""
    with pytest.raises(UserError, match=f"{name} aggregates by a rule of its own"):
        METHODS[name](tiny_config(name, method={"strategy": "fedmedian"}))
    METHODS[name](tiny_config(name))  # the method's own rule
    METHODS["fedavg"](tiny_config("fedavg", method={"strategy": "fedmedian"}))
