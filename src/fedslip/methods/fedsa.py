"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025).

The paper finds that in federated LoRA the A matrices learn knowledge common to all clients while the B
matrices capture client-specific knowledge, and so shares only A:

- shared: every adapted layer's LoRA A (r × d_in). The server sends the current global A, each client
  trains A and B together locally, uploads A, and the server takes the example-weighted mean (FedAvg)
  of the uploaded A's. Payload per client-round, each direction: Σ over adapted layers r·d_in.
- local: every LoRA B (d_out × r, zero at the start, one per client, kept across rounds) and the
  classification head. The head stays local by default, as in the authors' released configuration
  (`personalization.local_param: ['lora_B', 'classifier']`): the classifier is the most client-specific
  part of all, and averaging it would undo B's personalisation. `method.head = "shared"` averages it with A
  instead; "frozen" keeps the seeded random head.

Paper defaults used: rank 8 and α 16 (our `method.r_g` / `method.alpha_g`), FedAvg weighted by example
counts. Where our protocol decides instead: LoRA on the protocol's target modules, the protocol's dropout
(`method.dropout`) and optimiser (AdamW at `train.lr`, fresh each round, for every method alike) rather than
the paper's SGD.

Evaluation: there is no global model — a usable model needs a B, and every B is personal — so
`global_view` is None (no global accuracy, as for `local`); each client's own model (global A, its B, its
head) is evaluated on its own test set as the personalised accuracy, the metric the paper reports.
"""

from __future__ import annotations

import torch

from fedslip.methods.base import ClientData, ClientState, Method
from fedslip.model.adapted import AdaptedModel, Tensors


class FedSA(Method):
    """FedSA-LoRA (Guo et al., ICLR 2025): only LoRA A shared and averaged; B and the head stay local."""

    name = "fedsa"
    default_head = "local"
    personalizes = True

    # --- which adapter tensors are shared and which stay on the client (variants override these) --------
    def shared_adapter_names(self, model: AdaptedModel) -> list[str]:
        return model.names_ending(".g_A")

    def local_adapter_names(self, model: AdaptedModel) -> list[str]:
        return model.names_ending(".g_B")

    def initial_adapters(self, model: AdaptedModel, gen: torch.Generator) -> Tensors:
        return model.init_track("g", gen)  # A random, B = 0

    # --- the Method seam ---------------------------------------------------------------------------------
    def shared_names(self, model: AdaptedModel) -> list[str]:
        return self.shared_adapter_names(model) + self.shared_head(model)

    def global_train_names(self, model: AdaptedModel) -> list[str]:
        head = self.trained_head(model)
        return self.shared_adapter_names(model) + self.local_adapter_names(model) + head

    def init_global(self, model: AdaptedModel, gen: torch.Generator) -> Tensors:
        init = self.initial_adapters(model, gen)
        glob = {n: init[n] for n in self.shared_adapter_names(model)}
        if self.head == "shared":
            glob.update(model.head_init)
        return glob

    def init_client(self, model: AdaptedModel, cid: int, gen: torch.Generator) -> ClientState:
        state = super().init_client(model, cid, gen)
        init = self.initial_adapters(model, gen)
        state.tensors.update({n: init[n] for n in self.local_adapter_names(model)})
        return state

    def local_update(self, model: AdaptedModel, down, client: ClientState, data: ClientData, rnd: int):
        up, client, metrics = super().local_update(model, down, client, data, rnd)
        client.tensors.update(model.read(self.local_adapter_names(model)))
        return up, client, metrics

    def global_view(self, model: AdaptedModel, glob: Tensors, client: ClientState) -> Tensors | None:
        return None
