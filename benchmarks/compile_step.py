"""`torch.compile` of the backbone against eager, on one training step, in one process.

    python benchmarks/compile_step.py [--precision bf16] [--backbone-dropout 0.1] [--rounds 3] [--seconds 4]

The same model and step as `throughput.py` (batch 32 × 56 tokens, fixed, so one compiled graph serves every
step; real runs' length-bucketed batches would recompile per length). Compiles once, then alternates eager
and compiled timings, so that drifts of a shared machine hit both.
"""

from __future__ import annotations

import argparse
import time

import torch

from fedslip.model.cpu_heap import keep_freed_memory
from throughput import build, rate, step_fn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--backbone-dropout", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    keep_freed_memory()
    model = build(torch.bfloat16 if args.precision == "bf16" else torch.float32, args.backbone_dropout)
    ids = torch.randint(1000, 20000, (32, 56))
    step = step_fn(model, ids, torch.ones_like(ids), torch.randint(0, 4, (32,)), "global",
                   model.global_names + model.head_names)
    eager = model.net.forward
    compiled = torch.compile(eager, dynamic=False)
    model.net.forward = compiled
    start = time.perf_counter()
    step()
    print(f"{args.precision}, backbone dropout {args.backbone_dropout}: first compiled step (compilation) "
          f"{time.perf_counter() - start:.1f} s")
    for _ in range(args.rounds):
        model.net.forward = eager
        e = rate(step, args.seconds) * 32
        model.net.forward = compiled
        c = rate(step, args.seconds) * 32
        print(f"  eager {e:.1f} samples/s, compiled {c:.1f} samples/s: {c / e:.2f}x")


if __name__ == "__main__":
    main()
