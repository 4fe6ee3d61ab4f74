"""One root seed -> independent, reproducible streams for every (purpose, client, round)."""

from __future__ import annotations

import zlib

import numpy as np
import torch


def derive(seed: int, tag: str, *keys: int) -> int:
    """A 63-bit seed for `tag` and integer keys (e.g. client id, round); stable across processes."""
    entropy = [seed, zlib.crc32(tag.encode()), *keys]
    return int(np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


def torch_gen(seed: int, tag: str, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive(seed, tag, *keys))


def numpy_gen(seed: int, tag: str, *keys: int) -> np.random.Generator:
    return np.random.default_rng(derive(seed, tag, *keys))
