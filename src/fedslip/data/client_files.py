"""Write a split out as the files each node of a real federation would hold: one folder per client.

`fedslip split` uses it to turn one dataset into per-client files for a deployment in which every
SuperNode reads only its own (`prepare_node`); rows keep the split's order, so a node-data run trains on
exactly the batches of the split-and-distribute run.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fedslip.data.split import Split
from fedslip.data.text import TextData


def _write(path: Path, dataset, idx: np.ndarray, names: list[str]) -> None:
    texts, labels = dataset["text"], dataset["label"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in idx:
            w.writerow([texts[int(i)], names[int(labels[int(i)])]])


def write_client_files(data: TextData, split: Split, out: Path) -> dict[str, Path]:
    """client<k>/train.csv and test.csv for every client, global_test.csv; returns the paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for k, (tr, te) in enumerate(zip(split.train, split.test)):
        folder = out / f"client{k}"
        folder.mkdir(exist_ok=True)
        for name, ds, idx in (("train", data.train, tr), ("test", data.test, te)):
            paths[f"client{k}/{name}"] = folder / f"{name}.csv"
            _write(paths[f"client{k}/{name}"], ds, idx, data.label_names)
    paths["global_test"] = out / "global_test.csv"
    _write(paths["global_test"], data.test, split.global_test, data.label_names)
    return paths
