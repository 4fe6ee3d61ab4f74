"""Local-only training: every client trains its own LoRA and head alone, nothing is communicated.

The reference trained each client for 5 epochs (train.local_only_epochs) on its own data and evaluated it
on its own test set. It runs as a single "round" of that many epochs; there is no global model.
"""

from __future__ import annotations

import torch

from fedslip.methods.base import ClientState, Method
from fedslip.model.adapted import AdaptedModel, Tensors


class LocalOnly(Method):
    name = "local"
    default_head = "local"
    personalizes = True
    communicates = False

    def rounds(self) -> int:
        return 1

    def local_epochs(self) -> int:
        return self.t.local_only_epochs

    def local_batches(self, data):
        return data.batches(self.local_epochs())  # epochs of its own data, whatever the rounds' step budget

    def shared_names(self, model: AdaptedModel) -> list[str]:
        return []

    def init_global(self, model: AdaptedModel, gen: torch.Generator) -> Tensors:
        return {}

    def init_client(self, model: AdaptedModel, cid: int, gen: torch.Generator) -> ClientState:
        state = super().init_client(model, cid, gen)
        state.tensors.update(model.init_track("g", gen))
        return state

    def local_update(self, model, down, client, data, rnd):
        up, client, metrics = super().local_update(model, down, client, data, rnd)
        client.tensors.update(model.read(model.global_names))
        return up, client, metrics

    def global_view(self, model, glob, client):
        return None

    def persistent_view(self, model, glob, client):
        return self.personal_view(model, glob, client)  # never synced: both personal views are the same
