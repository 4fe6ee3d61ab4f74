"""The Method seam: what differs between federated methods, over one shared engine.

A method owns nothing but policy. The engine owns the model, the data and the loop; it calls:

    init_global(model, gen)                     -> glob        server state (tensors by name)
    init_client(model, cid, gen)                -> ClientState never serialized, never sent
    open_round(glob, r, cohort)                 -> glob        server bookkeeping for the selected clients
    down_payload(glob, cid)                     -> Payload     what the server sends to client cid
    local_update(model, down, client, data, r)  -> (Payload, ClientState, metrics)
    upload_spec(model, glob, cid, r)            -> names, shapes, dtypes of an honest upload
    aggregate(ups, glob, r, participants)       -> glob        participants: the clients whose uploads
                                                               arrived and passed the checks, as ups
    global_view / personal_view                 -> what to evaluate (personal: final global + own state)
    persistent_view                             -> the client's model as it left its last local training
    join_view(model, down, client, data)        -> a held-out client's model after it joins once, after the
                                                   last round (None: the method has no such join)

A `Payload` (flat name -> tensor dict) is the only thing that crosses the client/server boundary; the
engine serializes every payload and the ledger counts those bytes.

Default behaviour here is FedAvg over the shared tensors with LoRA on the global track; subclasses
override only what they change. The head policy says what happens to the classification head:
"shared" (trained and averaged), "local" (trained, stays on the client) or "frozen" (the seeded random
init, identical on every client, never trained, never sent).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from fedslip.data.batching import Batch
from fedslip.errors import UserError
from fedslip.model.adapted import AdaptedModel, Tensors
from fedslip.model.backbone import Backbone

if TYPE_CHECKING:
    from fedslip.config import Config

Payload = dict[str, torch.Tensor]


@dataclass
class ClientState:
    tensors: Tensors = field(default_factory=dict)  # private adapters, masks, local head
    optim: dict[str, Any] = field(default_factory=dict)  # optimizer states that persist across rounds
    # The client's copy of what it last uploaded, for methods whose personal model uses it (pfedlora). Public
    # by construction: it is exactly what was sent, so the wire audit does not count it as private.
    sent: Tensors = field(default_factory=dict)


class ClientData:
    """One client's training examples; `epoch()` gives freshly shuffled, length-bucketed batches."""

    def __init__(self, cid: int, encoded, idx, batch_size: int, rng, length_pool: int):
        self.cid, self.encoded, self.idx, self.batch_size, self.rng = cid, encoded, idx, batch_size, rng
        self.length_pool = length_pool

    def __len__(self) -> int:
        return len(self.idx)

    def epoch(self) -> list[Batch]:
        return self.encoded.train_batches(self.idx, self.batch_size, self.rng, self.length_pool)

    def batches(self, epochs: int, steps: int | None = None) -> Iterator[Batch]:
        """`epochs` freshly shuffled epochs, or exactly `steps` batches (as many epochs as that takes)."""
        if steps is None:
            for _ in range(epochs):
                yield from self.epoch()
            return
        done = 0
        while done < steps:
            for batch in self.epoch():
                if done == steps:
                    return
                yield batch
                done += 1


