"""The reference code's behaviours as options (docs/fidelity.md): each one switchable, each doing what it says."""

from __future__ import annotations

import pytest
import torch

from fedslip.config import MethodConfig, load_config
from fedslip.errors import UserError
from fedslip.federation.inprocess import Simulation
from fedslip.methods import METHODS, method_for
from fedslip.model.adapters import magnitude_mask

from conftest import tiny_config


def test_keeping_ties_keeps_every_weight_at_the_threshold():
    gen = torch.Generator().manual_seed(0)
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, -2.0, 0.0, 1.0]])
    assert magnitude_mask(w, 0.75, gen, "keep").sum() == 2  # 3 and -2: no tie at the threshold
    assert magnitude_mask(torch.zeros(4, 8), 0.75, gen, "keep").sum() == 32  # a zero B: all kept
    assert magnitude_mask(torch.zeros(4, 8), 0.75, gen, "random").sum() == 8  # exactly the top 25 %


def test_fresh_private_optimizer_forgets_its_moments(tiny_prep):
    def private_state(choice: str):
        cfg = tiny_config("fedslip", method={"warmup_rounds": 0, "private_optimizer": choice})
        sim = Simulation(tiny_prep, METHODS["fedslip"](cfg))
        sim.run_round(1)
        first = sim.clients[0].optim["private"]["state"][0]["step"].item()
        sim.run_round(2)
        return first, sim.clients[0].optim["private"]["state"][0]["step"].item()

    first, second = private_state("persist")
    assert second == 2 * first
    first, second = private_state("fresh")
    assert second == first


def test_global_step_with_private_track_on_sees_the_private_output(tiny_prep):
    """The private output enters the global step only when the option says so, and only once it is non-zero:
    in a warmup round (no private steps, B still zero) both choices train the same global track."""
    def global_after_round_1(choice: str, warmup: int):
        cfg = tiny_config("fedslip", method={"warmup_rounds": warmup, "global_step_private": choice})
        sim = Simulation(tiny_prep, METHODS["fedslip"](cfg))
        sim.run_round(1)
        return sim.glob

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(global_after_round_1("off", 1), global_after_round_1("on", 1))
    assert not same(global_after_round_1("off", 0), global_after_round_1("on", 0))


def test_live_global_output_in_the_private_step_changes_only_the_private_track(tiny_prep):
    """`private_step_global = "live"` (the reference, by accident) lets the private loss reach lower layers
    through the global track's path as well: other private weights, the same global track."""
    def after_round_1(choice: str):
        cfg = tiny_config("fedslip", method={"warmup_rounds": 0, "private_step_global": choice})
        sim = Simulation(tiny_prep, METHODS["fedslip"](cfg))
        sim.run_round(1)
        private = {k: v for k, v in sim.clients[0].tensors.items() if k.startswith("p_") or ".p_" in k}
        return sim.glob, private

    glob_c, private_c = after_round_1("constant")
    glob_l, private_l = after_round_1("live")
    assert private_c and all(torch.equal(glob_c[k], glob_l[k]) for k in glob_c)
    assert not all(torch.equal(private_c[k], private_l[k]) for k in private_c)


def test_head_modules_put_the_pooler_into_the_head(tiny_prep):
    cfg = tiny_config("fedavg", model={"head_modules": ["bert.pooler", "classifier"]})
    model = method_for(cfg).build(tiny_prep.backbone)
    assert any(n.startswith("bert.pooler.") for n in model.head_names)
    default = method_for(tiny_config("fedavg")).build(tiny_prep.backbone)
    assert all(n.startswith("classifier.") for n in default.head_names)
    with pytest.raises(UserError, match="head_modules"):
        method_for(tiny_config("fedavg", model={"head_modules": ["nothing"]})).build(tiny_prep.backbone)


def test_reference_preset_sets_each_method_its_own_way():
    cfg = load_config(preset="reference")
    assert cfg.for_method("fedslip").method.head == "frozen"
    assert cfg.for_method("fedavg").method.head is None
    assert "pre_classifier" in cfg.for_method("fedavg").model.head_modules
    assert cfg.for_method("fedslip").model.head_modules is None
    assert cfg.for_method("fedslip").method.dropout == 0.0 and cfg.for_method("fedavg").method.dropout == 0.1
    # the reference's FedProx term was inert in its FedSLIP only: fedprox keeps the default μ
    assert cfg.for_method("fedslip").method.mu == 0.0 and cfg.for_method("fedprox").method.mu == MethodConfig().mu > 0
    assert (cfg.method.mask_ties, cfg.method.private_optimizer, cfg.method.global_step_private,
            cfg.method.private_step_global) == ("keep", "fresh", "on", "live")


def test_by_method_never_changes_the_data():
    with pytest.raises(UserError, match="may set only"):
        load_config(sets=["by_method.fedavg.partition={n_train=5}"])
