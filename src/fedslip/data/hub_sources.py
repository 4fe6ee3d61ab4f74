"""Any dataset on the Hugging Face hub with text and label columns (`data.source = "hf"`)."""

from __future__ import annotations

import datasets

from fedslip.config import DataConfig
from fedslip.data.labels import as_int, encode_labels, hold_out, warn_test_only
from fedslip.data.rows import check_columns, texts_and_labels
from fedslip.data.text import TextData, make_dataset
from fedslip.errors import UserError
from fedslip.hub import hub_reachable


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def load_hub(cfg: DataConfig) -> TextData:
    name = cfg.hf_name + (f" ({cfg.hf_config})" if cfg.hf_config else "")
    if not hub_reachable():
        raise UserError(f"data.hf_name = {name}: the Hugging Face hub is not reachable; run with network "
                        "access (or HF_HUB_OFFLINE=1 with the dataset cached), or use data.source = csv/jsonl")
    try:
        dd = datasets.load_dataset(cfg.hf_name, *([cfg.hf_config] if cfg.hf_config else []))
    except Exception as e:  # noqa: BLE001 - network, auth, missing dataset or config: all fixable by the user
        raise UserError(f"data.hf_name = {name}: could not load ({first_line(e)})") from None
    if "train" not in dd:
        raise UserError(f"data.hf_name = {name}: no 'train' split (splits: {', '.join(dd)})")
    test_split = cfg.hf_test_split
    if test_split == "train":
        raise UserError("data.hf_test_split = 'train': a run cannot test on its training split; name another "
                        "split, or \"\" to hold out data.test_fraction of train")
    if test_split == "" or (test_split == "test" and "test" not in dd):
        test_split = None  # held out from train
    elif test_split not in dd:
        raise UserError(f"data.hf_test_split = {test_split!r}: {name} has no such split (splits: {', '.join(dd)})")
    cols = [*cfg.text_columns, cfg.label_column]
    check_columns(f"hub dataset {name}", cols, dd["train"].column_names)
    feature = dd["train"].features[cfg.label_column]
    class_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None

    def columns(ds: datasets.Dataset, split: str) -> tuple[list[str], list, list[int]]:
        check_columns(f"hub dataset {name} ({split})", cols, ds.column_names)
        rows = [dict(zip(cols, vals)) for vals in zip(*(list(ds[c]) for c in cols))]
        return texts_and_labels(list(enumerate(rows, start=1)), cfg, f"hub dataset {name} ({split})", "row")

    train_texts, train_raw, _ = columns(dd["train"], "train")
    test_texts, test_raw, test_rows = columns(dd[test_split], test_split) if test_split else ([], [], [])
    if test_raw and all(as_int(v) == -1 for v in test_raw):
        raise UserError(f"hub dataset {name} ({test_split}): every label is -1, an unlabeled split (as GLUE's "
                        "test splits are): set data.hf_test_split to a labeled split (\"validation\"), or to "
                        "\"\" to hold out data.test_fraction of train")
    files = {"train": f"hub dataset {name} (train)", "test": f"hub dataset {name} ({test_split or 'test'})"}
    n = cfg.num_classes if cfg.num_classes is not None else (len(class_names) if class_names else None)
    train_ids, test_ids, names = encode_labels(train_raw, test_raw, n, files, cfg.label_names)
    if class_names and len(class_names) == len(names) and not cfg.label_names:
        names = class_names
    if test_split:
        warn_test_only(train_ids, test_ids, test_rows, names, files, "row")
    else:
        instead = "name a test split in data.hf_test_split"
        train_texts, train_ids, test_texts, test_ids = hold_out(train_texts, train_ids, cfg.test_fraction,
                                                                files["train"], instead)
    return TextData(make_dataset(train_texts, train_ids), make_dataset(test_texts, test_ids), names, len(names),
                    f"hub dataset {name} (train {len(train_ids)}, test {len(test_ids)})")
