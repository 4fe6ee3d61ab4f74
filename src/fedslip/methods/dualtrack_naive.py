"""The first dual-track design, kept for ablation: both LoRA tracks trained together.

One AdamW over the global track, the private track and the head (fresh each round); both tracks active in
every forward pass (no detachment), no FedProx, no warmup (the private track trains from round 1; masks
are still re-chosen after each of the first `warmup_rounds` rounds), and the head transmitted and averaged
with the global track. The private track stays on the client.
"""

from __future__ import annotations

from fedslip.methods.base import ClientData, ClientState, adamw, mean, sgd_step, training
from fedslip.methods.fedslip import DualTrack
from fedslip.model.adapted import AdaptedModel


class DualTrackNaive(DualTrack):
    name = "dualtrack-naive"
    default_head = "shared"

    def local_update(self, model: AdaptedModel, down, client: ClientState, data: ClientData, rnd: int):
        self.prune_after_warmup(model, client, data.cid, rnd)
        model.load(self.client_view(model, down, client))
        names = self.global_train_names(model) + model.private_names
        opt = adamw(model.params(names), self.lr(rnd), self.t.weight_decay)
        losses = []
        with model.mode("both"), training(model):
            for batch in self.local_batches(data):
                losses.append(sgd_step(model, batch, names, opt, self.t.clip))
        self.keep_private(model, client)
        self.refresh_masks(model, client, data.cid, rnd)
        return model.read(self.shared_names(model)), client, {"loss": mean(losses)}
