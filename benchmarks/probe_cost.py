"""What `precision = "auto"` costs a process to start: the probe with its screen, and without it.

    python benchmarks/probe_cost.py

Every fedslip process with precision auto on a CPU probes once, and a Flower ClientApp is a new process for
every message. Without the screen (SCREEN_LOSS set to infinity, so it never decides) the probe runs its
full-size timings, as it did before the screen existed. Alternates the two, three times each, in one process.
"""

from __future__ import annotations

import time

import torch

import fedslip.model.placement as placement


def timed(screen: bool) -> tuple[float, dict]:
    placement._PROBES.clear()
    placement.SCREEN_LOSS = 4 if screen else float("inf")
    start = time.perf_counter()
    got = placement.probe(torch.device("cpu"))
    return time.perf_counter() - start, got


def main() -> None:
    runs: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(3):
        for screen in (True, False):
            seconds, got = timed(screen)
            runs[screen].append(seconds)
            print(f"{'with' if screen else 'without'} screen: {seconds:.2f} s  {got}")
    with_s, without_s = min(runs[True]), min(runs[False])
    print(f"best of 3: with the screen {with_s:.2f} s, without {without_s:.2f} s: {without_s / with_s:.1f}x")


if __name__ == "__main__":
    main()