class Method:
    name = "base"
    default_head = "shared"
    uses_private = False  # builds the private track (r_p > 0)
    personalizes = False  # personal_view differs from global_view
    communicates = True
    uploads_deltas = False  # uploads are changes, not values (the norm check then takes them whole)
    persistent = True  # an upload holds the trained values, so the client can keep its last model (`sent`)
    own_aggregation = False  # `aggregate` is part of the method (stacks, masks, a setup): no Flower strategy
    settings: dict = {}  # {section: {key: value}} this method always runs with (over the run's; by_method wins)

    def __init__(self, cfg: Config):
        cfg = cfg.for_method(self.name, self.settings)  # its own settings, then the user's by_method ones
        self.cfg = cfg
        self.m = cfg.method
        self.t = cfg.train
        self.head = cfg.method.head or self.default_head
        strategy = (cfg.method.strategy or "method").strip()
        if strategy.lower() != "method" and self.own_aggregation:
            raise UserError(f"method.strategy = {strategy!r}: {self.name} aggregates by a rule of its own, which a "
                            f"Flower strategy cannot replace (set the strategy per method: by_method.<name>)")

    # --- model --------------------------------------------------------------------------------------
    def build(self, backbone: Backbone) -> AdaptedModel:
        """This method's model on `backbone`, its head being the modules `model.head_modules` names."""
        return self.make_model(replace(backbone, head_modules=self.cfg.model.head_modules))

    def make_model(self, backbone: Backbone) -> AdaptedModel:
        m = self.m
        r_p = m.r_p if self.uses_private else 0
        return AdaptedModel.dual(backbone, self.cfg.model.target_modules, m.r_g, m.alpha_g, r_p, m.alpha_p, m.dropout)

    def rounds(self) -> int:
        return self.t.rounds

    def setting_warnings(self) -> list[str]:
        """Settings that are valid but almost certainly not what the user meant (printed once, before a run)."""
        return []

    def checks_update_norm(self, glob: Tensors) -> bool:
        """Whether this round's uploads are model values or changes, so that `train.max_update_norm` applies."""
        return True

    def round_cost(self, rnd: int) -> float:
        """Round `rnd`'s local training relative to one pass of local steps: for time estimates only."""
        return 1.0

    def local_epochs(self) -> int:
        return self.t.local_epochs

    def local_batches(self, data: ClientData) -> Iterator[Batch]:
        """A round's local training: `train.local_steps` batches when set, else `local_epochs()` epochs."""
        return data.batches(self.local_epochs(), self.t.local_steps)

    def lr(self, rnd: int) -> float:
        """The learning rate of round `rnd`: `train.lr`, decayed by `train.lr_schedule` over the rounds."""
        if self.t.lr_schedule == "cosine" and self.rounds() > 1:
            return self.t.lr * 0.5 * (1 + math.cos(math.pi * (rnd - 1) / self.rounds()))
        return self.t.lr

    def shared_head(self, model: AdaptedModel) -> list[str]:
        """Head tensors that travel with the shared payload (head policy "shared")."""
        return model.head_names if self.head == "shared" else []

    def trained_head(self, model: AdaptedModel) -> list[str]:
        """Head tensors that are trained ("shared" or "local"; a "frozen" head never changes)."""
        return model.head_names if self.head != "frozen" else []

    def head_view(self, model: AdaptedModel, glob: Tensors, client: ClientState) -> Tensors:
        """The head a client's model uses: the shared one from `glob`, its own, or the seeded init."""
        if self.head == "shared":
            return {n: glob[n] for n in model.head_names}
        if self.head == "local":
            return {n: client.tensors[n] for n in model.head_names}
        return dict(model.head_init)

    def shared_names(self, model: AdaptedModel) -> list[str]:
        """Tensors the server and clients exchange."""
        return model.global_names + self.shared_head(model)

    def global_train_names(self, model: AdaptedModel) -> list[str]:
        """Tensors the global (shared) step trains: the global track and a non-frozen head."""
        return model.global_names + self.trained_head(model)

    # --- state --------------------------------------------------------------------------------------
    def init_global(self, model: AdaptedModel, gen: torch.Generator) -> Tensors:
        glob = model.init_track("g", gen)
        if self.head == "shared":
            glob.update(model.head_init)
        return glob

    def init_client(self, model: AdaptedModel, cid: int, gen: torch.Generator) -> ClientState:
        state = ClientState()
        if self.head == "local":
            state.tensors.update(model.head_init)
        return state

    def open_round(self, glob: Tensors, rnd: int, cohort: list[int]) -> Tensors:
        """Server bookkeeping before a round's downloads (`cohort`: the clients selected)."""
        return glob

    def down_payload(self, glob: Tensors, cid: int) -> Payload:
        return dict(glob)

    def upload_spec(self, model: AdaptedModel, glob: Tensors, cid: int, rnd: int) -> dict:
        """What an honest upload of client `cid` in round `rnd` holds: {name: (shape, dtype)}."""
        return model.spec(self.shared_names(model))

    def client_view(self, model: AdaptedModel, down: Payload, client: ClientState) -> Tensors:
        """Every varying tensor a client's model holds: seeded head init, then what it received, then its own."""
        return {**model.head_init, **down, **client.tensors}

    # --- training -----------------------------------------------------------------------------------
    def local_update(self, model: AdaptedModel, down: Payload, client: ClientState, data: ClientData,
                     rnd: int) -> tuple[Payload, ClientState, dict[str, float]]:
        model.load(self.client_view(model, down, client))
        names = self.global_train_names(model)
        opt = adamw(model.params(names), self.lr(rnd), self.t.weight_decay)
        anchor = model.snapshot(self.shared_names(model)) if self.prox_mu() > 0 else None
        losses = []
        with model.mode("global"), training(model):
            for batch in self.local_batches(data):
                losses.append(sgd_step(model, batch, names, opt, self.t.clip,
                                       prox=(self.prox_mu(), anchor)))
        up = model.read(self.shared_names(model))
        if self.head == "local":
            client.tensors.update(model.read(model.head_names))
        return up, client, {"loss": mean(losses)}

    def prox_mu(self) -> float:
        return 0.0

    def set_proximal_mu(self, mu: float) -> None:
        """Use `mu` as the global step's proximal coefficient (a Flower FedProx strategy says so)."""
        self.prox_mu = lambda: mu
        self.m.mu = mu
        self.m.fedavg_mu = mu

    def aggregate(self, ups: list[tuple[Payload, int]], glob: Tensors, rnd: int,
                  participants: list[int]) -> Tensors:
        return {**glob, **weighted_mean(ups)}

    # --- evaluation ---------------------------------------------------------------------------------
    def global_view(self, model: AdaptedModel, glob: Tensors, client: ClientState) -> Tensors | None:
        """The global model (global track, shared or frozen head; a local head comes from the client)."""
        head = {n: client.tensors[n] for n in model.head_names} if self.head == "local" else {}
        return {**model.head_init, **glob, **head}

    def personal_view(self, model: AdaptedModel, glob: Tensors, client: ClientState) -> Tensors:
        """"Personal, synced": what the client holds on top of the latest global model."""
        return self.client_view(model, glob, client)

    def persistent_view(self, model: AdaptedModel, glob: Tensors, client: ClientState) -> Tensors | None:
        """"Personal, persistent": the client's model as it left its last local training, never re-synced
        (its own last upload in place of the global values); None before it first trained."""
        if not self.persistent or not client.sent:
            return None
        return {**self.personal_view(model, glob, client), **client.sent}

    def join_view(self, model: AdaptedModel, glob: Tensors, client: ClientState, data: ClientData) -> Tensors | None:
        """A newcomer (a held-out client) joining once after the last round: its model after whatever local
        training the method gives a client that arrives late, from the final global model `glob` and its fresh
        state (left unchanged). Evaluated in mode "both" if the method personalizes, else "global". None: no join."""
        return None


