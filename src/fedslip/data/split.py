"""A client split (index arrays) and what describes it: kept apart from the partitioners, so that a node
holding its own files, or a server holding none, does not import flwr-datasets (and with it seaborn and
scipy: about 3 s for every ClientApp process, which Flower starts anew for each message)."""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np

from fedslip.data.text import TextData


@dataclass
class Split:
    train: list[np.ndarray]  # train[k]: int64 indices into data.train for client k
    test: list[np.ndarray]  # test[k]: int64 indices into data.test for client k
    global_test: np.ndarray  # int64 indices into data.test, balanced over classes


def column_array(ds: datasets.Dataset, column: str = "label") -> np.ndarray:
    """One column as an int64 array (the numpy format reads it in bulk; plain `ds[col]` iterates rows)."""
    return np.asarray(ds.with_format("numpy", columns=[column])[:][column], dtype=np.int64)


def labels_of(ds: datasets.Dataset) -> np.ndarray:
    return column_array(ds, "label")


def describe_split(data: TextData, split: Split) -> list[dict]:
    """Per client: sizes, label counts (lists indexed by class) and the dominant (most frequent) train label."""
    train_labels, test_labels = labels_of(data.train), labels_of(data.test)
    out = []
    for k, (tr, te) in enumerate(zip(split.train, split.test)):
        tr_counts = np.bincount(train_labels[tr], minlength=data.num_classes)
        te_counts = np.bincount(test_labels[te], minlength=data.num_classes)
        out.append({"client": k, "n_train": int(len(tr)), "n_test": int(len(te)),
                    "train_label_counts": tr_counts.tolist(), "test_label_counts": te_counts.tolist(),
                    "dominant_label": int(np.argmax(tr_counts))})
    return out
