"""Where one training step's CPU time goes, by kind of operation, from torch's profiler.

    python benchmarks/step_profile.py [--precision bf16] [--backbone-dropout 0.1] [--mode global] [--steps 5]
                                      [--shapes 20]

MiniLM with FedSLIP's two tracks, batch 32 × 56 tokens (`throughput.py`'s model and step), a few steps
under `torch.profiler` after a warm-up; each aten op's self CPU time is put in a group (matmuls, dropout
draws, copies and casts, ...), and the groups are printed as shares of the total. Then, in the same process,
the step without the profiler against the matmul rate of its precision (as `throughput.py`), and the ceiling
the matmuls' own time implies: the efficiency the step would reach if everything else (other operations,
Python) took no time. `--shapes N` also lists the N costliest (op, input shapes) pairs, matmuls with the
rate they ran at.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from fedslip.model.cpu_heap import keep_freed_memory
from fedslip.model.placement import matmul_rate
from throughput import build, encoder_weights, rate, step_fn

GROUPS = {  # aten op -> group; anything else is "other"
    "aten::addmm": "matmuls", "aten::mm": "matmuls", "aten::bmm": "matmuls",
    "aten::uniform_": "dropout draws and masks", "aten::log1p_": "dropout draws and masks",
    "aten::neg_": "dropout draws and masks", "aten::div_": "dropout draws and masks",
    "aten::cumsum_": "dropout draws and masks", "aten::searchsorted": "dropout draws and masks",
    "aten::index_fill_": "dropout draws and masks",
    "aten::copy_": "copies and casts", "aten::_to_copy": "copies and casts",
    "aten::gelu": "GELU", "aten::gelu_backward": "GELU",
    "aten::_softmax": "softmax", "aten::_softmax_backward_data": "softmax",
    "aten::native_layer_norm": "layer norm", "aten::native_layer_norm_backward": "layer norm",
    "aten::mul": "multiplications", "aten::mul_": "multiplications",
    "aten::add": "additions", "aten::add_": "additions",
}


def matmul_flops(key: str, shapes: list) -> float:
    """FLOPs of one addmm/mm/bmm call from its input shapes (0 for other ops)."""
    if key == "aten::addmm":
        (m, k), (_, n) = shapes[1], shapes[2]
        return 2.0 * m * k * n
    if key == "aten::mm":
        (m, k), (_, n) = shapes[0], shapes[1]
        return 2.0 * m * k * n
    if key == "aten::bmm":
        (b, m, k), (_, _, n) = shapes[0], shapes[1]
        return 2.0 * b * m * k * n
    return 0.0


def print_shapes(prof, steps: int, top: int) -> None:
    events = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        flops = matmul_flops(e.key, e.input_shapes) * e.count
        speed = f"  {flops / e.self_cpu_time_total / 1e3:5.0f} GFLOP/s" if flops else ""
        print(f"  {100 * e.self_cpu_time_total / total:4.1f} % {e.self_cpu_time_total / 1e3 / steps:6.2f} ms/step "
              f"x{e.count // steps:<3d} {e.key:<30s} {str(e.input_shapes)[:70]}{speed}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--backbone-dropout", type=float, default=0.1)
    ap.add_argument("--mode", choices=["global", "private"], default="global")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=6.0, help="of the unprofiled step timing")
    ap.add_argument("--shapes", type=int, default=0, help="list this many costliest (op, shapes) pairs")
    args = ap.parse_args()
    keep_freed_memory()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = build(dtype, args.backbone_dropout)
    ids = torch.randint(1000, 20000, (32, 56))
    names = model.global_names + model.head_names if args.mode == "global" else model.private_names
    step = step_fn(model, ids, torch.ones_like(ids), torch.randint(0, 4, (32,)), args.mode, names)
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes > 0) as prof:
        for _ in range(args.steps):
            step()
    shares: Counter[str] = Counter()
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            shares[GROUPS.get(event.key, "other")] += event.self_cpu_time_total
    total = sum(shares.values())
    print(f"{args.precision}, {args.mode} step, backbone dropout {args.backbone_dropout}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads: {total / 1e3 / args.steps:.0f} ms of aten self CPU time a step")
    for group, us in shares.most_common():
        print(f"  {group:26s} {100 * us / total:5.1f} %")
    if args.shapes:
        print_shapes(prof, args.steps, args.shapes)
    steps = rate(step, args.seconds)
    mm = matmul_rate(torch.device("cpu"), dtype, seconds=3.0)
    efficiency = steps * 32 * 4 * encoder_weights(model.net) * 56 / 1e9 / mm
    matmul_s = shares["matmuls"] / 1e6 / args.steps  # a step's matmul time, as profiled
    print(f"without the profiler: {1e3 / steps:.0f} ms a step; training at {100 * efficiency:.0f} % of the "
          f"{args.precision} matmul rate ({mm:.0f} GFLOP/s, measured after it); if everything but the matmuls "
          f"({1e3 * matmul_s:.0f} ms a step) took no time: {100 * efficiency / (matmul_s * steps):.0f} %")


if __name__ == "__main__":
    main()
