"""FedSLIP: a shared global LoRA track plus a sparse private track that never leaves the client.

Per adapted projection: a global track (r_g 8, α_g 16) trained with FedProx (μ 0.1) and averaged by
FedAvg — the only thing ever transmitted — and a private track (r_p 32, α_p 64) masked to the top 25 % of
its weights by magnitude. Each batch:

1. global step: private track off, loss + μ/2‖g − g_round_start‖², the global AdamW (fresh each round);
2. after `warmup_rounds`: private step: global output detached, loss × λp (0.6), the private AdamW at
   `private_lr_scale` (½) of the learning rate, whose state persists on the client across rounds. Its
   dropout draws come from a stream of their own, so the global steps see the masks they would see alone.

Masks are re-chosen from the private weights' magnitudes after each warmup round and frozen after. Since
the private track takes no steps during warmup, those re-chosen masks equal the initial ones; the mask of
the zero-initialised B is then a seeded random 25 % (ties broken at random). Inference adds both tracks
("zero-shot personalization"). The classification head belongs to the global track by default (trained in
the global step, averaged and sent with it). The reference kept FedSLIP's head frozen at its random init
(its "4.5 MB per round" is LoRA q/v alone): `method.head = "frozen"` does that and sends LoRA alone.

Options beyond the reference (docs/fedslip-plus.md): `method.private_base = "received"` runs the private
steps on the global track as received (what the synced personal view adds them to); `method.private_head`
gives each client its own head, trained in the private step, for its personal model; `method.private_warmup
= "dense"` trains the private track unmasked during warmup, then keeps the top share by trained magnitude
(`method.private_rewind` then restarts the kept weights from their init); `method.private_lr_schedule =
"cosine"` decays the private learning rate over the rounds that take private steps.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from fedslip.methods.base import ClientData, ClientState, Method, adamw, host_state, mean, sgd_step, training
from fedslip.methods.newcomer import private_join
from fedslip.model.adapted import AdaptedModel
from fedslip.seeding import SideStream, client_gen, derive, torch_gen


OWN = "own."  # client.tensors prefix of a private head
PRUNED = "pruned"  # client.optim: the round a dense warmup's pruning happened


class Swap:
    """Context: other values for some of the model's tensors during a private step, the global step's back
    after; `values` keeps what the private step left in them (a trained own head)."""

    def __init__(self, model: AdaptedModel, values):
        self.model, self.values = model, dict(values)

    def __enter__(self):
        self.saved = self.model.snapshot(list(self.values))
        self.model.load(self.values)

    def __exit__(self, *exc):
        self.values = self.model.snapshot(list(self.values))
        self.model.load(self.saved)


def mask_generator(seed: int, cid: int) -> torch.Generator:
    """Tie-breaking order for one client's masks: the same every time, so unchanged weights keep their mask."""
    return torch_gen(seed, "mask", cid)


class DualTrack(Method):
    """What both dual-track designs share: a private track and masks, personalized evaluation."""

    uses_private = True
    personalizes = True

    def init_client(self, model: AdaptedModel, cid: int, gen: torch.Generator) -> ClientState:
        state = super().init_client(model, cid, gen)
        private = model.init_track("p", gen)
        state.tensors.update(private)
        state.tensors.update(self.masks(model, private, cid, dense=self.dense_warmup()))
        return state

    def dense_warmup(self) -> bool:
        return self.m.private_warmup == "dense" and self.m.warmup_rounds > 0

    def setting_warnings(self) -> list[str]:
        if self.dense_warmup() and self.m.warmup_rounds >= self.rounds():
            return [f"{self.name}: method.warmup_rounds = {self.m.warmup_rounds} with a dense private warmup and "
                    f"{self.rounds()} rounds: the private track is never pruned to method.sparsity = "
                    f"{self.m.sparsity} (lower method.warmup_rounds)"]
        return []

    def masks(self, model: AdaptedModel, private, cid: int, dense: bool = False):
        if dense:
            return {f"{n}_mask": torch.ones_like(private[n]) for n in model.private_names}
        return model.masks_for(private, self.m.sparsity, mask_generator(self.t.seed, cid), self.m.mask_ties)

    def refresh_masks(self, model: AdaptedModel, client: ClientState, cid: int, rnd: int) -> None:
        """During a masked warmup, masks follow the private weights' magnitudes after each round."""
        if rnd <= self.m.warmup_rounds and not self.dense_warmup():
            client.tensors.update(self.masks(model, model.read(model.private_names), cid))

    def prune_after_warmup(self, model: AdaptedModel, client: ClientState, cid: int, rnd: int) -> None:
        """A dense warmup prunes once, by the private weights' magnitudes, as the client's first round after
        the warmup begins: a client that missed the warmup's last round prunes at its next one, a newcomer
        when it joins. With `private_rewind` the kept weights then start again from their initial values
        (their AdamW moments, which belong to the trained values, are dropped)."""
        if not self.dense_warmup() or rnd <= self.m.warmup_rounds or self.pruned(model, client):
            return
        client.tensors.update(self.masks(model, {n: client.tensors[n] for n in model.private_names}, cid))
        client.optim[PRUNED] = rnd
        if self.m.private_rewind:
            client.tensors.update(self.initial_private(model, cid))
            client.optim.pop("private", None)

    @staticmethod
    def pruned(model: AdaptedModel, client: ClientState) -> bool:
        """Whether the dense warmup's pruning happened (a state saved before the flag existed: a zero in a mask)."""
        return PRUNED in client.optim or any(not bool(client.tensors[n].all()) for n in model.mask_names)

    def initial_private(self, model: AdaptedModel, cid: int):
        """The private track's values as `init_client` drew them (from the client's generator, which nothing
        draws from before them)."""
        return model.init_track("p", client_gen(self.t.seed, cid))

    def private_lr(self, rnd: int) -> float:
        """The private step's learning rate: `private_lr_scale` of the round's rate, or with
        `private_lr_schedule = "cosine"` that scale of `train.lr` decayed over the rounds that take private steps."""
        if self.m.private_lr_schedule == "cosine":
            first = 1 if self.dense_warmup() else self.m.warmup_rounds + 1
            span = max(1, self.rounds() - first + 1)
            return self.t.lr * self.m.private_lr_scale * 0.5 * (1 + math.cos(math.pi * (rnd - first) / span))
        return self.lr(rnd) * self.m.private_lr_scale

    # --- the private head: stored as "own.<head tensor>", loaded in place of the shared head ----------------
    def client_view(self, model: AdaptedModel, down, client: ClientState):
        return {k: v for k, v in super().client_view(model, down, client).items() if not k.startswith(OWN)}

    def keep_own_head(self, client: ClientState, head) -> None:
        client.tensors.update({OWN + n: t.cpu() for n, t in head.items()})

    def own_head(self, client: ClientState):
        return {k[len(OWN):]: v for k, v in client.tensors.items() if k.startswith(OWN)}

    def personal_view(self, model: AdaptedModel, glob, client: ClientState):
        return {**super().personal_view(model, glob, client), **self.own_head(client)}

    def persistent_view(self, model: AdaptedModel, glob, client: ClientState):
        view = super().persistent_view(model, glob, client)
        return None if view is None else {**view, **self.own_head(client)}

    def keep_private(self, model: AdaptedModel, client: ClientState) -> None:
        names = model.private_names + (model.head_names if self.head == "local" else [])
        client.tensors.update(model.read(names))

    def join_view(self, model: AdaptedModel, down, client: ClientState, data: ClientData):
        """A newcomer trains only its own tensors (private track, private head) on the final global model."""
        joining = ClientState(tensors=dict(client.tensors), optim=dict(client.optim), sent=dict(client.sent))
        self.prune_after_warmup(model, joining, data.cid, self.rounds() + 1)
        return private_join(self, model, down, joining, data)


