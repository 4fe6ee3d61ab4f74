"""pFedLoRA (Yi, Yu, Wang, Liu & Li, "pFedLoRA: Model-Heterogeneous Personalized Federated Learning with
LoRA Tuning", arXiv:2310.13283, 2023): clients with heterogeneous models share one small homogeneous
adapter, trained alternately with their own model; only the adapter is averaged.

Heterogeneous models. Client k runs the backbone truncated to its first L_k transformer layers,
L_k = `method.client_layers[k mod len]` (default [3, 4, 6, 6]: MiniLM-L6 cut to 3, 4, 6 and 6 layers; a
depth beyond the backbone's is the whole backbone). There is one frozen backbone in memory: a client's
depth is a tensor of its view (`model/depth.py`), and the forward pass runs only that many layers.

The homogeneous adapter (shared). LoRA (r_g, α_g, dropout) on the LoRA targets (attention query/value by
default) of the first L_min = min_k L_k layers, the layers every client has. Why there, not on the pooled
representation: the first L_min layers compute the same function of the same input on every client, so an
average of their adapters is an average of like with like, and every client can use all of it; the pooled
representation is the output of layer L_k, a different feature space on each client, and an adapter
averaged across those would serve none of them. The paper's adapter is likewise one shape that fits into
every client's model.

The local model (stays on the client). The paper trains each client's whole heterogeneous model; our
backbone is frozen, so a client's trainable local model is a private LoRA (r_p, α_p: the "larger" LoRA, as
the paper's local model is larger than its adapter) on the targets of all L_k of its layers, plus its own
classification head. The head is therefore `local` (the only head policy this method accepts: a shared
head would average classifiers of different depths, and the engine's single-view evaluation of a shared
or frozen head cannot represent clients of different depths).

Iterative training, each round (the paper's global-local knowledge exchange, in the order summaries of the
paper give: global to local, then local to global): the client loads the global adapter, then
1. local phase: `local_epochs` epochs training only its local model, the global adapter frozen (its output
   is detached, so gradients reach only the local model); this AdamW's state persists on the client across
   rounds, as the local model does;
2. adapter phase: `local_epochs` epochs training only the adapter, its local model frozen (a fresh AdamW:
   the adapter is re-downloaded every round);
and uploads the adapter as it left phase 2. The server averages the adapters by example counts (FedAvg).
Per client and round, up = down = r_g·(d_in + d_out) per adapted projection of the first L_min layers.

Evaluation. Personalized: the client's whole model as it left local training (depth L_k, the adapter it
uploaded, private LoRA, head), the metric the paper reports. Not with the freshly averaged adapter: the
adapter the client uploaded was fitted to its local model in phase 2, the average never was. Global: none (`global_view` is None, shown as "—"). A model-heterogeneous federation has no
single global model, and the adapter alone is not a classifier: each head is trained with its client's
private LoRA active, so "adapter + head, private LoRA off" is a model nobody trained (measured on the
quick preset it was at chance, 25 %, on the balanced test set).
"""

from __future__ import annotations

import torch

from fedslip.errors import UserError
from fedslip.methods.base import ClientData, ClientState, Method, Payload, adamw, host_state, mean, sgd_step, training
from fedslip.model.adapted import AdaptedModel, Tensors
from fedslip.model.adapters import DualLoRALinear
from fedslip.model.backbone import Backbone
from fedslip.model.depth import DEPTH, DepthAdaptedModel, layer_index, layer_list_path

DEFAULT_CLIENT_LAYERS = [3, 4, 6, 6]


