"""Three ways to draw the dropout of a CPU training step, per dropout site and in MiniLM's step, in one process.

    python benchmarks/dropout_draws.py [--precision bf16] [--rounds 3] [--seconds 4]

- bernoulli: a mask of one Bernoulli draw per element (what `nn.Dropout` draws);
- 15-bit levels: a mask from four 15-bit slices of each 63-bit draw (this project's previous dropout);
- gap positions: geometric gaps between dropped elements, p·n draws, zeros written at the positions
  (`fedslip.model.cheap_dropout`, what runs now).
Per site: forward and backward of one attention-probability (32 × 12 × 56 × 56) and one hidden-state
(32 × 56 × 384) dropout at p = 0.1, best of three timings. In the step: `throughput.py`'s FedSLIP global step
with the backbone's dropout 0.1, the backbone's and LoRA's dropouts drawn each way in turn, alternating.
"""

from __future__ import annotations

import argparse
import time

import torch

from fedslip.model import adapters, cheap_dropout
from fedslip.model.cpu_heap import keep_freed_memory
from throughput import build, rate, step_fn


def bernoulli(x: torch.Tensor, p: float, scale: float) -> torch.Tensor:
    return x * torch.empty_like(x).bernoulli_(1 - p) * scale


def levels15(x: torch.Tensor, p: float, scale: float) -> torch.Tensor:
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_()
    levels = words.view(torch.int16)[:x.numel()] & (2**15 - 1)
    kept = levels.sub_(round(p * 2**15)).bitwise_right_shift_(15).add_(1).to(x.dtype).view(x.shape)
    return x * kept * scale


WAYS = {"bernoulli": bernoulli, "15-bit levels": levels15, "gap positions": cheap_dropout.dropped}


def per_site(shape, dtype, way) -> float:
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    g = torch.randn(shape, dtype=dtype)

    def once():
        x.grad = None
        way(x, 0.1, 1 / 0.9).backward(g)

    once()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(10):
            once()
        best = min(best, (time.perf_counter() - start) / 10)
    return 1e3 * best


def use(way) -> None:
    cheap_dropout.dropped = adapters.dropped = way


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    keep_freed_memory()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    print(f"{args.precision}, {torch.get_num_threads()} threads; ms per site, forward and backward:")
    for shape in ((32, 12, 56, 56), (32, 56, 384)):
        print(f"  {shape}: " + ", ".join(f"{name} {per_site(shape, dtype, way):.2f}" for name, way in WAYS.items()))
    model = build(dtype, 0.1)
    ids = torch.randint(1000, 20000, (32, 56))
    step = step_fn(model, ids, torch.ones_like(ids), torch.randint(0, 4, (32,)), "global",
                   model.global_names + model.head_names)
    print("global step samples/s, backbone dropout 0.1:")
    for r in range(args.rounds):
        cells = []
        for name, way in WAYS.items():
            use(way)
            cells.append(f"{name} {rate(step, args.seconds) * 32:.1f}")
        print(f"  round {r + 1}: " + " | ".join(cells), flush=True)
    use(WAYS["gap positions"])


if __name__ == "__main__":
    main()
