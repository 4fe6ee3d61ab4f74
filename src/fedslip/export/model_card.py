"""The README.md of an export folder: what the adapter is, where it came from and how well it did.

Metrics are the run's own (its results.json), for the exported model only; nothing here is re-measured.
"""

from __future__ import annotations

from fedslip.export.trained_view import TrainedView
from fedslip.model.backbone import TINY_PREFIX


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def metric_rows(view: TrainedView) -> list[tuple[str, str]]:
    final = view.result["final"]
    if view.client is None:
        return [("global accuracy (balanced global test set)", _pct(final.get("global_acc"))),
                ("mean accuracy on the clients' test sets", _pct(final.get("client_acc_mean")))]
    c = view.result["clients"][view.client]
    if not view.method.personalizes:  # the client's model is the global one
        return [(f"accuracy on client {view.client}'s test set ({c['n_test']} examples)", _pct(c["client_acc"])),
                ("training examples of this client", str(c["n_train"]))]
    return [(f"accuracy on client {view.client}'s test set ({c['n_test']} examples)", _pct(c["personal_acc"])),
            ("the global model on the same test set", _pct(c["client_acc"])),
            ("training examples of this client", str(c["n_train"]))]


def model_card(view: TrainedView, rank: int) -> str:
    final = view.result["final"]
    mib = final.get("mib_per_round") or 0.0
    rows = [("method", f"`{view.method.name}`"), ("model", view.who), ("backbone", f"`{view.cfg.model.backbone}`"),
            ("classes (in order)", ", ".join(view.label_names)), *metric_rows(view),
            ("traffic per round (all clients, up + down, measured)", f"{round(mib * 2**20):,} bytes ({mib:.3f} MiB)"),
            ("LoRA", f"rank {rank}, lora_alpha {rank} (scale 1: every scale is folded into lora_B), "
                     f"targets {', '.join(sorted({n.rsplit('.', 1)[-1] for n in view.model.layers}))}"),
            ("run", f"`{view.run_dir.resolve()}`, computed in {view.precision}")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    tiny = (f"\n`{TINY_PREFIX}*` backbones are fedslip's test models, not hub names: "
            f"`fedslip.model.backbone.load_backbone(\"{view.cfg.model.backbone}\", {len(view.label_names)}, "
            f"{view.cfg.train.seed}).model` rebuilds this base.\n" if view.cfg.model.backbone.startswith(TINY_PREFIX) else "")
    bf16 = ("\nThe run computed in bf16; this folder computes in the precision it is loaded in (fp32 by default), "
            "so its logits differ from the run's by bf16 rounding.\n" if view.precision == "bf16" else "")
    return f"""---
library_name: peft
base_model: {view.cfg.model.backbone}
tags: [fedslip, lora, text-classification]
---

# {view.method.name}: {view.who}

A plain PEFT LoRA folder holding exactly the model fedslip evaluated as the {view.who}: every adapter
track of each projection folded into one LoRA, and the classification head in `modules_to_save`.
Class names are in `fedslip.json` (`label_names`).

| | |
|---|---|
{table}
{bf16}{tiny}
```python
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

base = AutoModelForSequenceClassification.from_pretrained("{view.cfg.model.backbone}", num_labels={len(view.label_names)})
model = PeftModel.from_pretrained(base, "THIS_FOLDER").eval()
tokenizer = AutoTokenizer.from_pretrained("{view.cfg.model.backbone}")
```

Or `fedslip predict THIS_FOLDER --text "..."`.
"""
