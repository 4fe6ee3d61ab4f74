"""Tokenize once, then cut length-bucketed batches (little padding) from index lists.

Training batches: shuffle (seeded), cut into pools of `pool` batches (`train.length_pool`), sort each pool
by length, cut batches, shuffle the batch order. Examples of similar length share a batch, so padding stays
small while the order still changes every epoch; a pool of 1 gives uniformly shuffled batches, as a plain
shuffled DataLoader would. Evaluation batches are simply sorted by length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    index: np.ndarray  # positions of the examples in the Encoded pool

    def __len__(self) -> int:
        return len(self.labels)


class Encoded:
    """Token ids of a text column, computed once, plus labels; batches are built from index arrays."""

    def __init__(self, texts: list[str], labels: np.ndarray, tokenizer, max_length: int, pad_id: int):
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        self.ids = [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]]
        self.lengths = np.array([len(x) for x in self.ids])
        self.labels = np.asarray(labels, dtype=np.int64)
        self.pad_id = pad_id

    def batch(self, idx: np.ndarray) -> Batch:
        width = int(self.lengths[idx].max())
        ids = np.full((len(idx), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(idx), width), dtype=np.int64)
        for row, i in enumerate(idx):
            n = self.lengths[i]
            ids[row, :n] = self.ids[i]
            mask[row, :n] = 1
        return Batch(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(self.labels[idx]), np.asarray(idx))

    def train_batches(self, idx: np.ndarray, batch_size: int, rng: np.random.Generator, pool: int
                      ) -> list[Batch]:
        order = rng.permutation(np.asarray(idx))
        groups: list[np.ndarray] = []
        for start in range(0, len(order), batch_size * pool):
            chunk = order[start:start + batch_size * pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            groups += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        return [self.batch(groups[g]) for g in rng.permutation(len(groups))]

    def eval_batches(self, idx: np.ndarray, batch_size: int) -> list[Batch]:
        idx = np.asarray(idx)
        idx = idx[np.argsort(self.lengths[idx], kind="stable")]
        return [self.batch(idx[i:i + batch_size]) for i in range(0, len(idx), batch_size)]
