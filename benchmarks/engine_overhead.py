"""What the round protocol itself costs per client and round, with a method that does nothing.

    python benchmarks/engine_overhead.py [--clients 1000] [--rounds 3]

A no-op method (no tensors, no training, nothing to evaluate) on the in-process transport: what is left
is selection, requests, encoding and decoding, the ledger, upload checks and records. Reports the wall
time per client-round.
"""

from __future__ import annotations

import argparse
import time

from fedslip.config import Config, apply_overrides
from fedslip.federation.inprocess import Simulation
from fedslip.methods.base import Method
from fedslip.prepare import prepare


class NoOp(Method):
    name = "noop"
    default_head = "frozen"

    def init_global(self, model, gen):
        return {}

    def shared_names(self, model):
        return []

    def local_update(self, model, down, client, data, rnd):
        return {}, client, {"loss": 0.0}

    def global_view(self, model, glob, client):
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    n = args.clients
    cfg = apply_overrides(Config(), {
        "data": {"source": "synthetic", "synthetic_per_class": 3 * n // 4 + 50},
        "partition": {"scheme": "iid", "n_clients": n, "n_train": 2, "n_test": 1, "n_global_test": 5},
        "model": {"backbone": "tiny-random:bert", "max_length": 16},
        "train": {"rounds": args.rounds, "precision": "fp32"}}, "benchmark")
    prep = prepare(cfg)
    sim = Simulation(prep, NoOp(cfg))
    start = time.perf_counter()
    result, ledger = sim.run()
    elapsed = time.perf_counter() - start
    client_rounds = n * args.rounds
    print(f"{n} clients x {args.rounds} rounds (+ final evaluation requests): {elapsed:.2f} s, "
          f"{1000 * elapsed / client_rounds:.3f} ms per client-round ({len(ledger.entries)} ledger rows)")


if __name__ == "__main__":
    main()
