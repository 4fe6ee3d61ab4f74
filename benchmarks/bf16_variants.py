"""Three ways to use bf16 matmuls for the frozen backbone, one training step each, alternating in one process.

    python benchmarks/bf16_variants.py [--backbone-dropout 0.1] [--rounds 3] [--seconds 4]

- bf16-stored: the backbone's weights and activations in bf16 (what `train.precision = "bf16"` does);
- fp32 + autocast: an fp32 backbone under `torch.autocast` (re-casts every frozen weight every step);
- fp32 + oneDNN bf16 math: fp32 everywhere, oneDNN computing fp32 matmuls with bf16 products
  (`torch.backends.mkldnn.matmul.fp32_precision = "bf16"`, CPU only).
FedSLIP's global step on MiniLM, batch 32 × 56 tokens (`throughput.py`'s model and step). Timings alternate,
so that a shared machine's drifts hit every variant; compare within a round.
"""

from __future__ import annotations

import argparse

import torch

from fedslip.model.cpu_heap import keep_freed_memory
from throughput import build, rate, step_fn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone-dropout", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    keep_freed_memory()
    ids = torch.randint(1000, 20000, (32, 56))
    mask, labels = torch.ones_like(ids), torch.randint(0, 4, (32,))
    stored, fp32 = build(torch.bfloat16, args.backbone_dropout), build(torch.float32, args.backbone_dropout)
    variants = {  # name -> (step, oneDNN's fp32 matmul precision)
        "bf16-stored": (step_fn(stored, ids, mask, labels, "global", stored.global_names + stored.head_names), "none"),
        "fp32 + autocast": (step_fn(fp32, ids, mask, labels, "global", fp32.global_names + fp32.head_names, True),
                            "none"),
        "fp32 + oneDNN bf16 math": (step_fn(fp32, ids, mask, labels, "global", fp32.global_names + fp32.head_names),
                                    "bf16"),
    }
    print(f"global step samples/s, backbone dropout {args.backbone_dropout}, {torch.get_num_threads()} threads")
    for r in range(args.rounds):
        cells = []
        for name, (step, math) in variants.items():
            torch.backends.mkldnn.matmul.fp32_precision = math
            cells.append(f"{name} {rate(step, args.seconds) * 32:.1f}")
        print(f"round {r + 1}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
