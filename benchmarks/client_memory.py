"""Peak memory with many FedSLIP clients resident in one process, against what their states must take.

    python benchmarks/client_memory.py [--clients 1000]

Builds FedSLIP on the real MiniLM, creates the clients' states (private track, masks) and gives each the
private AdamW state one local update leaves (one step on a one-example batch), then reports the process's
peak RSS against: backbone process footprint + 1.2 × clients × (private adapters + masks + optimizer
state), each client's share counted from its tensors.
"""

from __future__ import annotations

import argparse
import resource

from fedslip.config import Config, apply_overrides
from fedslip.federation.client import ClientSide
from fedslip.federation.client_state import pack_state
from fedslip.methods import method_for
from fedslip.prepare import prepare
from fedslip.seeding import torch_gen


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=1000)
    args = ap.parse_args()
    n = args.clients
    cfg = apply_overrides(Config(), {
        "data": {"source": "synthetic", "synthetic_per_class": n // 4 + 60},
        "partition": {"scheme": "iid", "n_clients": n, "n_train": 1, "n_test": 1, "n_global_test": 5},
        "model": {"max_length": 8}, "train": {"batch_size": 1, "local_epochs": 1},
        "method": {"warmup_rounds": 0}}, "benchmark")
    prep = prepare(cfg)
    method = method_for(cfg)
    model = method.build(prep.backbone)
    side = ClientSide(cfg, prep, method, model)
    glob = method.init_global(model, torch_gen(cfg.train.seed, "global"))
    base = peak_rss_mib()
    states, per_client = [], 0
    for k in range(n):
        state = side.fresh_state(k)
        _, state, _ = method.local_update(model, glob, state, side.data(k, 1), 1)
        states.append(state)
        if k == 0:
            tensors, _ = pack_state(state)
            per_client = sum(t.numel() * t.element_size() for t in tensors.values())
    peak = peak_rss_mib()
    budget = base + 1.2 * n * per_client / 2**20
    print(f"{n} FedSLIP clients on MiniLM ({prep.backbone.placement.info['precision']} backbone): "
          f"one client's state {per_client / 2**20:.2f} MiB; process before clients {base:.0f} MiB, "
          f"peak {peak:.0f} MiB, budget {budget:.0f} MiB -> {'within' if peak <= budget else 'OVER'}")


if __name__ == "__main__":
    main()
