"""Fed-SB (Singhal, Ponkshe et al., 2025, "Fed-SB: A Silver Bullet for Extreme Communication Efficiency and
Performance in (Private) Federated LoRA Fine-Tuning"), built on LoRA-SB (layer: `fedslip.model.lora_sb`).

Every adapted projection is W0 + B R A with A (r × d_in) and B (d_out × r) fixed and identical on every
client; only R (r × r) trains. Because B and A are common and fixed, the update is linear in R and plain
averaging is exact: B (Σ p_k R_k) A = Σ p_k B R_k A — the average of the clients' updates, with no
cross-term error, at r² parameters per layer whatever the number of clients.

- shared, every round, each direction: R of every adapted layer (r² parameters per layer), the server
  taking the example-weighted mean, plus the classification head, trained with R and averaged (the Fed-SB
  code averages the classifier with R); `method.head` = "local" / "frozen" changes only the head.
- sent once: A and B (r·d_in + d_out·r per layer), in a client's first training round (round 2, or
  later for a client that first takes part later: the server records whose uploads it aggregated, and
  sends A and B again to a client that failed or was not selected before); the client keeps them
  (ClientState) and they never change.
- local: nothing else persists; optimiser state is fresh each round, as for every method here.

The initialisation, and the choice the federated setting forces. LoRA-SB initialises from the truncated
SVD of ΔW = −η·sign(Σ ∇W0 L), the first (Adam-like) step of full fine-tuning estimated on training data; the
reference code computes it on the pooled training set before splitting it among clients. Our server has no
data, so Fed-SB here takes one *setup round* before training (`rounds()` = `train.rounds` + 1; round 1
trains nothing): each selected client sends Σ over its training examples of ∇W0 L for every adapted
weight (d_out·d_in per layer, at W0 with the seeded head, dropout off); the server adds them — the pooled
gradient over those clients' data, exactly what a central estimate on the same examples gives — and
computes ΔW = −η·sign(Σ), B = U_r, R = S_r, A = V_rᵀ. That round's upload is a one-time full-weight cost
the ledger records (and which `up_params`, the largest upload, therefore reports); every later round
costs r² per layer (+ head). η is `train.lr` (Adam's first step is ≈ lr·sign(g); the reference divides
its lr by the warmup length because it warms up, our protocol does not). The model starts from that
approximate first step (B R A = rank-r ΔW, non-zero; W0 is not compensated), as the reference code does.
The setup round is a round of the run's records: its evaluation is that initial model, its train loss the
loss at W0. Its uploads are gradient sums, not changes of the global state, so `train.max_update_norm` does
not apply to them. Should none of them be aggregated (every client failed or was rejected), the next round
is a setup round again, with a warning: the run then has one training round fewer, rather than training
R between A = B = 0 (a zero gradient) for the rest of the run.

Paper defaults used: α = r (scale 1, no α tuning), the sign-of-gradient estimate, exact SVD (the reference
uses a randomized one), FedAvg of R. Rank: Fed-SB's R is tiny, so it runs at much larger ranks than LoRA
(its BERT-base SNLI runs use r = 64; LoRA-SB's RoBERTa-large GLUE runs r = 24; its LLM runs r = 120-200).
Ours is r = 8·`method.r_g` — 64 at the reference r_g = 8, Fed-SB's BERT-base setting — capped at a
layer's min(d_in, d_out); on MiniLM (d = 384) that is 4096 parameters per layer against LoRA r = 8's 6144.
Our protocol decides the optimiser (AdamW at `train.lr`, fresh each round), dropout (`method.dropout`;
LoRA-SB's GLUE runs use 0) and target modules.
"""

from __future__ import annotations

import torch

from fedslip.errors import warn
from fedslip.methods.base import ClientData, ClientState, Method, Payload, adamw, mean, sgd_step, training, \
    weighted_mean
from fedslip.model.adapted import AdaptedModel, Tensors
from fedslip.model.backbone import Backbone, is_head
from fedslip.model.lora_sb import full_weight_grads, lora_sb_model, sb_init

RANK_FACTOR = 8  # Fed-SB's rank per unit of the protocol's LoRA rank (8·8 = 64, Fed-SB's BERT-base rank)
SETUP_ROUND = 1

ROUND = "fedsb.round"  # server state: the last round aggregated
HOLDERS = "fedsb.holders"  # server state, per client: 1 once an upload of it after the setup round was aggregated