class FedSLIP(DualTrack):
    name = "fedslip"
    default_head = "shared"

    def local_update(self, model: AdaptedModel, down, client: ClientState, data: ClientData, rnd: int):
        self.prune_after_warmup(model, client, data.cid, rnd)
        model.load(self.client_view(model, down, client))
        g_names = self.global_train_names(model)
        p_names = model.private_names + (model.head_names if self.m.private_head else [])
        opt_g = adamw(model.params(g_names), self.lr(rnd), self.t.weight_decay)
        kept = client.optim.get("private") if self.m.private_optimizer == "persist" else None
        opt_p = adamw(model.params(p_names), self.private_lr(rnd), self.t.weight_decay, kept)
        anchor = model.snapshot(self.shared_names(model))
        swap = self.private_step_values(model, client, anchor)
        private_on = self.private_steps(rnd)
        side = SideStream(derive(self.t.seed, "private-step-dropout", data.cid, rnd), model.device)
        g_losses, p_losses = [], []
        with training(model):
            for batch in self.local_batches(data):
                with model.mode("both" if self.m.global_step_private == "on" else "global"):
                    g_losses.append(sgd_step(model, batch, g_names, opt_g, self.t.clip, prox=(self.m.mu, anchor)))
                if private_on:
                    with model.mode("private" if self.m.private_step_global == "constant" else "both"), \
                            (swap or nullcontext()), side:
                        p_losses.append(sgd_step(model, batch, p_names, opt_p, self.t.clip, scale=self.m.lambda_p))
        client.optim["private"] = host_state(opt_p)
        if self.m.private_head and p_losses:
            self.keep_own_head(client, {n: swap.values[n] for n in model.head_names})
        self.keep_private(model, client)
        self.refresh_masks(model, client, data.cid, rnd)
        metrics = {"loss": mean(g_losses)}
        if p_losses:
            metrics["private_loss"] = mean(p_losses)
        return model.read(self.shared_names(model)), client, metrics

    def setting_warnings(self) -> list[str]:
        if not self.dense_warmup() and self.m.warmup_rounds >= self.rounds():
            return [f"{self.name}: method.warmup_rounds = {self.m.warmup_rounds} with {self.rounds()} rounds: the "
                    "private track never trains (every round is warmup), so personalization is off "
                    "(lower method.warmup_rounds)"]
        return super().setting_warnings()

    def private_steps(self, rnd: int) -> bool:
        """Whether round `rnd`'s batches take a private step after the global one."""
        return rnd > self.m.warmup_rounds or self.dense_warmup()

    def round_cost(self, rnd: int) -> float:
        return 2.0 if self.private_steps(rnd) else 1.0  # a private step costs about what a global one does

    def private_step_values(self, model: AdaptedModel, client: ClientState, received) -> Swap | None:
        """What the private step sees in place of the global step's values: the global track as received
        (`private_base = "received"`, the model the personal view will add the private track to) and the
        client's own head (`private_head`; a copy of the received head until it first trains)."""
        values = {}
        if self.m.private_base == "received":
            values.update(received)
        if self.m.private_head:
            own = self.own_head(client)
            values.update({n: own[n].to(model.device) if n in own else received.get(n, model.snapshot([n])[n])
                           for n in model.head_names})
        return Swap(model, values) if values else None
