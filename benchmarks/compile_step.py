"""`torch.compile` of the backbone against eager, on one training step, in one process.

    python benchmarks/compile_step.py [--precision bf16] [--backbone-dropout 0.1] [--rounds 3] [--seconds 4]
                                      [--native-dropout]

The same model and step as `throughput.py` (batch 32 × 56 tokens, fixed, so one compiled graph serves every
step; real runs' length-bucketed batches would recompile per length). Compiles once, then alternates eager
and compiled timings, so that drifts of a shared machine hit both. `--native-dropout` compiles a second
model whose backbone has `nn.Dropout` and SDPA attention instead of our cheap masks and eager attention, so
that inductor can draw the random numbers inside its fused kernels; eager stays ours. Without it, the
compiled model keeps our dropout, whose positions have a data-dependent count: the graph breaks at each
dropout, and inductor compiles the pieces between them.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from fedslip.model.cheap_dropout import CheapDropout
from fedslip.model.cpu_heap import keep_freed_memory
from throughput import build, rate, step_fn


def native_dropout(model) -> None:
    for module in list(model.net.modules()):
        for name, child in list(module.named_children()):
            if type(child) is CheapDropout:
                setattr(module, name, nn.Dropout(child.p))
    model.net.set_attn_implementation("sdpa")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--backbone-dropout", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--native-dropout", action="store_true")
    args = ap.parse_args()
    keep_freed_memory()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    ids = torch.randint(1000, 20000, (32, 56))
    mask, labels = torch.ones_like(ids), torch.randint(0, 4, (32,))
    model = build(dtype, args.backbone_dropout)
    other = build(dtype, args.backbone_dropout) if args.native_dropout else model
    if args.native_dropout:
        native_dropout(other)
    eager_forward = model.net.forward
    compiled_forward = torch.compile(other.net.forward, dynamic=False)

    def steps(compiled: bool):
        target = other if compiled else model
        target.net.forward = compiled_forward if compiled else eager_forward
        return step_fn(target, ids, mask, labels, "global", target.global_names + target.head_names)

    compiled_step = steps(True)
    start = time.perf_counter()
    compiled_step()
    print(f"{args.precision}, backbone dropout {args.backbone_dropout}"
          f"{', compiled with nn.Dropout and SDPA' if args.native_dropout else ''}: first compiled step "
          f"(compilation) {time.perf_counter() - start:.1f} s")
    for _ in range(args.rounds):
        e = rate(steps(False), args.seconds) * 32
        c = rate(steps(True), args.seconds) * 32
        print(f"  eager {e:.1f} samples/s, compiled {c:.1f} samples/s: {c / e:.2f}x", flush=True)


if __name__ == "__main__":
    main()
