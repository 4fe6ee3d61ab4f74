"""FLoRA (Wang et al., NeurIPS 2024, "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations"): noise-free stacking aggregation of heterogeneous-rank LoRAs.

Client k trains its own LoRA of rank r_k (ranks from `method.client_ranks`, cycled over client ids;
default [16, 8, 8, 4]). Averaging A's and B's separately is wrong (mean(B)·mean(A) ≠ mean(B·A)) and
impossible across ranks, so the server *stacks* them instead, per adapted layer:

    A = [A_1; A_2; …; A_K]                 (Σ r_k × d_in)
    B = [p_1 s_1 B_1, …, p_K s_K B_K]      (d_out × Σ r_k)      ⇒   B A = Σ_k p_k s_k B_k A_k

with p_k = n_k / Σ n (example counts) and s_k = α_k / r_k each client's own LoRA scaling, so B A is
exactly the example-weighted mean of the clients' updates. The server sends the stacked (A, B); each
client merges B A into its frozen weights (W ← W + B A) and starts the next round from a freshly
initialised LoRA of its rank (A Kaiming-uniform, seeded per client and round; B = 0). The server merges the
same product into its own copy, which is the global model.

- shared, up (client k, per adapted layer): A_k and B_k, r_k·(d_in + d_out) parameters, plus the head.
- shared, down (per adapted layer): the stacked A and B, (Σ_k r_k)·(d_in + d_out) parameters over the
  clients aggregated last round — the downlink grows with the number of clients, as in the paper — plus
  the head. Round 1 has nothing to merge yet: only the head (nothing at all with a local/frozen head).
- local: each client's merged weights, kept as Δ = W − W0 (d_out × d_in per layer, in its ClientState:
  what a real client holds after merging, so memory d_out·d_in per layer per client; the layer adds Δ to
  the shared, never-copied W0 in its forward pass, see `fedslip.model.flora_layer`) and its current LoRA,
  which is discarded once uploaded. The server keeps its own Δ (the global model) in the global state.
- head: not part of the paper (it fine-tunes causal LMs). We share it: trained with the LoRA and averaged
  by FedAvg (a dense tensor, so averaging it is exact), as fedavg does; `method.head` = "local" /
  "frozen" changes only the head.

Paper defaults used: the scaling of the authors' heterogeneous runs, α_k = 2·r_k — here α_k =
(`method.alpha_g` / `method.r_g`)·r_k, i.e. s_k = α_g / r_g for every client (2 with the defaults); the
stacking folds each client's own s_k into its B, so a per-client scaling would be aggregated exactly as
well. LoRA re-initialised every round; example-weighted p_k. Our protocol decides the optimiser (AdamW at
`train.lr`, fresh each round), dropout (`method.dropout`) and target modules.

Where the federated setting forces a choice: under partial participation (`train.client_fraction` < 1)
or client failures a client that missed rounds has missed their stacks. Stacks compose — concatenating
the stacks of several rounds gives the sum of their products — so the server sends such a client every
stack it has not merged yet, concatenated, in one payload. The server records, per client, the round in
which it last took part (its upload was aggregated: it merged everything before that round), keeps a
round's stack while some client still lacks it, and sends a client the stacks from that round on. With
full participation this is exactly the last round's stack. Held-out clients (newcomers,
`partition.holdout_clients`) never train, so no stack is kept for them: a client that lacks a stack the
server has dropped gets the server's merged Δ instead (d_out·d_in per layer) and takes it as its own. A
client whose upload was rejected did merge but is recorded as not having taken part, so it would merge
some stacks twice: keep `train.max_update_norm` loose for FLoRA.
"""

from __future__ import annotations

import torch

from fedslip.methods.base import ClientData, ClientState, Method, Payload, adamw, mean, sgd_step, training, \
    weighted_mean
from fedslip.model.adapted import AdaptedModel, Tensors
from fedslip.model.adapters import lora_pair
from fedslip.model.backbone import Backbone, is_head
from fedslip.model.flora_layer import active, delta_names, flora_model, pair_names
from fedslip.seeding import torch_gen

DEFAULT_RANKS = [16, 8, 8, 4]

# Server-side state besides the merged weights and the head (never loaded into a model nor sent).
ROUND = "flora.round"  # the last round aggregated
TOOK_PART = "flora.took_part"  # per client: the last round whose upload was aggregated (0: never)
STACK = "flora.stack."  # + "{round}." + "{layer}.A" / "{layer}.B": a stack some client has not merged yet
KEPT = "flora.kept"  # the first round whose stack is still kept (earlier ones every training client merged)


