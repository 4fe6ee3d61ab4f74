"""Measure the shared payload (LoRA q/v + classifier) of DistilBERT-base and MiniLM, as sent per round.

    python benchmarks/payload_bytes.py

DistilBERT-base is built with its published shape (768 wide, 6 layers) and random weights: payload sizes
depend on shapes only, and no hub is needed. Prints the serialized bytes of one payload and the MiB per
round for 4 clients, up and down. The reference's "4.5 MB per round" is LoRA alone (4.50 MiB on
DistilBERT); with the classifier, as our default shared head sends it, it is 4.616 MiB.
"""

from __future__ import annotations

import torch
from transformers import DistilBertConfig, DistilBertForSequenceClassification

from fedslip.federation.payload import encode
from fedslip.model.adapted import AdaptedModel
from fedslip.model.backbone import Backbone, load_backbone


def shared_payload_bytes(backbone: Backbone) -> tuple[int, int]:
    model = AdaptedModel.dual(backbone, None, 8, 16.0, 0, 64.0, 0.1)
    payload = model.read(model.global_names + model.head_names)
    return len(encode(payload)), sum(t.numel() for t in payload.values())


def main() -> None:
    torch.manual_seed(0)
    distil = DistilBertForSequenceClassification(DistilBertConfig(num_labels=4))
    minilm = load_backbone("sentence-transformers/all-MiniLM-L6-v2", 4, 0)
    for name, backbone in (("distilbert-base (shape)", Backbone(distil, minilm.tokenizer, "distilbert", "random")),
                           ("all-MiniLM-L6-v2", minilm)):
        n_bytes, n_params = shared_payload_bytes(backbone)
        print(f"{name:24s} {n_params:,} parameters, {n_bytes:,} bytes per payload, "
              f"{8 * n_bytes / 2**20:.3f} MiB per round (4 clients, up + down)")


if __name__ == "__main__":
    main()
