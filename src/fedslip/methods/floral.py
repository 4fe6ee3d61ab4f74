"""FLoRAL (Almansoori, Horváth & Takáč, "Collaborative and Efficient Personalization with Mixtures of
Adaptors", CPAL 2025, arXiv:2410.03497): K federated LoRA adaptors per adapted layer, mixed on each client by
private mixture weights.

Model. Every LoRA target carries K = `method.n_adaptors` (default 4) LoRA adaptors of rank r_g, α_g (the
LoRA of single-LoRA methods, so K = 1 is exactly FedAvg + LoRA); a client's model is
W x + (α/r) Σ_c π_c B_c A_c x with π = softmax(z) over K private logits z (`model/mixture.py`). As FLoRAL's
default router (`router_per_layer: False`), there is ONE mixture per client for the whole model, not one
per layer; the logits start at zero (the uniform mixture) and, as in its code (`noise_std: 1.0`), get
uniform [0, 1) noise during training, one draw per forward pass, from a per-(client, round) generator.

What is shared / stays local. The adaptors (all K, for every layer) are federated; the mixture logits are
client state and never leave the client. The classification head is `shared` by default: FLoRAL federates
every non-adaptor parameter it trains (its "base model") by plain FedAvg, and our head is the only such
parameter; `method.head = "local"` keeps it private instead.

How the server combines. FLoRAL's server averages adaptor c over clients i with weights proportional to
n_i·π_ic (`FloralAvg` in the official code):

    θ_c ← Σ_i n_i π_ic θ_ic / Σ_i n_i π_ic

In the official code the server reads each client's router weights out of the parameters that client
uploads (`FedAvgWithRouter.get_router_weights`), which puts the mixture on the wire. Here nothing from
which π_i can be computed is sent:

1. the client uploads its adaptor updates pre-scaled by its own mixture, π_ic·(θ_ic − θ_c). The server
   never sees θ_ic, so it cannot divide the scale out (pre-scaling the adaptors themselves would leak π:
   A is non-zero and barely moves, so π_ic ≈ upload / A_c). The scaled update still carries what any
   per-adaptor update carries (an adaptor a client uses little also moves little); that is inherent to
   federating the adaptors at all, and is no more than an unscaled update would show;
2. the normalisers S_c = Σ_i n_i π_ic are obtained by secure aggregation (Bonawitz et al., CCS 2017): each
   client sends its load n_i π_ic as a fixed-point integer plus pairwise masks that cancel in the sum over
   the round's participants (arithmetic mod 2^64; each masked value alone is uniformly distributed). The
   server learns only S_c, a sum over clients, and checks Σ_c S_c = Σ_i n_i. In this simulation the
   pairwise mask seeds are derived from the run seed and the pair of client ids; they stand for the keys
   each pair of clients agrees on. The server announces the round's cohort in the download. When a
   client of the cohort drops out (or its upload is rejected), the survivors' masks with it do not
   cancel: the server removes them (`recovered_masks`), standing for secure aggregation's recovery step,
   in which survivors reveal shares of the dropped client's keys (that small extra message is not in the
   ledger). Masks between survivors are never derived by the server. With a single participant the sum
   is that client's load, as with any secure aggregation;
3. the server adds θ_c ← θ_c + Σ_i n_i·upload_ic / S_c, which is the rule above.

Per client and round, down: the K adaptors of every layer (+ head if shared) + the cohort (int64 client
ids); up: the same shapes (scaled updates) + K int64 masked loads (+ head if shared).

Evaluation. Personalized: the client's own mixture. Global: the server has no mixture, so the global model
is the uniform mixture (the logits' initial value); with K = 1 it is FedAvg's global model.

Paper choices not taken: FLoRAL's adaptors also have an output bias and use α = 1 with a rank set as a
fraction of the layer size, trained by its preconditioned-LoRA SGD; we use our LoRA (r_g, α_g, no bias, A
random and B zero) trained by AdamW, so that K = 1 reduces to our FedAvg + LoRA. The router's learning
rate is the adaptors' (its `router_lr: ${lr}`); the logits get no weight decay. No entropy regulariser
(its default weight is 0).
"""

from __future__ import annotations

import numpy as np
import torch

from fedslip.methods.base import ClientData, ClientState, Method, Payload, mean, sgd_step, training, weighted_mean
from fedslip.model.adapted import AdaptedModel, Tensors
from fedslip.model.adapters import lora_pair
from fedslip.model.backbone import Backbone
from fedslip.model.mixture import MixtureWeights, mixture_factory
from fedslip.seeding import numpy_gen, torch_gen

