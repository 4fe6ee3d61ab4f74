"""Accuracy of a model view on groups of test examples, and the final summary of a run."""

from __future__ import annotations

import math

import numpy as np
import torch

from fedslip.data.batching import Encoded
from fedslip.errors import warn
from fedslip.evaluation.ledger import Ledger
from fedslip.evaluation.records import MethodResult
from fedslip.model.adapted import AdaptedModel, Tensors


@torch.inference_mode()
def right_answers(model: AdaptedModel, view: Tensors, mode: str, encoded: Encoded, groups: list[np.ndarray],
                  batch_size: int) -> list[np.ndarray]:
    """Load `view`, predict every example of the union of `groups` once, return for each group which of its
    examples (in the group's order) were predicted right."""
    model.load(view)
    everything = np.unique(np.concatenate(groups))
    correct = np.zeros(len(encoded.labels), dtype=bool)
    with model.mode(mode):
        for batch in encoded.eval_batches(everything, batch_size):
            pred = model.logits(batch.input_ids, batch.attention_mask).argmax(-1)
            correct[batch.index] = (pred.cpu() == batch.labels).numpy()
    return [correct[g] for g in groups]


def group_accuracy(model: AdaptedModel, view: Tensors, mode: str, encoded: Encoded, groups: list[np.ndarray],
                   batch_size: int) -> list[float]:
    """Each group's accuracy (`right_answers`)."""
    return [float(r.mean()) for r in right_answers(model, view, mode, encoded, groups, batch_size)]


def as_bits(right: np.ndarray) -> str:
    """Which examples were right, as a string of 0 and 1 (what a client reports: `train.eval_per_example`)."""
    return "".join("1" if r else "0" for r in right)


def scored(value: float | None) -> bool:
    """Whether a client's accuracy exists (None: no such view; NaN: the client was not evaluated)."""
    return value is not None and not math.isnan(value)


def scored_mean(values: list[float | None] | None) -> float | None:
    """The mean over the clients evaluated (None where none was)."""
    present = [v for v in values or [] if scored(v)]
    return sum(present) / len(present) if present else None


def _means(values: list[float | None], weights: list[int]) -> tuple[float | None, float | None, float | None]:
    pairs = [(v, w) for v, w in zip(values, weights) if scored(v)]
    if not pairs:
        return None, None, None
    vs = [v for v, _ in pairs]
    total = sum(w for _, w in pairs)
    return sum(vs) / len(vs), sum(v * w for v, w in pairs) / total, min(vs)


def summarize(result: MethodResult, ledger: Ledger) -> dict[str, float | None]:
    """Last-round metrics (never the best round): unweighted mean, test-size-weighted mean, worst client.

    Traffic: training payloads (`mib_*`), evaluation-only downloads (`eval_mib_*`), and in Flower runs the
    training payloads' bytes as Flower serialized them (`wire_mib_*`). Held-out clients count in none of the
    client means; where there are any, `newcomer_acc_mean` and `newcomer_global_acc_mean` are theirs."""
    mib_total, up_params, wire_mib_total = ledger.total_mib(), ledger.up_params(), ledger.total_wire_mib()
    last = next(r for r in reversed(result.rounds) if r.evaluated)
    trained = [c for c in result.clients if not c.held_out]
    weights = [c.n_test for c in trained]
    final: dict[str, float | None] = {"global_acc": last.global_acc}
    for key in ("client_acc", "personal_acc", "persistent_acc", "kstep_acc"):
        values = [getattr(c, key) for c in trained]
        mean, weighted, worst = _means(values, weights)
        final.update({f"{key}_mean": mean, f"{key}_weighted": weighted, f"{key}_worst": worst})
        counted = sum(scored(v) for v in values)
        if 0 < counted < len(trained):  # e.g. persistent under partial participation: never-selected clients
            final[f"{key}_clients"] = counted
            warn(f"{result.method}: {key.replace('_', ' ')} is over {counted} of {len(trained)} clients "
                 "(the others have no such model, or were not evaluated)")
    newcomers = [c for c in result.clients if c.held_out]
    if newcomers:
        for key in ("newcomer_acc", "newcomer_global_acc"):
            final[f"{key}_mean"] = _means([getattr(c, key) for c in newcomers], [c.n_test for c in newcomers])[0]
    final["train_loss"] = result.rounds[-1].train_loss
    final["mib_per_round"] = mib_total / len(result.rounds)
    final["mib_total"] = mib_total
    final["up_params"] = up_params
    final["eval_mib_per_round"] = ledger.total_mib("eval") / len(result.rounds)
    final["failed_uploads"] = sum(len(r.failed) for r in result.rounds)
    final["rejected_uploads"] = sum(len(r.rejected) for r in result.rounds)
    if wire_mib_total is not None:
        final["wire_mib_per_round"] = wire_mib_total / len(result.rounds)
        final["wire_mib_total"] = wire_mib_total
    return final
