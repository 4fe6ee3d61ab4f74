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


def client_gen(seed: int, cid: int) -> torch.Generator:
    """The generator a client's fresh state is drawn from."""
    return torch_gen(seed, "client", cid)


def numpy_gen(seed: int, tag: str, *keys: int) -> np.random.Generator:
    return np.random.default_rng(derive(seed, tag, *keys))


class SideStream:
    """Context: random draws inside come from a stream of their own (seeded once, continued on each entry);
    outside, the main stream goes on as if the block had never run. A FedSLIP private step draws dropout
    masks too: without this, it would change the global steps' masks, so the global track would differ from
    the same training without private steps by the random draws alone."""

    def __init__(self, seed: int, device: torch.device):
        self.seed, self.cuda = seed, device.type == "cuda"
        self.state = None

    def _get(self):
        return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if self.cuda else None)

    def _set(self, state) -> None:
        torch.set_rng_state(state[0])
        if self.cuda:
            torch.cuda.set_rng_state_all(state[1])

    def __enter__(self):
        self.main = self._get()
        if self.state is None:
            torch.manual_seed(self.seed)
        else:
            self._set(self.state)
        return self

    def __exit__(self, *exc) -> None:
        self.state = self._get()
        self._set(self.main)
