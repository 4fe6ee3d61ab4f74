"""Training and evaluation throughput of the real backbone against this machine's matmul rate, in one run.

    python benchmarks/throughput.py [--batch 32] [--length 56] [--seconds 20] [--backbone-dropout 0.1] [--precisions fp32]

For each precision (fp32, and bf16 with the frozen backbone stored in bf16 — what `train.precision`
chooses), measures in the same process: the matmul rate of MiniLM's feed-forward shape, FedSLIP's global
and private training steps, and evaluation. A training sample costs ≈ 4·P·L FLOPs (P: the encoder's linear
weights, L: tokens; the backbone is frozen, so the backward pass computes activation gradients only) and an
evaluated one ≈ 2·P·L; efficiency = achieved FLOP rate / matmul rate. Also times the same training step
under plain bf16 autocast over an fp32-stored backbone (what re-casts every frozen weight every step).
`--precisions fp32,bf16,fp32-bf16math` adds fp32 with oneDNN's bf16 math for fp32 matmuls
(`torch.backends.mkldnn.matmul.fp32_precision = "bf16"`, CPU only; its matmul rate measured the same way).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from fedslip.model.adapted import AdaptedModel
from fedslip.model.backbone import load_backbone
from fedslip.model.cpu_heap import keep_freed_memory
from fedslip.model.placement import Placement, matmul_rate

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def encoder_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and ".encoder." in f".{name}")


def rate(fn, seconds: float) -> float:
    """Calls per second of `fn`, after a warm-up."""
    fn()
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def build(dtype: torch.dtype, dropout: float = 0.0) -> AdaptedModel:
    backbone = load_backbone(MINILM, 4, 0, dropout)
    backbone.placement = Placement(torch.device("cpu"), dtype)
    return AdaptedModel.dual(backbone, None, 8, 16.0, 32, 64.0, 0.1)


def step_fn(model: AdaptedModel, ids, mask, labels, mode: str, names: list[str], autocast_only: bool = False):
    params = model.params(names)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def run():
        model.net.train()
        model.set_trainable(names)
        with model.mode(mode):
            if autocast_only:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = model.net(input_ids=ids, attention_mask=mask).logits.float()
            else:
                logits = model.logits(ids, mask)
            loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=56)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--backbone-dropout", type=float, default=0.0,
                    help="the backbone's dropout rate (0: off, as the quick preset; 0.1: MiniLM's own, as the paper preset)")
    ap.add_argument("--default-heap", action="store_true",
                    help="leave glibc's malloc as it is (a run on CPU keeps freed memory, as measured by default)")
    ap.add_argument("--precisions", default="fp32,bf16",
                    help="which to measure (fp32 is always measured: the other rows are compared with it); "
                         "on a CPU without native bf16 each bf16 measurement takes minutes")
    args = ap.parse_args()
    wanted = {"fp32"} | set(args.precisions.split(","))
    heap = "default" if args.default_heap else keep_freed_memory()
    b, length = args.batch, args.length
    ids = torch.randint(1000, 20000, (b, length))
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 4, (b,))
    eval_ids = torch.randint(1000, 20000, (128, length))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {b} x {length} tokens, "
          f"{args.seconds:.0f} s per measurement; backbone dropout {args.backbone_dropout}; freed memory: {heap}")
    rows = []
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp32-bf16math", torch.float32)):
        if label not in wanted:
            continue
        torch.backends.mkldnn.matmul.fp32_precision = "bf16" if label == "fp32-bf16math" else "none"
        model = build(dtype, args.backbone_dropout)
        p = encoder_weights(model.net)
        mm = matmul_rate(torch.device("cpu"), dtype, seconds=3.0)
        g = rate(step_fn(model, ids, mask, labels, "global", model.global_names + model.head_names), args.seconds)
        pr = rate(step_fn(model, ids, mask, labels, "private", model.private_names), args.seconds)

        def evaluate():
            model.net.eval()
            with torch.inference_mode():
                model.logits(eval_ids, torch.ones_like(eval_ids))

        e = rate(evaluate, args.seconds)
        train_gflops = g * b * 4 * p * length / 1e9
        eval_gflops = e * 128 * 2 * p * length / 1e9
        rows.append((label, mm, g * b, pr * b, e * 128, train_gflops / mm, eval_gflops / mm))
        if label == "fp32" and "bf16" in wanted:
            auto = rate(step_fn(model, ids, mask, labels, "global", model.global_names + model.head_names, True),
                        args.seconds)
            autocast_row = auto * b
    print(f"P = {p / 1e6:.2f} M encoder weights")
    print("| precision | matmul GFLOP/s | global step samples/s | private step samples/s | eval samples/s | "
          "training / matmul rate | eval / matmul rate |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, mm, g, pr, e, te, ee in rows:
        print(f"| {label} | {mm:.0f} | {g:.1f} | {pr:.1f} | {e:.1f} | {100 * te:.0f} % | {100 * ee:.0f} % |")
    if "bf16" in wanted:
        print(f"bf16 autocast over the fp32-stored backbone: global step {autocast_row:.1f} samples/s")
    for label, _, g, _, e, _, _ in rows[1:]:
        print(f"{label} / fp32: global step x{g / rows[0][2]:.2f}, eval x{e / rows[0][4]:.2f}")


if __name__ == "__main__":
    main()
