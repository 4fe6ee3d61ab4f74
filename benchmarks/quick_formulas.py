"""Do the measured MiB/round of a quick-preset comparison match each method's payload formula?

    python benchmarks/quick_formulas.py runs/compare/results.json

The formulas are those of the README's method table, written out for the quick preset on all-MiniLM-L6-v2:
12 adapted projections (query and value of 6 layers, d_in = d_out = 384), 4 classes (head 4·384 + 4 =
1,540 parameters), 4 clients, 5 rounds, r_g = 8. They count float32 tensor data only, from shapes; the
ledger measures serialized safetensors payloads, which add a JSON header (names, dtypes, shapes). So the
measured value should sit slightly above the formula: by under 1 % for payloads of large tensors, more for
payloads of small ones (fedsa-vera's 256-element vectors).
"""

from __future__ import annotations

import json
import sys

MIB = 2**20
LAYERS, D, CLASSES, CLIENTS, ROUNDS, R = 12, 384, 4, 4, 5, 8
HEAD = CLASSES * D + CLASSES
LORA = LAYERS * R * (D + D)  # A and B of every projection
EACH_WAY = 2 * CLIENTS  # payloads per round when every client gets one and sends one


def formulas() -> dict[str, tuple[int, int]]:
    """method -> (bytes over the whole run from the payload formula, rounds the run reports)."""
    f32 = 4
    same = EACH_WAY * ROUNDS * (LORA + HEAD) * f32
    a_only = EACH_WAY * ROUNDS * LAYERS * R * D * f32
    flora_ranks = [16, 8, 8, 4]
    flora_up = sum(flora_ranks) * 2 * D * LAYERS + CLIENTS * HEAD  # every client's own-rank LoRA + head
    flora_down = sum(flora_ranks) * 2 * D * LAYERS + HEAD  # the stack of last round's A and B, + head
    fedsb_r = 8 * R
    return {
        "fedavg": (same, ROUNDS), "fedprox": (same, ROUNDS), "dualtrack-naive": (same, ROUNDS),
        "fedslip": (same, ROUNDS), "fedslip-plus": (same, ROUNDS),
        "fedsa": (a_only, ROUNDS), "fedsa-rslora": (a_only, ROUNDS), "pfedlora": (a_only, ROUNDS),
        "fedsa-vera": (EACH_WAY * ROUNDS * LAYERS * 256 * f32, ROUNDS),
        "ffa": (EACH_WAY * ROUNDS * (LAYERS * D * R + HEAD) * f32, ROUNDS),
        # K = 4 adaptors each way, plus K int64 masked loads up per client and round
        "floral": (EACH_WAY * ROUNDS * (4 * LORA + HEAD) * f32 + CLIENTS * ROUNDS * 4 * 8, ROUNDS),
        # round 1 sends the head only; rounds 2..5 the stacked LoRA
        "flora": ((ROUNDS * flora_up + CLIENTS * HEAD + (ROUNDS - 1) * CLIENTS * flora_down) * f32, ROUNDS),
        # r x r R + head each way; A and B once to every client; the setup round's gradient sums up
        "fedsb": ((EACH_WAY * ROUNDS * (LAYERS * fedsb_r**2 + HEAD) + CLIENTS * LAYERS * fedsb_r * 2 * D
                   + CLIENTS * LAYERS * D * D) * f32, ROUNDS + 1),
        "local": (0, ROUNDS),
    }


def main(path: str) -> int:
    methods = json.loads(open(path, encoding="utf-8").read())["methods"]
    print(f"{'method':16s} {'formula MiB/round':>18s} {'measured':>9s} {'header overhead':>16s}")
    for name, doc in methods.items():
        if name not in formulas():
            print(f"{name:16s} no formula written here")
            continue
        total, rounds = formulas()[name]
        predicted = total / MIB / rounds
        measured = doc["final"]["mib_per_round"]
        overhead = f"{100 * (measured / predicted - 1):.2f} %" if predicted else "—"
        print(f"{name:16s} {predicted:18.3f} {measured:9.3f} {overhead:>16s}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print("usage: python benchmarks/quick_formulas.py RESULTS.json", file=sys.stderr)
        sys.exit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
    sys.exit(main(sys.argv[1]))
