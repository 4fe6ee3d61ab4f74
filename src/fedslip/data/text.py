"""The one shape every data source produces: `text` (str) and `label` (int64 in 0..num_classes-1)."""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np

FEATURES = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")})


@dataclass
class TextData:
    train: datasets.Dataset
    test: datasets.Dataset
    label_names: list[str]
    num_classes: int
    description: str


def make_dataset(texts: list[str], labels: list[int] | np.ndarray) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": list(texts), "label": [int(x) for x in labels]},
                                      features=FEATURES)