ROUTER_NOISE = 1.0  # FLoRAL's router noise_std: uniform [0, noise) added to the logits while training
LOAD = "floral.masked_load"  # the masked fixed-point loads n_i·π_i (K int64) in an upload
COHORT = "floral.cohort"  # the round's selected clients (int64 ids): server state and every download
FRAC_BITS = 32  # fixed-point resolution of a load: 2^-32 of an example


class FLoRAL(Method):
    """FLoRAL: K federated LoRA adaptors per layer, mixed by private per-client weights."""

    name = "floral"
    persistent = False  # uploads are mixture-weighted changes, not values: no persistent view
    default_head = "shared"
    personalizes = True
    uploads_deltas = True
    own_aggregation = True

    # --- model --------------------------------------------------------------------------------------
    def make_model(self, backbone: Backbone) -> AdaptedModel:
        m = self.m
        router = MixtureWeights(m.n_adaptors, ROUTER_NOISE)
        model = AdaptedModel(backbone, self.cfg.model.target_modules,
                             mixture_factory(router, m.r_g, m.alpha_g, m.dropout))
        model.net.register_forward_pre_hook(lambda module, args: router.sample_noise())
        return model

    @staticmethod
    def router(model: AdaptedModel) -> MixtureWeights:
        return next(iter(model.layers.values())).router

    @staticmethod
    def router_name(model: AdaptedModel) -> str:
        return model.names_ending(".router.logits")[0]

    @staticmethod
    def adaptor_names(model: AdaptedModel) -> list[str]:
        return model.names_ending(".mix_A", ".mix_B")

    def shared_names(self, model: AdaptedModel) -> list[str]:
        return self.adaptor_names(model) + self.shared_head(model)

    # --- state --------------------------------------------------------------------------------------
    def init_global(self, model: AdaptedModel, gen: torch.Generator) -> Tensors:
        glob: Tensors = {}
        for name, layer in model.layers.items():
            pairs = [lora_pair(layer.r, layer.base.in_features, layer.base.out_features, gen)
                     for _ in range(layer.k)]
            glob[f"{name}.mix_A"] = torch.stack([a for a, _ in pairs])
            glob[f"{name}.mix_B"] = torch.stack([b for _, b in pairs])
        if self.head == "shared":
            glob.update(model.head_init)
        return glob

    def init_client(self, model: AdaptedModel, cid: int, gen: torch.Generator) -> ClientState:
        state = super().init_client(model, cid, gen)
        state.tensors[self.router_name(model)] = torch.zeros(self.m.n_adaptors)
        return state

    def open_round(self, glob: Tensors, rnd: int, cohort: list[int]) -> Tensors:
        return {**glob, COHORT: torch.tensor(cohort, dtype=torch.int64)}

    def upload_spec(self, model: AdaptedModel, glob: Tensors, cid: int, rnd: int) -> dict:
        return {**super().upload_spec(model, glob, cid, rnd), LOAD: ((self.m.n_adaptors,), torch.int64)}

    # --- training -----------------------------------------------------------------------------------
    def local_update(self, model: AdaptedModel, down: Payload, client: ClientState, data: ClientData,
                     rnd: int) -> tuple[Payload, ClientState, dict[str, float]]:
        cohort = down[COHORT].tolist()
        down = without_cohort(down)
        model.load(self.client_view(model, down, client))
        adaptors = self.adaptor_names(model)
        head = self.trained_head(model)
        logits = self.router_name(model)
        opt = torch.optim.AdamW([{"params": model.params(adaptors + head)},
                                 {"params": model.params([logits]), "weight_decay": 0.0}],
                                lr=self.lr(rnd), weight_decay=self.t.weight_decay)
        names = adaptors + head + [logits]
        router = self.router(model)
        router.noise_gen = torch_gen(self.t.seed, "floral-noise", data.cid, rnd)
        losses = []
        try:
            with training(model):
                for batch in self.local_batches(data):
                    losses.append(sgd_step(model, batch, names, opt, self.t.clip))
        finally:
            router.noise_gen = None
        client.tensors[logits] = model.read([logits])[logits]
        if self.head == "local":
            client.tensors.update(model.read(model.head_names))
        pi = torch.softmax(client.tensors[logits], dim=-1)
        up: Payload = {}
        for name, value in model.read(adaptors).items():
            up[name] = (value - down[name]) * pi.view(-1, *[1] * (value.dim() - 1))
        if self.head == "shared":
            up.update(model.read(model.head_names))
        up[LOAD] = self.masked_load(pi.double() * len(data), data.cid, rnd, cohort)
        return up, client, {"loss": mean(losses)}

    # --- secure aggregation of the loads ------------------------------------------------------------
    def pair_mask(self, i: int, j: int, rnd: int) -> np.ndarray:
        """The mask stream of the pair {i, j} in round rnd (stands for a key the two clients agree on)."""
        lo, hi = min(i, j), max(i, j)
        return numpy_gen(self.t.seed, "floral-secagg", lo, hi, rnd).integers(
            0, 2**64, size=self.m.n_adaptors, dtype=np.uint64)

    def masks_of(self, cid: int, others: list[int], rnd: int) -> np.ndarray:
        """Σ_j ±mask_ij over the clients j in `others` (+ when cid < j), mod 2^64."""
        total = np.zeros(self.m.n_adaptors, dtype=np.uint64)
        for j in others:
            if j != cid:
                mask = self.pair_mask(cid, j, rnd)
                total = total + mask if cid < j else total - mask  # uint64 arithmetic wraps mod 2^64
        return total

    def masked_load(self, load: torch.Tensor, cid: int, rnd: int, cohort: list[int]) -> torch.Tensor:
        """n_i·π_i in fixed point plus Σ_j ±mask_ij (mod 2^64): alone, a uniformly random vector."""
        value = np.round(load.double().numpy() * 2.0**FRAC_BITS).astype(np.uint64)
        return torch.from_numpy((value + self.masks_of(cid, cohort, rnd)).view(np.int64).copy())

    def recovered_masks(self, survivors: list[int], dropped: list[int], rnd: int) -> np.ndarray:
        """The survivors' masks with the dropped clients: they do not cancel, so the server removes them."""
        total = np.zeros(self.m.n_adaptors, dtype=np.uint64)
        for i in survivors:
            total = total + self.masks_of(i, dropped, rnd)
        return total

    @staticmethod
    def unmask_sum(masked: list[torch.Tensor], residual: np.ndarray | None = None) -> torch.Tensor:
        """Σ_i masked_i (− residual) mod 2^64, read back as fixed point: the total load of each adaptor."""
        total = np.zeros(masked[0].numel(), dtype=np.uint64)
        for m in masked:
            total = total + m.numpy().view(np.uint64)
        if residual is not None:
            total = total - residual
        return torch.from_numpy(total.astype(np.float64) / 2.0**FRAC_BITS)

    # --- server -------------------------------------------------------------------------------------
    def aggregate(self, ups: list[tuple[Payload, int]], glob: Tensors, rnd: int,
                  participants: list[int]) -> Tensors:
        dropped = [c for c in glob[COHORT].tolist() if c not in participants]
        loads = self.unmask_sum([p[LOAD] for p, _ in ups], self.recovered_masks(participants, dropped, rnd))
        n_total = sum(n for _, n in ups)
        if abs(float(loads.sum()) - n_total) > 1e-6 * n_total:
            raise RuntimeError(f"floral: the masked loads do not sum to the {n_total} examples of round {rnd} "
                               "(masks did not cancel: were all participants' uploads received?)")
        new = dict(glob)
        heads = [n for n in glob if n in ups[0][0] and not n.endswith((".mix_A", ".mix_B"))]
        if heads:
            new.update(weighted_mean([({h: p[h] for h in heads}, n) for p, n in ups]))
        for name, value in glob.items():
            if not name.endswith((".mix_A", ".mix_B")):
                continue
            step = sum(p[name].double() * n for p, n in ups)
            denom = loads.view(-1, *[1] * (value.dim() - 1))
            step = torch.where(denom > 0, step / denom.clamp_min(1e-300), torch.zeros_like(step))
            new[name] = (value.double() + step).to(value.dtype)
        return new

    # --- evaluation ---------------------------------------------------------------------------------
    def global_view(self, model: AdaptedModel, glob: Tensors, client: ClientState) -> Tensors:
        """The federated adaptors under the uniform mixture (the server holds no mixture)."""
        view = super().global_view(model, without_cohort(glob), client)
        view[self.router_name(model)] = torch.zeros(self.m.n_adaptors)
        return view

    def personal_view(self, model: AdaptedModel, glob: Tensors, client: ClientState) -> Tensors:
        return super().personal_view(model, without_cohort(glob), client)


def without_cohort(tensors: Tensors) -> Tensors:
    return {k: t for k, t in tensors.items() if k != COHORT}
