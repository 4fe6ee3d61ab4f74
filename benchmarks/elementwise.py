"""Why bf16 training stops near half the bf16 matmul rate: bf16 speeds matmuls up far more than elementwise work.

    python benchmarks/elementwise.py [--rounds 40]

Times GELU's forward and backward over one MiniLM layer's feed-forward activations (batch 32 × 56 tokens ×
1536), on one tensor that stays in cache and on tensors cycled through a pool far larger than the cache, in
fp32 and bf16, beside that layer's 384 → 1536 feed-forward matmul. Reports milliseconds and, for the cold
case, the bytes moved per second.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPE = (32, 56, 1536)
POOL_BYTES = 512 << 20  # well beyond any last-level cache here


def per_call_ms(fn, tensors: list, rounds: int) -> float:
    for x, g in tensors[:2]:
        fn(x, g)
    start = time.perf_counter()
    for i in range(rounds):
        x, g = tensors[i % len(tensors)]
        fn(x, g)
    return (time.perf_counter() - start) / rounds * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    n = SHAPE[0] * SHAPE[1]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, activations {'×'.join(map(str, SHAPE))}")
    print("| dtype | what | in cache ms | cold ms | cold GB/s | matmul 384→1536 ms |")
    print("|---|---|---:|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        size = torch.empty((), dtype=dtype).element_size()
        count = max(4, POOL_BYTES // (2 * n * SHAPE[2] * size))
        cold = [(torch.randn(SHAPE, dtype=dtype), torch.randn(SHAPE, dtype=dtype)) for _ in range(count)]
        hot = cold[:1]
        a, w = torch.randn(n, 384, dtype=dtype), torch.randn(1536, 384, dtype=dtype)
        mm = per_call_ms(lambda x, g: F.linear(a, w), hot, args.rounds)
        for what, fn, passes in (("gelu forward", lambda x, g: F.gelu(x), 2),
                                 ("gelu backward", lambda x, g: torch.ops.aten.gelu_backward(g, x), 3)):
            h, c = per_call_ms(fn, hot, args.rounds), per_call_ms(fn, cold, args.rounds)
            gbs = passes * x_bytes(n, size) / (c / 1e3) / 1e9
            print(f"| {str(dtype).removeprefix('torch.')} | {what} | {h:.2f} | {c:.2f} | {gbs:.1f} | {mm:.2f} |")


def x_bytes(n: int, size: int) -> int:
    return n * SHAPE[2] * size


if __name__ == "__main__":
    main()
