"""FFA-LoRA (Sun, Li, Li & Ding, "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024).

Federated Freeze-A LoRA: every LoRA A is fixed at its random initialisation, identical on all clients,
and never trained; only the zero-initialised B trains. With A common and fixed, FedAvg of the B's is
exact: mean_k(B_k)·A = mean_k(B_k·A), so the aggregated update is the average of the clients' updates
(plain FedAvg-LoRA averages A and B separately, and mean(B)·mean(A) ≠ mean(B·A)).

- shared: every LoRA B (d_out × r), example-weighted mean on the server, and the classification head,
  trained and averaged with B — the natural FedAvg choice, the same as fedavg's here. Payload per
  client-round, each direction: Σ over adapted layers d_out·r, plus the head (n_classes·hidden +
  n_classes). `method.head` = "local" / "frozen" changes only the head.
- never sent: A. It is the seeded global LoRA init (the same A that fedavg starts from, `init_track("g")`
  under the root seed's "global" stream), which every client — and the server, for the global model —
  derives from the root seed alone; each client keeps its copy in its ClientState.

Scaling α. Because A is fixed, ΔW = (α/r)·B·A is linear in the one trained matrix and α only rescales
B's step: the paper proves FFA-LoRA is the α → ∞ limit of LoRA with the learning rate scaled to match, so
α and the learning rate are interchangeable; in its experiments LoRA's α is 8 at r = 8 and FFA-LoRA's
learning rate is ten times LoRA's (grids {0.1 … 1} against {0.01 … 0.1}). Our protocol has one
`train.lr` for every method, so the factor goes into α instead: α_FFA = `method.ffa_alpha_factor`·
`method.alpha_g` (default 10·16 = 160, r = `method.r_g` = 8), i.e. a scale α/r ten times fedavg's. Under AdamW a step on B changes the
adapter output in proportion to α·lr, so this matches the paper's 10× learning rate for the adapters (the
head keeps the protocol's learning rate). Dropout and optimiser are the protocol's. The factor suits a
LoRA learning rate like the reference's 1e-4; on top of the quick preset's 5e-3 it is an effective 5e-2
on the adapters, too much for AdamW (README "Results" shows both factors).
"""

from __future__ import annotations

import torch

from fedslip.methods.base import ClientState, Method
from fedslip.model.adapted import AdaptedModel, Tensors
from fedslip.model.backbone import Backbone
from fedslip.seeding import torch_gen

class FFALoRA(Method):
    """FFA-LoRA (Sun et al., ICLR 2024): A frozen at a seeded init, only B (and the head) trained and averaged."""

    name = "ffa"
    default_head = "shared"

    def make_model(self, backbone: Backbone) -> AdaptedModel:
        m = self.m
        return AdaptedModel.dual(backbone, self.cfg.model.target_modules, m.r_g, m.ffa_alpha_factor * m.alpha_g, 0,
                                 m.alpha_p, m.dropout)

    def frozen_a(self, model: AdaptedModel) -> Tensors:
        """The fixed A of every layer, from the root seed alone (identical for every client and the server)."""
        init = model.init_track("g", torch_gen(self.t.seed, "global"))
        return {n: init[n] for n in model.names_ending(".g_A")}

    def b_names(self, model: AdaptedModel) -> list[str]:
        return model.names_ending(".g_B")

    def shared_names(self, model: AdaptedModel) -> list[str]:
        return self.b_names(model) + self.shared_head(model)

    def global_train_names(self, model: AdaptedModel) -> list[str]:
        return self.b_names(model) + self.trained_head(model)

    def init_global(self, model: AdaptedModel, gen: torch.Generator) -> Tensors:
        glob = {n: torch.zeros_like(t) for n, t in model.read(self.b_names(model)).items()}  # B = 0
        if self.head == "shared":
            glob.update(model.head_init)
        return glob

    def init_client(self, model: AdaptedModel, cid: int, gen: torch.Generator) -> ClientState:
        state = super().init_client(model, cid, gen)
        state.tensors.update(self.frozen_a(model))
        return state

    def global_view(self, model: AdaptedModel, glob: Tensors, client: ClientState) -> Tensors | None:
        return {**self.frozen_a(model), **super().global_view(model, glob, client)}  # the server's own A