class FLoRA(Method):
    name = "flora"
    persistent = False  # uploads are fresh LoRAs merged into the weights: no persistent view
    own_aggregation = True
    default_head = "shared"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.ranks = list(self.m.client_ranks or DEFAULT_RANKS)

    # --- heterogeneous ranks --------------------------------------------------------------------------
    def client_rank(self, cid: int) -> int:
        return self.ranks[cid % len(self.ranks)]

    def alpha(self, rank: int) -> float:
        return self.m.alpha_g / self.m.r_g * rank

    def scaling(self, rank: int) -> float:
        return self.alpha(rank) / rank

    # --- model and state ------------------------------------------------------------------------------
    def make_model(self, backbone: Backbone) -> AdaptedModel:
        return flora_model(backbone, self.cfg.model.target_modules, self.ranks, self.m.dropout)

    def shared_names(self, model: AdaptedModel) -> list[str]:
        return self.shared_head(model)

    def init_client(self, model: AdaptedModel, cid: int, gen: torch.Generator) -> ClientState:
        state = super().init_client(model, cid, gen)
        state.tensors.update({n: torch.zeros_like(t) for n, t in model.read(delta_names(model)).items()})
        return state

    # --- server -> client -----------------------------------------------------------------------------
    @staticmethod
    def first_unmerged(glob: Tensors, cid: int) -> int:
        """The first round whose stack client `cid` has not merged.

        A client merges everything it is sent at the start of its round, so when it last took part in
        round u it holds the stacks of rounds < u; never, it holds none.
        """
        took_part = glob.get(TOOK_PART)
        return max(1, int(took_part[cid])) if took_part is not None else 1

    def init_global(self, model: AdaptedModel, gen: torch.Generator) -> Tensors:
        glob = {n: torch.zeros_like(t) for n, t in model.read(delta_names(model)).items()}
        if self.head == "shared":
            glob.update(model.head_init)
        glob[TOOK_PART] = torch.zeros(self.cfg.partition.n_clients, dtype=torch.int64)
        return glob

    def down_payload(self, glob: Tensors, cid: int) -> Payload:
        """The stacks of every round this client has not merged (concatenated), plus a shared head; the
        merged Δ instead when some of those stacks are no longer kept (a newcomer's)."""
        last = int(glob.get(ROUND, torch.tensor(0)))
        first = self.first_unmerged(glob, cid)
        if first < int(glob.get(KEPT, torch.tensor(1))):
            down = {k: t for k, t in glob.items() if k.endswith(".delta")}
            if self.head == "shared":
                down.update({k: t for k, t in glob.items() if is_head(k, self.cfg.model.head_modules)})
            return down
        parts: dict[str, list[torch.Tensor]] = {}
        for s in range(first, last + 1):
            prefix = f"{STACK}{s}."
            for key, t in glob.items():
                if key.startswith(prefix):
                    parts.setdefault(key[len(prefix):], []).append(t)
        down = {k: torch.cat(ts, dim=0 if k.endswith(".A") else 1) for k, ts in parts.items()}
        if self.head == "shared":
            down.update({k: t for k, t in glob.items() if is_head(k, self.cfg.model.head_modules)})
        return down

    # --- client ---------------------------------------------------------------------------------------
    def local_update(self, model: AdaptedModel, down: Payload, client: ClientState, data: ClientData,
                     rnd: int) -> tuple[Payload, ClientState, dict[str, float]]:
        rank = self.client_rank(data.cid)
        # 1. merge the received stacks into this client's frozen weights: W <- W + B A (or take the server's)
        for layer in model.layers:
            name = f"{layer}.delta"
            if name in down:
                client.tensors[name] = down[name].clone()
            elif f"{layer}.A" in down:
                client.tensors[name] = client.tensors[name] + down[f"{layer}.B"] @ down[f"{layer}.A"]
        # 2. a fresh LoRA of the client's rank on top of the merged weights
        fresh: Tensors = {}
        gen = torch_gen(self.t.seed, "flora-lora", data.cid, rnd)
        for layer_name, layer in model.layers.items():
            a, b = lora_pair(rank, layer.base.in_features, layer.base.out_features, gen)
            fresh[f"{layer_name}.lora_A{rank}"], fresh[f"{layer_name}.lora_B{rank}"] = a, b
        head = {k: t for k, t in down.items() if is_head(k, self.cfg.model.head_modules)}
        model.load({**model.head_init, **head, **client.tensors, **fresh})
        lora = pair_names(model, rank)
        names = lora + self.trained_head(model)
        opt = adamw(model.params(names), self.lr(rnd), self.t.weight_decay)
        losses = []
        with active(model, rank, self.scaling(rank)), training(model):
            for batch in self.local_batches(data):
                losses.append(sgd_step(model, batch, names, opt, self.t.clip))
        trained = model.read(lora)
        up = {}
        for layer in model.layers:
            up[f"{layer}.A"] = trained[f"{layer}.lora_A{rank}"]
            up[f"{layer}.B"] = trained[f"{layer}.lora_B{rank}"]
        if self.head == "shared":
            up.update(model.read(model.head_names))
        elif self.head == "local":
            client.tensors.update(model.read(model.head_names))
        return up, client, {"loss": mean(losses)}

    # --- server ---------------------------------------------------------------------------------------
    def stack(self, ups: list[tuple[Payload, int]]) -> Tensors:
        """Per layer: A = [A_k] stacked by rows, B = [p_k s_k B_k] by columns, so B A = Σ p_k s_k B_k A_k."""
        total = sum(n for _, n in ups)
        layers = [k[:-2] for k in ups[0][0] if k.endswith(".A")]
        out: Tensors = {}
        for layer in layers:
            a = [p[f"{layer}.A"] for p, _ in ups]
            b = [p[f"{layer}.B"] * (n / total * self.scaling(p[f"{layer}.A"].shape[0])) for p, n in ups]
            out[f"{layer}.A"], out[f"{layer}.B"] = torch.cat(a, dim=0), torch.cat(b, dim=1)
        return out

    def upload_spec(self, model: AdaptedModel, glob: Tensors, cid: int, rnd: int) -> dict:
        """The client's own-rank A and B per layer (under the layer's name), plus a shared head."""
        rank = self.client_rank(cid)
        own = model.spec(pair_names(model, rank))
        spec = {f"{layer}.{m}": own[f"{layer}.lora_{m}{rank}"] for layer in model.layers for m in ("A", "B")}
        return {**spec, **model.spec(self.shared_head(model))}

    def aggregate(self, ups: list[tuple[Payload, int]], glob: Tensors, rnd: int,
                  participants: list[int]) -> Tensors:
        new = dict(glob)
        stacked = self.stack(ups)
        for key, t in stacked.items():
            new[f"{STACK}{rnd}.{key}"] = t
            if key.endswith(".A"):
                layer = key[:-2]
                new[f"{layer}.delta"] = glob[f"{layer}.delta"] + stacked[f"{layer}.B"] @ t
        if self.head == "shared":
            heads = [({k: t for k, t in p.items() if is_head(k, self.cfg.model.head_modules)}, n) for p, n in ups]
            new.update(weighted_mean(heads))
        new[ROUND] = torch.tensor(rnd)
        took_part = glob.get(TOOK_PART, torch.zeros(self.cfg.partition.n_clients, dtype=torch.int64)).clone()
        took_part[participants] = rnd
        new[TOOK_PART] = took_part
        trained = range(self.cfg.partition.n_clients - self.cfg.partition.holdout_clients)
        oldest = min(self.first_unmerged(new, k) for k in trained)
        for key in [k for k in new if k.startswith(STACK)]:  # stacks every training client has merged
            if int(key[len(STACK):].split(".", 1)[0]) < oldest:
                del new[key]
        new[KEPT] = torch.tensor(oldest)
        return new

    # --- evaluation -----------------------------------------------------------------------------------
    def global_view(self, model: AdaptedModel, glob: Tensors, client: ClientState) -> Tensors | None:
        """The merged weights (no LoRA active) with the shared head, or the client's local one.

        `glob` is the server's state (its own merged weights), or — on a client, e.g. under Flower — a down
        payload: then the client's merged weights plus the stacks the payload carries.
        """
        deltas = delta_names(model)
        if all(n in glob for n in deltas):
            view = {n: glob[n] for n in deltas}
        else:
            view = {}
            for layer in model.layers:
                d = client.tensors[f"{layer}.delta"]
                view[f"{layer}.delta"] = d + glob[f"{layer}.B"] @ glob[f"{layer}.A"] if f"{layer}.A" in glob else d
        view = {**model.head_init, **view}
        view.update(self.head_view(model, glob, client))
        return view

    def personal_view(self, model: AdaptedModel, glob: Tensors, client: ClientState) -> Tensors:
        return self.global_view(model, glob, client)
