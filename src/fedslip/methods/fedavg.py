"""FedAvg + LoRA (McMahan et al. 2017; Hu et al. 2022), optional FedProx, and K-step personalization.

The reference setup: LoRA (r 8, α 16, dropout 0.1) on the attention query/value projections, the
classification head trained and averaged with the adapters. K-step personalization (an evaluation, not a
training change): after the last round each client copies the final global model, takes
K = n_train // batch_size AdamW steps on its own training data and is evaluated on its own test set.
"""

from __future__ import annotations

from fedslip.methods.base import ClientData, ClientState, Method, adamw, sgd_step, training
from fedslip.model.adapted import AdaptedModel, Tensors


class FedAvg(Method):
    name = "fedavg"
    default_head = "shared"

    def prox_mu(self) -> float:
        return self.m.fedavg_mu

    def kstep_view(self, model: AdaptedModel, glob: Tensors, client: ClientState, data: ClientData) -> Tensors:
        """The client's model after K local fine-tuning steps from the final global model."""
        model.load(self.global_view(model, glob, client))
        names = self.global_train_names(model)
        opt = adamw(model.params(names), self.t.lr, self.t.weight_decay)
        k = max(1, len(data) // self.t.batch_size)
        with model.mode("global"), training(model):
            for batch in data.batches(0, steps=k):
                sgd_step(model, batch, names, opt, self.t.clip)
        return model.read(names)

    def join_view(self, model: AdaptedModel, glob: Tensors, client: ClientState, data: ClientData) -> Tensors:
        """A newcomer joins as every client personalizes at the end: K steps from the final global model."""
        return self.kstep_view(model, glob, client, data)
