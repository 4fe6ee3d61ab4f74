"""Classify new text with an export folder: the label name and every class probability per row.

The base model is resolved as fedslip resolves backbones (a local folder, the cache, the hub, the packaged
MiniLM, or a tiny test model rebuilt from its seed: `fedslip.json` names it) and the adapter is loaded by
PEFT from the folder itself. Texts are tokenized as a run's evaluation tokenizes them (`Encoded`).
Input is CSV or JSON Lines (by suffix), and so is `--out`. Bad input (no folder, not an export, a missing
column, an empty file, a line that is not JSON) is one UserError before anything is
written; `--out` is written to a temporary file and renamed, so it is never half-written.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedslip.atomic import atomic_file
from fedslip.data.batching import Encoded
from fedslip.data.rows import joined_text, read_csv_rows, read_jsonl_rows
from fedslip.errors import UserError
from fedslip.export.peft_folder import META, quiet_peft
from fedslip.model.backbone import load_backbone, require_model

BATCH = 64


@dataclass
class Classifier:
    meta: dict
    model: object  # PeftModel
    tokenizer: object
    pad_id: int

    @property
    def label_names(self) -> list[str]:
        return self.meta["label_names"]


def export_meta(folder: Path) -> dict:
    """The folder's fedslip.json; one clear line when `folder` is not an export."""
    if not folder.is_dir():
        raise UserError(f"{folder}: folder not found")
    if not (folder / META).is_file():
        raise UserError(f"{folder} is not a fedslip export (no {META}); make one with `fedslip export`")
    return json.loads((folder / META).read_text(encoding="utf-8"))


def load_classifier(folder: Path, meta: dict) -> Classifier:
    from peft import PeftModel

    backbone = load_backbone(meta["backbone"], meta["num_labels"], meta["backbone_seed"])
    require_model(backbone, meta.get("backbone_digest"), f"{folder} was exported from")
    with quiet_peft():
        model = PeftModel.from_pretrained(backbone.model, str(folder)).eval()
    return Classifier(meta, model, backbone.tokenizer, backbone.tokenizer.pad_token_id or 0)


@torch.inference_mode()
def probabilities(clf: Classifier, texts: list[str]) -> np.ndarray:
    """(len(texts), classes) softmax probabilities, in input order."""
    enc = Encoded(texts, np.zeros(len(texts)), clf.tokenizer, clf.meta["max_length"], clf.pad_id)
    out = np.zeros((len(texts), len(clf.label_names)))
    for batch in enc.eval_batches(np.arange(len(texts)), BATCH):
        logits = clf.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        out[batch.index] = torch.softmax(logits, dim=-1).numpy()
    return out


def is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".ndjson")


def read_texts(path: Path, columns: list[str]) -> list[str]:
    """One text per CSV row or JSON Lines record (by the file's suffix), read as a run reads its data
    files: the `columns` joined by a space."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    read = read_jsonl_rows if is_jsonl(path) else read_csv_rows
    return [joined_text(row, columns, f"{path}: line {n}: ") for n, row in read(path, columns, "pass --text-columns")]


def write_predictions(out: Path, texts: list[str], probs: np.ndarray, names: list[str]) -> None:
    """A CSV (text, label, one probability column per class) or, for a .jsonl name, one JSON object per
    row (text, label, probabilities by class name); written whole or not at all."""
    with atomic_file(out, newline="", encoding="utf-8") as f:
        if is_jsonl(out):
            for text, p in zip(texts, probs):
                record = {"text": text, "label": names[int(p.argmax())],
                          "probabilities": {n: round(float(x), 6) for n, x in zip(names, p)}}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            w = csv.writer(f)
            w.writerow(["text", "label", *(f"p_{n}" for n in names)])
            for text, p in zip(texts, probs):
                w.writerow([text, names[int(p.argmax())], *(f"{x:.6f}" for x in p)])
