"""A newcomer of a dual-track method (fedslip, dualtrack-naive): private-only training on the final global model.

A held-out client (`partition.holdout_clients`) never took part in a round. After the last round it joins
once: it receives the final global model, keeps the global track (and a shared or frozen head) exactly as
received, and trains only what is its own — the private track under the masks `init_client` made for it
and, with `method.private_head`, its own copy of the head — with the private step of FedSLIP: the global
track's output detached (mode "private"), loss × `lambda_p`, AdamW at `lr × private_lr_scale`. The budget is
K-step's: K = n_train // batch_size steps. Its model is then the "personal, synced" view of that state.
"""

from __future__ import annotations

from fedslip.methods.base import ClientData, ClientState, Method, adamw, sgd_step, training
from fedslip.model.adapted import AdaptedModel, Tensors


def private_join(method: Method, model: AdaptedModel, glob: Tensors, client: ClientState, data: ClientData) -> Tensors:
    """The newcomer's personal view after K private steps; `client` (its stored state) is left unchanged."""
    state = ClientState(tensors=dict(client.tensors), optim=dict(client.optim), sent=dict(client.sent))
    model.load(method.client_view(model, glob, state))
    names = model.private_names + (model.head_names if method.m.private_head else [])
    opt = adamw(model.params(names), method.t.lr * method.m.private_lr_scale, method.t.weight_decay)
    k = max(1, len(data) // method.t.batch_size)
    with model.mode("private"), training(model):
        for batch in data.batches(0, steps=k):
            sgd_step(model, batch, names, opt, method.t.clip, scale=method.m.lambda_p)
    state.tensors.update(model.read(model.private_names))
    if method.m.private_head:  # its own head starts as the received one (as in FedSLIP's private step)
        method.keep_own_head(state, model.read(model.head_names))
    return method.personal_view(model, glob, state)