class PFedLoRA(Method):
    """pFedLoRA: heterogeneous-depth clients share a small LoRA adapter, trained alternately with a local model."""

    name = "pfedlora"
    default_head = "local"
    uses_private = True
    personalizes = True

    def __init__(self, cfg):
        super().__init__(cfg)
        if self.head != "local":
            raise UserError(f"pfedlora: method.head = {self.head!r}: the head belongs to each client's "
                            "heterogeneous local model; use \"local\"")
        self.layer_path = ""
        self.n_layers = 0

    # --- model --------------------------------------------------------------------------------------
    def depths(self) -> list[int]:
        """Each client's backbone depth (a depth beyond the backbone's is the whole backbone)."""
        layers = self.m.client_layers or DEFAULT_CLIENT_LAYERS
        return [min(layers[k % len(layers)], self.n_layers) for k in range(self.cfg.partition.n_clients)]

    def shared_depth(self) -> int:
        return min(self.depths())

    def block(self, module_name: str) -> int:
        """Layer index of a LoRA target (a target outside the layer stack runs on every client: 0)."""
        idx = layer_index(self.layer_path, module_name)
        return 0 if idx is None else idx

    def make_model(self, backbone: Backbone) -> DepthAdaptedModel:
        self.layer_path = layer_list_path(backbone.model)
        self.n_layers = len(backbone.model.get_submodule(self.layer_path))
        shared, m = self.shared_depth(), self.m

        def make_layer(name, base):
            r_g = m.r_g if self.block(name) < shared else 0
            return DualLoRALinear(base, r_g, m.alpha_g, m.r_p, m.alpha_p, m.dropout)

        return DepthAdaptedModel(backbone, self.cfg.model.target_modules, make_layer)

    def local_names(self, model: AdaptedModel, depth: int) -> list[str]:
        """The private LoRA tensors of a client of this depth (its layers only) and the head."""
        private = [n for n in model.private_names if self.block(n.rsplit(".", 1)[0]) < depth]
        return private + model.head_names

    def shared_names(self, model: AdaptedModel) -> list[str]:
        return model.global_names

    # --- state --------------------------------------------------------------------------------------
    def init_global(self, model: AdaptedModel, gen: torch.Generator) -> Tensors:
        return model.init_track("g", gen)  # only the first L_min layers have a global track

    def init_client(self, model: AdaptedModel, cid: int, gen: torch.Generator) -> ClientState:
        state = super().init_client(model, cid, gen)  # the local head
        depth = self.depths()[cid]
        private = model.init_track("p", gen)
        keep = set(self.local_names(model, depth))
        state.tensors.update({n: t for n, t in private.items() if n in keep})
        state.tensors[DEPTH] = torch.tensor(depth, dtype=torch.int64)
        return state

    # --- training -----------------------------------------------------------------------------------
    def local_update(self, model: AdaptedModel, down: Payload, client: ClientState, data: ClientData,
                     rnd: int) -> tuple[Payload, ClientState, dict[str, float]]:
        model.load(self.client_view(model, down, client))
        adapter = model.global_names
        local = self.local_names(model, int(client.tensors[DEPTH]))
        opt_a = adamw(model.params(adapter), self.lr(rnd), self.t.weight_decay)
        opt_l = adamw(model.params(local), self.lr(rnd), self.t.weight_decay, client.optim.get("local"))
        a_losses, l_losses = [], []
        with training(model):
            with model.mode("private"):  # 1. local phase: the global adapter frozen (its output detached)
                for batch in self.local_batches(data):
                    l_losses.append(sgd_step(model, batch, local, opt_l, self.t.clip))
            with model.mode("both"):  # 2. adapter phase: the local model frozen
                for batch in self.local_batches(data):
                    a_losses.append(sgd_step(model, batch, adapter, opt_a, self.t.clip))
            up = model.read(adapter)
        client.optim["local"] = host_state(opt_l)
        client.tensors.update(model.read(local))
        return up, client, {"loss": mean(l_losses), "adapter_loss": mean(a_losses)}

    # --- evaluation ---------------------------------------------------------------------------------
    def global_view(self, model: AdaptedModel, glob: Tensors, client: ClientState) -> Tensors | None:
        return None  # no global model: see the module docstring

    def personal_view(self, model: AdaptedModel, glob: Tensors, client: ClientState) -> Tensors:
        """The client's model as it left its last round: the adapter it fitted to its local model in phase 2
        and uploaded (the engine keeps every client's last upload in `client.sent`)."""
        return {**self.client_view(model, glob, client), **client.sent}