# --- shared helpers ------------------------------------------------------------------------------------
def host_state(opt: torch.optim.Optimizer) -> dict:
    """The optimizer's state to keep with a client: on the host, as the rest of a client's state is (on a
    GPU, a thousand clients' moments would otherwise stay in its memory); `adamw` moves it back."""
    return {k: ({i: {n: t.cpu() if isinstance(t, torch.Tensor) else t for n, t in st.items()}
                 for i, st in v.items()} if k == "state" else v) for k, v in opt.state_dict().items()}


def adamw(params, lr: float, weight_decay: float, state: dict | None = None) -> torch.optim.AdamW:
    """AdamW at `lr`; `state`: moments kept from an earlier round (its saved learning rate is not)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if state:
        opt.load_state_dict(state)
        for group in opt.param_groups:
            group["lr"] = lr
    return opt


class training:
    """Context: the network in train mode (dropout on), back to eval mode after."""

    def __init__(self, model: AdaptedModel):
        self.model = model

    def __enter__(self):
        self.model.net.train()

    def __exit__(self, *exc):
        self.model.net.eval()
        self.model.set_trainable([])


def sgd_step(model: AdaptedModel, batch: Batch, names: list[str], opt: torch.optim.Optimizer, clip: float,
             scale: float = 1.0, prox: tuple[float, Tensors | None] = (0.0, None)) -> float:
    """One optimizer step on `names`: loss·scale (+ μ/2·Σ‖w − w_anchor‖² over the anchor's tensors)."""
    model.set_trainable(names)
    logits = model.logits(batch.input_ids, batch.attention_mask)
    loss = F.cross_entropy(logits, batch.labels.to(logits.device))
    total = loss * scale
    mu, anchor = prox
    if mu > 0 and anchor:
        params = dict(zip(anchor, model.params(list(anchor))))
        total = total + 0.5 * mu * sum(((params[n] - a) ** 2).sum() for n, a in anchor.items())
    opt.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.params(names), clip)
    opt.step()
    return float(loss.detach())


def weighted_mean(ups: list[tuple[Payload, int]]) -> Tensors:
    """Per-tensor average of client payloads weighted by their example counts (FedAvg)."""
    total = sum(n for _, n in ups)
    names = ups[0][0].keys()
    return {k: sum(p[k].double() * (n / total) for p, n in ups).to(ups[0][0][k].dtype) for k in names}


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
