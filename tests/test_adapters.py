"""The dual-track layer computes what its formula says; masks keep exactly the largest weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedslip.model.adapters import DualLoRALinear, magnitude_mask


def make_layer(seed=0, r_g=2, r_p=4):
    torch.manual_seed(seed)
    layer = DualLoRALinear(nn.Linear(6, 5), r_g=r_g, alpha_g=4.0, r_p=r_p, alpha_p=12.0, dropout=0.0)
    with torch.no_grad():
        for p in (layer.g_A, layer.g_B, layer.p_A, layer.p_B):
            p.normal_()
        layer.p_A_mask.copy_((torch.rand_like(layer.p_A_mask) > 0.5).float())
        layer.p_B_mask.copy_((torch.rand_like(layer.p_B_mask) > 0.5).float())
    return layer


def reference_output(layer, x, private=True):
    w, b = layer.base.weight.detach().numpy(), layer.base.bias.detach().numpy()
    xa = x.numpy()
    y = xa @ w.T + b
    y = y + (4.0 / 2) * xa @ layer.g_A.detach().numpy().T @ layer.g_B.detach().numpy().T
    if private:
        pa = (layer.p_A * layer.p_A_mask).detach().numpy()
        pb = (layer.p_B * layer.p_B_mask).detach().numpy()
        y = y + (12.0 / 4) * xa @ pa.T @ pb.T
    return y


def test_forward_matches_formula_in_each_mode():
    layer = make_layer()
    x = torch.randn(3, 6)
    for mode, private in (("both", True), ("private", True), ("global", False)):
        layer.mode = mode
        np.testing.assert_allclose(layer(x).detach().numpy(), reference_output(layer, x, private), rtol=1e-5, atol=1e-5)


def test_private_mode_sends_gradients_only_to_private_track():
    layer = make_layer()
    layer.mode = "private"
    layer(torch.randn(3, 6)).sum().backward()
    assert layer.g_A.grad is None and layer.g_B.grad is None
    assert layer.p_A.grad is not None and layer.p_A.grad.abs().sum() > 0


def test_private_mode_passes_gradients_through_the_frozen_weight_to_layers_below():
    """Two stacked layers: the private step's gradients on the lower layer's private track are those of
    W x + detach(global track's output) + private track, written out by hand: only the global track's output
    is a constant, the frozen weight's path still carries gradients down."""
    def by_hand(layer, x):
        glob = (x @ layer.g_A.T @ layer.g_B.T * layer.scale_g).detach()
        return layer.base(x) + glob + x @ (layer.p_A * layer.p_A_mask).T @ (layer.p_B * layer.p_B_mask).T * layer.scale_p

    def grads(forward) -> list[torch.Tensor]:
        lower, upper = make_layer(0, r_p=4), make_layer(1, r_p=4)
        upper.base = nn.Linear(5, 5)
        upper.g_A, upper.p_A = nn.Parameter(torch.randn(2, 5)), nn.Parameter(torch.randn(4, 5))
        upper.p_A_mask = torch.ones(4, 5)
        lower.mode = upper.mode = "private"
        torch.manual_seed(3)
        forward(upper, forward(lower, torch.randn(3, 6))).square().sum().backward()
        assert lower.g_A.grad is None and upper.g_B.grad is None
        return [lower.p_A.grad, lower.p_B.grad]

    for got, want in zip(grads(lambda layer, x: layer(x)), grads(by_hand)):
        torch.testing.assert_close(got, want)


def test_global_mode_ignores_private_track():
    layer = make_layer()
    layer.mode = "global"
    layer(torch.randn(3, 6)).sum().backward()
    assert layer.p_A.grad is None and layer.p_B.grad is None
    assert layer.g_B.grad.abs().sum() > 0


def test_masked_out_private_weights_have_no_effect_and_no_gradient():
    layer = make_layer()
    x = torch.randn(3, 6)
    before = layer(x).detach()
    with torch.no_grad():
        layer.p_A.add_(100.0 * (1 - layer.p_A_mask))  # change only masked-out entries
    torch.testing.assert_close(layer(x).detach(), before)
    layer(x).sum().backward()
    assert torch.all(layer.p_A.grad[layer.p_A_mask == 0] == 0)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.75, 0.9])
