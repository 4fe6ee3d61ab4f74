"""The server's new global state is the example-weighted mean of what clients sent."""

from __future__ import annotations

import numpy as np
import torch

from fedslip.federation.inprocess import Simulation
from fedslip.methods import METHODS
from fedslip.methods.base import weighted_mean

from conftest import UNEVEN, tiny_config


def test_weighted_mean_matches_manual_computation():
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3)]
    counts = [10, 30, 60]
    got = weighted_mean([({"w": torch.from_numpy(a)}, n) for a, n in zip(arrays, counts)])["w"]
    expected = (arrays[0] * 10 + arrays[1] * 30 + arrays[2] * 60) / 100
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_round_aggregate_is_weighted_mean_of_uploads(uneven_prep, monkeypatch):
    cfg = tiny_config("fedslip", partition=UNEVEN)
    method = METHODS["fedslip"](cfg)
    sim = Simulation(uneven_prep, method)
    seen = {}
    real = method.aggregate

    def spy(ups, glob, rnd, participants):
        seen["ups"] = [({k: v.clone() for k, v in p.items()}, n) for p, n in ups]
        return real(ups, glob, rnd, participants)

    monkeypatch.setattr(method, "aggregate", spy)
    sim.run_round(1)
    ups = seen["ups"]
    assert [n for _, n in ups] == [len(t) for t in uneven_prep.split.train]
    total, apart = sum(n for _, n in ups), 0.0
    for name in ups[0][0]:
        expected = sum(p[name].double().numpy() * n for p, n in ups) / total
        np.testing.assert_allclose(sim.glob[name].numpy(), expected, rtol=1e-5, atol=1e-7)
        plain = sum(p[name].double().numpy() for p, _ in ups) / len(ups)
        apart = max(apart, float(np.abs(expected - plain).max()))
    assert apart > 1e-4  # clients of different sizes, different uploads: not the plain mean
