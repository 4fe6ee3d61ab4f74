"""Time one training step and one evaluation batch of the real backbone under the settings that matter.

    python benchmarks/step_time.py [--batch 32] [--length 48] [--repeat 5]

Reports the median seconds of: a FedSLIP global step (global track + head trainable), a private step
(global output detached), with the backbone's dropout on and off, in float32 and with bfloat16 autocast;
and a 128-example evaluation forward pass. Used to choose the `quick` preset and the CPU defaults.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fedslip.model.adapted import AdaptedModel
from fedslip.model.backbone import load_backbone


def median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    ids = torch.randint(1000, 20000, (args.batch, args.length))
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 4, (args.batch,))
    eval_ids = torch.randint(1000, 20000, (128, args.length))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x {args.length} tokens")
    for dropout in (None, 0.0):
        backbone = load_backbone("sentence-transformers/all-MiniLM-L6-v2", 4, 0, dropout)
        model = AdaptedModel.dual(backbone, None, 8, 16.0, 32, 64.0, 0.1)
        for bf16 in (False, True):
            def step(mode: str, names: list[str]):
                def run():
                    model.net.train()
                    model.set_trainable(names)
                    with model.mode(mode), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        loss = F.cross_entropy(model.logits(ids, mask).float(), labels)
                    loss.backward()
                return run

            def evaluate():
                model.net.eval()
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    model.logits(eval_ids, torch.ones_like(eval_ids))

            g = median_time(step("global", model.global_names + model.head_names), args.repeat)
            p = median_time(step("private", model.private_names), args.repeat)
            e = median_time(evaluate, args.repeat)
            label = f"backbone dropout {'own (0.1)' if dropout is None else dropout}, {'bf16 autocast' if bf16 else 'fp32'}"
            print(f"{label:42s} global step {g:.3f} s   private step {p:.3f} s   eval 128 {e:.3f} s")


if __name__ == "__main__":
    main()