class FedSB(Method):
    name = "fedsb"
    persistent = False  # the setup round uploads gradients, not values: no persistent view
    own_aggregation = True
    default_head = "shared"

    def rank(self) -> int:
        return RANK_FACTOR * self.m.r_g

    def rounds(self) -> int:
        return self.t.rounds + 1  # the setup round, then `train.rounds` training rounds

    def make_model(self, backbone: Backbone) -> AdaptedModel:
        return lora_sb_model(backbone, self.cfg.model.target_modules, self.rank(), self.m.dropout)

    @staticmethod
    def r_names(model: AdaptedModel) -> list[str]:
        return model.names_ending(".sb_R")

    @staticmethod
    def basis_names(model: AdaptedModel) -> list[str]:
        return model.names_ending(".sb_A", ".sb_B")

    def shared_names(self, model: AdaptedModel) -> list[str]:
        return self.r_names(model) + self.shared_head(model)

    def init_global(self, model: AdaptedModel, gen: torch.Generator) -> Tensors:
        glob = dict(model.head_init) if self.head == "shared" else {}
        glob[HOLDERS] = torch.zeros(self.cfg.partition.n_clients, dtype=torch.int64)
        return glob

    # --- server -> client -----------------------------------------------------------------------------
    @staticmethod
    def basis_built(glob: Tensors) -> bool:
        """Whether a setup round has been aggregated: until then every round is a setup round."""
        return any(k.endswith(".sb_A") for k in glob)

    def checks_update_norm(self, glob: Tensors) -> bool:
        return self.basis_built(glob)  # a setup upload is a gradient sum, not a change of the state

    @staticmethod
    def has_basis(glob: Tensors, cid: int) -> bool:
        """Whether client `cid` holds A and B: it got them in a training round it took part in."""
        return bool(glob[HOLDERS][cid])

    def down_payload(self, glob: Tensors, cid: int) -> Payload:
        if not self.basis_built(glob):
            return {}  # setup round: the client has all it needs (W0 and the seeded head)
        shared_head = self.head == "shared"
        down = {k: t for k, t in glob.items()
                if k.endswith(".sb_R") or (shared_head and is_head(k, self.cfg.model.head_modules))}
        if not self.has_basis(glob, cid):
            down.update({k: t for k, t in glob.items() if k.endswith((".sb_A", ".sb_B"))})
        return down

    # --- client ---------------------------------------------------------------------------------------
    def local_update(self, model: AdaptedModel, down: Payload, client: ClientState, data: ClientData,
                     rnd: int) -> tuple[Payload, ClientState, dict[str, float]]:
        if not any(k.endswith(".sb_R") for k in down):  # a setup round: nothing built yet
            return self.gradient_estimate(model, client, data)
        client.tensors.update({k: t for k, t in down.items() if k.endswith((".sb_A", ".sb_B"))})
        model.load({**model.head_init, **down, **client.tensors})
        names = self.r_names(model) + self.trained_head(model)
        opt = adamw(model.params(names), self.lr(rnd), self.t.weight_decay)
        losses = []
        with training(model):
            for batch in self.local_batches(data):
                losses.append(sgd_step(model, batch, names, opt, self.t.clip))
        up = model.read(self.shared_names(model))
        if self.head == "local":
            client.tensors.update(model.read(model.head_names))
        return up, client, {"loss": mean(losses)}

    def gradient_estimate(self, model: AdaptedModel, client: ClientState, data: ClientData):
        """Setup round: Σ over this client's examples of ∂loss/∂W0 per adapted layer, at W0 and the seeded head."""
        zeros = {n: torch.zeros_like(t) for n, t in model.read(self.r_names(model) + self.basis_names(model)).items()}
        model.load({**model.head_init, **zeros})
        grads, loss = full_weight_grads(model, data.epoch())
        return {f"{layer}.grad": g for layer, g in grads.items()}, client, {"loss": loss}

    # --- server ---------------------------------------------------------------------------------------
    def upload_spec(self, model: AdaptedModel, glob: Tensors, cid: int, rnd: int) -> dict:
        if not self.basis_built(glob):  # a setup round: gradient sums, one d_out × d_in matrix per adapted layer
            return {f"{name}.grad": (tuple(layer.base.weight.shape), torch.float32)
                    for name, layer in model.layers.items()}
        return super().upload_spec(model, glob, cid, rnd)

    def aggregate(self, ups: list[tuple[Payload, int]], glob: Tensors, rnd: int,
                  participants: list[int]) -> Tensors:
        new = dict(glob)
        if not self.basis_built(glob):
            if rnd > SETUP_ROUND:
                warn(f"fedsb round {rnd}: a setup round again (no setup upload was aggregated before); "
                     f"the run has {rnd - SETUP_ROUND} training round(s) fewer")
            for key in ups[0][0]:
                layer = key.removesuffix(".grad")
                pooled = sum(p[key].double() for p, _ in ups)
                b, r, a = sb_init(-self.t.lr * torch.sign(pooled), self.rank())
                new[f"{layer}.sb_B"], new[f"{layer}.sb_R"], new[f"{layer}.sb_A"] = b, r, a
        else:
            new.update(weighted_mean(ups))  # R of every layer (+ the head when shared)
            holders = glob.get(HOLDERS, torch.zeros(self.cfg.partition.n_clients, dtype=torch.int64)).clone()
            holders[participants] = 1
            new[HOLDERS] = holders
        new[ROUND] = torch.tensor(rnd)
        return new

    # --- evaluation -----------------------------------------------------------------------------------
    def global_view(self, model: AdaptedModel, glob: Tensors, client: ClientState) -> Tensors | None:
        """The global model: A, B and the averaged R, with the shared head or the client's local one.

        `glob` is the server's state, or — on a client, e.g. under Flower — a down payload, which lacks A and B
        once the client holds them.
        """
        basis = {k: t for k, t in client.tensors.items() if k.endswith((".sb_A", ".sb_B"))}
        sent = {k: t for k, t in glob.items() if k.endswith((".sb_A", ".sb_B", ".sb_R"))}
        if not basis and not any(k.endswith(".sb_A") for k in sent):  # before any setup: W0, the seeded head
            zeros = {n: torch.zeros_like(t) for n, t in model.read(self.r_names(model) + self.basis_names(model)).items()}
            own = self.head_view(model, glob, client) if self.head == "local" else {}
            return {**model.head_init, **zeros, **own}
        view = {**model.head_init, **basis, **sent}
        view.update(self.head_view(model, glob, client))
        return view

    def personal_view(self, model: AdaptedModel, glob: Tensors, client: ClientState) -> Tensors:
        return self.global_view(model, glob, client)