def test_magnitude_mask_keeps_the_largest_weights(sparsity):
    w = torch.randn(16, 24)
    mask = magnitude_mask(w, sparsity, torch.Generator().manual_seed(0))
    keep = round((1 - sparsity) * w.numel())
    assert int(mask.sum()) == keep
    threshold = np.sort(np.abs(w.numpy()).ravel())[::-1][keep - 1]  # keep-th largest magnitude
    assert np.all(np.abs(w.numpy())[mask.numpy() == 1] >= threshold)
    assert np.all(np.abs(w.numpy())[mask.numpy() == 0] <= threshold)


def test_mask_of_constant_tensor_is_a_seeded_random_subset():
    w = torch.zeros(40, 8)
    a = magnitude_mask(w, 0.75, torch.Generator().manual_seed(1))
    b = magnitude_mask(w, 0.75, torch.Generator().manual_seed(1))
    c = magnitude_mask(w, 0.75, torch.Generator().manual_seed(2))
    assert int(a.sum()) == 80
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a[:10].sum() < 80  # not simply the first rows


def test_lora_dropout_is_unbiased_and_off_in_eval():
    torch.manual_seed(0)
    layer = DualLoRALinear(torch.nn.Linear(16, 8), 4, 8.0, 0, 1.0, dropout=0.3)
    with torch.no_grad():
        layer.g_A.normal_()
        layer.g_B.normal_()
    x = torch.randn(5, 16)
    layer.mode = "global"
    layer.eval()
    with torch.no_grad():
        clean = layer(x) - layer.base(x)
        layer.train()
        draws = torch.stack([layer(x) - layer.base(x) for _ in range(4000)])
        dropped, _ = layer.drop(torch.ones(200, 200))
    assert abs(float((dropped == 0).float().mean()) - 0.3) < 0.01  # the rate asked for
    assert not torch.allclose(draws[0], clean)  # training draws differ
    torch.testing.assert_close(draws.mean(0), clean, rtol=0, atol=0.05 * float(clean.abs().max()))


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_cheap_dropout_backbone_computes_what_the_original_computes(kind):
    """Eval mode, a padded batch: the same logits as the model as loaded (masking included); in training,
    the backbone's dropouts and attention dropout draw cheap masks at the backbone's own rate."""
    from fedslip.model.adapted import AdaptedModel
    from fedslip.model.backbone import load_backbone
    from fedslip.model.cheap_dropout import CheapDropout

    backbone = load_backbone(f"tiny-random:{kind}", 3, 0)
    model = AdaptedModel.dual(backbone, None, 2, 4.0, 0, 1.0, 0.0)
    ids = torch.randint(1000, 2000, (4, 12))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    with torch.no_grad():
        want = backbone.model(input_ids=ids, attention_mask=mask).logits
        got = model.logits(ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    drops = [m for m in model.net.modules() if isinstance(m, CheapDropout)]
    assert drops and not any(type(m) is nn.Dropout for m in model.net.modules())
    model.net.train()
    with torch.no_grad():
        assert not torch.allclose(model.logits(ids, mask), model.logits(ids, mask))  # dropout is on


def test_a_fresh_model_evaluates_without_dropout(tiny_prep):
    """A resumed run or a Flower node may evaluate before it has trained once in this process."""
    from fedslip.methods import METHODS
    from conftest import tiny_config

    model = METHODS["fedslip"](tiny_config("fedslip", method={"dropout": 0.5})).build(tiny_prep.backbone)
    assert not any(m.training for m in model.net.modules())


def test_drop_positions_are_a_bernoulli_draw_per_position():
    """Dropped positions come from geometric gaps: over many draws each position is dropped with
    probability p (first, middle and last positions alike), gaps of one occur with probability p as in
    independent draws, the positions are sorted, distinct and in range, and torch's seeded stream decides
    them, a first draw too short completed from it without a seam."""
    from fedslip.model.cheap_dropout import drop_positions

    torch.manual_seed(0)
    n, p, draws = 1000, 0.1, 3000
    counts = torch.zeros(n)
    for _ in range(draws):
        at = drop_positions(n, p, torch.device("cpu"))
        assert int(at.min()) >= 0 and int(at.max()) < n and bool((at.diff() > 0).all())
        counts[at] += 1
    per_position = counts / draws  # each ~ Binomial(3000, 0.1) / 3000: sd 0.0055
    assert abs(float(per_position.mean()) - p) < 0.002
    for block in (per_position[:50], per_position[475:525], per_position[-50:]):
        assert abs(float(block.mean()) - p) < 0.004
    for edge in (per_position[0], per_position[1], per_position[-1]):  # the first and last positions too
        assert abs(float(edge) - p) < 0.03
    gaps = drop_positions(2_000_000, p, torch.device("cpu")).diff().float()  # ~200,000 gaps, mean 1/p
    assert abs(float((gaps == 1).float().mean()) - p) < 0.003  # the next one dropped too: probability p
    assert abs(float(gaps.mean()) - 1 / p) < 0.1 and abs(float((gaps > 30).float().mean()) - (1 - p) ** 30) < 0.003
    # a first draw too short is completed from the same stream: exactly the positions of one long draw
    torch.manual_seed(5)
    short = drop_positions(100_000, p, torch.device("cpu"), first=16)
    torch.manual_seed(5)
    assert torch.equal(drop_positions(100_000, p, torch.device("cpu")), short)
    assert not torch.equal(drop_positions(100_000, p, torch.device("cpu"))[:100], short[:100])  # fresh draws differ
    assert drop_positions(10, 0.0, torch.device("cpu")).numel() == 0


@pytest.mark.parametrize("path", ["positions", "mask"])
@pytest.mark.parametrize("scale", [1 / 0.75, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_zeroes_the_same_elements_forward_and_backward(path, scale, dtype):
    """The dropout's gradient is `scale` times the incoming one where the forward kept an element and 0
    where it dropped one, for a non-contiguous input and a non-contiguous incoming gradient, without
    touching either; the mask path (used off the CPU) is run here on CPU tensors."""
    from fedslip.model import cheap_dropout as cd

    drop = cd.dropped if path == "positions" else cd.dropped_by_mask
    torch.manual_seed(1)
    x = torch.randn(40, 30).to(dtype).t().requires_grad_()  # non-contiguous
    before = x.detach().clone()
    y = drop(x, 0.25, scale)
    weights = torch.randn(40, 30).to(dtype)
    (y.t() * weights).sum().backward()  # y's gradient arrives as weights.t(): non-contiguous
    kept = y != 0
    assert abs(float(kept.float().mean()) - 0.75) < 0.06
    assert torch.equal(x.detach(), before)
    torch.testing.assert_close(y[kept], (before * scale)[kept])
    torch.testing.assert_close(x.grad[kept], (weights.t() * scale)[kept])
    assert bool((x.grad[~kept] == 0).all())
    assert torch.equal(cd.cheap_dropout(x, 0.25, False), x)


def test_cheap_dropout_at_p_one_drops_everything_as_nn_dropout_does():
    """A backbone's own config may say p = 1 (ours reject it): everything dropped, no gradient through."""
    from fedslip.model.cheap_dropout import cheap_dropout

    x = torch.randn(7, 5, requires_grad=True)
    y = cheap_dropout(x, 1.0, True)
    assert torch.equal(y, torch.nn.functional.dropout(x, 1.0, True))
    y.sum().backward()
    assert bool((x.grad == 0).all())
