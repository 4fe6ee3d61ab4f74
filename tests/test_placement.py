"""Device and precision: a bf16 backbone with fp32 masters stays close to fp32; auto follows the probe."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from fedslip.errors import UserError
from fedslip.federation.inprocess import Simulation
from fedslip.methods import METHODS
from fedslip.model import placement as placement_module
from fedslip.model.placement import Placement, resolve

from conftest import tiny_config


def placed(prep, dtype=torch.bfloat16, device="cpu"):
    backbone = dataclasses.replace(prep.backbone, placement=Placement(torch.device(device), dtype))
    return dataclasses.replace(prep, backbone=backbone)


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


def test_bf16_stores_only_the_frozen_backbone_in_bf16(tiny_prep):
    method = METHODS["fedslip"](tiny_config("fedslip"))
    model = method.build(placed(tiny_prep).backbone)
    ours = set(model._tensors)
    for name, p in model.net.named_parameters():
        want = torch.float32 if name in ours else torch.bfloat16
        assert p.dtype == want, name
    assert model.read(model.global_names)[model.global_names[0]].dtype == torch.float32
    assert tiny_prep.backbone.model.bert.embeddings.word_embeddings.weight.dtype == torch.float32  # not touched


def test_bf16_logits_are_close_to_fp32(tiny_prep):
    method = METHODS["fedavg"](tiny_config("fedavg"))
    fp32 = method.build(tiny_prep.backbone)
    bf16 = method.build(placed(tiny_prep).backbone)
    batch = tiny_prep.test.batch(tiny_prep.split.global_test[:16])
    with torch.no_grad():
        a = fp32.logits(batch.input_ids, batch.attention_mask)
        b = bf16.logits(batch.input_ids, batch.attention_mask)
    assert b.dtype == torch.float32
    assert relative_gap(b, a) < 0.02


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def test_bf16_training_stays_within_tolerance_of_fp32(tiny_prep):
    """Two rounds of FedSLIP (private steps from round 1). The tolerance: every trained global tensor points
    the same way as in fp32 (cosine > 0.95; the LoRA B's start at zero and AdamW's first steps follow the
    gradient's sign, so small entries differ most) and the trained model's logits are within 5 % (relative
    L2); uploads and optimizer states stay fp32."""
    cfg = tiny_config("fedslip", method={"warmup_rounds": 0})
    ref = Simulation(tiny_prep, METHODS["fedslip"](cfg))
    ref_result, _ = ref.run()
    low = Simulation(placed(tiny_prep), METHODS["fedslip"](cfg))
    low_result, ledger = low.run()
    for name, t in ref.glob.items():
        if t.abs().max() > 0:
            assert cosine(low.glob[name], t) > 0.95, name
    batch = tiny_prep.test.batch(tiny_prep.split.global_test[:16])
    with torch.no_grad():
        ref.model.load(ref.method.global_view(ref.model, ref.glob, ref.clients[0]))
        low.model.load(low.method.global_view(low.model, low.glob, low.clients[0]))
        gap = relative_gap(low.model.logits(batch.input_ids, batch.attention_mask),
                           ref.model.logits(batch.input_ids, batch.attention_mask))
    assert gap < 0.05
    assert {e.dtypes for e in ledger.entries} == {"float32"}
    exp_avg = [s["exp_avg"] for s in low.clients[0].optim["private"]["state"].values()]
    assert exp_avg and all(t.dtype == torch.float32 for t in exp_avg)
    for a, b in zip(ref_result.clients, low_result.clients):
        assert abs(a.personal_acc - b.personal_acc) <= 0.15  # 20 test examples each: a few may flip


@pytest.mark.parametrize("speedup,want", [(3.0, torch.bfloat16), (0.3, torch.float32)])
def test_auto_precision_follows_the_probe(monkeypatch, speedup, want):
    monkeypatch.setattr(placement_module, "probe", lambda device: {"fp32_gflops": 100.0,
                                                                   "bf16_gflops": 100.0 * speedup,
                                                                   "bf16_speedup": speedup})
    got = resolve("cpu", "auto")
    assert got.dtype == want and got.info["probe"]["bf16_speedup"] == speedup
    assert resolve("cpu", "fp32").dtype == torch.float32 and resolve("cpu", "bf16").dtype == torch.bfloat16


def test_matmul_rate_times_each_precision():
    for dtype in (torch.float32, torch.bfloat16):  # a real timing: only its sign is certain
        assert placement_module.matmul_rate(torch.device("cpu"), dtype, m=64, k=64, n=64, seconds=0.02) > 0


def fake_rates(monkeypatch, screen, full):
    """matmul_rate answering from two lists, by size: the screen's small matmuls and the full-size ones."""
    calls, screen, full = [], iter(screen), iter(full)

    def rate(device, dtype, m=None, seconds=0.25):
        calls.append(("screen" if m == placement_module.SCREEN_M else "full", dtype))
        return next(screen if m == placement_module.SCREEN_M else full)

    monkeypatch.setattr(placement_module, "matmul_rate", rate)
    monkeypatch.setattr(placement_module, "_PROBES", {})
    return calls


def test_one_stalled_timing_does_not_decide_the_precision(monkeypatch):
    """A machine paused or busy during one timing (the first fp32 one here) still gets the best of three."""
    fake_rates(monkeypatch, [50.0, 90.0, 52.0, 95.0], [0.5, 400.0, 100.0, 410.0, 105.0, 390.0])
    got = placement_module.probe(torch.device("cpu"))
    assert got == {"fp32_gflops": 105.0, "bf16_gflops": 410.0, "bf16_speedup": 3.9, "shape": "1792x384x1536"}


def test_emulated_bf16_is_decided_by_the_screen(monkeypatch):
    """On a CPU without native bf16 one full-size bf16 timing costs seconds: the small screen decides."""
    calls = fake_rates(monkeypatch, [40.0, 1.0, 45.0, 1.2], [])
    got = placement_module.probe(torch.device("cpu"))
    assert calls == [("screen", torch.float32), ("screen", torch.bfloat16)] * 2
    assert got["fp32_gflops"] == 45.0 and got["bf16_gflops"] == 1.2 and got["bf16_speedup"] == 0.03
    assert resolve("cpu", "auto").dtype == torch.float32


def test_one_stalled_bf16_screen_does_not_decide(monkeypatch):
    """bf16 a quarter of fp32 in one screen timing only: the full-size timings decide."""
    calls = fake_rates(monkeypatch, [40.0, 1.0, 41.0, 60.0], [100.0, 300.0, 101.0, 310.0, 99.0, 305.0])
    assert placement_module.probe(torch.device("cpu"))["bf16_gflops"] == 310.0
    assert [c for c in calls if c[0] == "full"] == [("full", torch.float32), ("full", torch.bfloat16)] * 3


def test_emulated_bf16_past_the_screen_ends_after_two_clear_losses(monkeypatch):
    calls = fake_rates(monkeypatch, [40.0, 30.0, 41.0, 31.0], [100.0, 1.2, 104.0, 1.3, 99.0, 1.1])
    got = placement_module.probe(torch.device("cpu"))
    assert [c for c in calls if c[0] == "full"] == [("full", torch.float32), ("full", torch.bfloat16)] * 2
    assert got == {"fp32_gflops": 104.0, "bf16_gflops": 1.3, "bf16_speedup": 0.01, "shape": "1792x384x1536"}


def test_one_stalled_bf16_timing_does_not_end_the_probe(monkeypatch):
    fake_rates(monkeypatch, [40.0, 50.0, 41.0, 52.0], [100.0, 1.0, 100.0, 390.0, 101.0, 400.0])
    assert placement_module.probe(torch.device("cpu"))["bf16_gflops"] == 400.0
    assert resolve("cpu", "auto").dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_one_clear_error():
    with pytest.raises(UserError, match="no CUDA device"):
        resolve("cuda", "auto")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_run_matches_cpu(tiny_prep):
    cfg = tiny_config("fedslip", method={"warmup_rounds": 0})
    ref = Simulation(tiny_prep, METHODS["fedslip"](cfg))
    ref.run()
    gpu = Simulation(placed(tiny_prep, device="cuda"), METHODS["fedslip"](cfg))
    gpu.run()
    assert next(gpu.model.net.parameters()).device.type == "cuda"
    for name, t in ref.glob.items():
        assert gpu.glob[name].device.type == "cpu"
        if t.abs().max() > 0:
            assert relative_gap(gpu.glob[name], t) < 0.05, name


FAULTS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from fedslip.model.cpu_heap import keep_freed_memory
    print(keep_freed_memory(), file=sys.stderr)
for step in range(24):  # 64 MiB allocated and freed, as a training step's activations are
    if step == 16:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_cpu_runs_keep_freed_memory_instead_of_page_faulting():
    """Without the setting each fresh 64 MiB block is a new mmap (16,384 page faults) on every step; with it,
    the heap grows for the first few steps and is then reused (under load it sometimes grows once or twice
    more: at most a quarter of the measured steps' blocks may be fresh)."""
    def faults(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
        return int(done.stdout.strip())

    fresh_every_step = faults("default")
    assert fresh_every_step > 8 * 16384 * 0.9  # the 8 measured steps
    assert faults("keep") < fresh_every_step / 4
    assert resolve("cpu", "fp32").info["freed_memory"].startswith("kept")


@pytest.mark.parametrize("capability,want", [((7, 0), torch.float32), ((7, 5), torch.float32), ((8, 0), torch.bfloat16),
                                             ((9, 0), torch.bfloat16)])
def test_auto_on_a_gpu_takes_bf16_only_where_it_is_native(monkeypatch, capability, want):
    """torch's is_bf16_supported() says yes on a V100 or T4, which only emulate bf16: auto must not pick it
    there, and an explicit bf16 is refused."""
    monkeypatch.setattr(placement_module, "resolve_device", lambda setting: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    assert resolve("cuda", "auto").dtype == want
    if want == torch.float32:
        with pytest.raises(UserError, match="no native bf16"):
            resolve("cuda", "bf16")
