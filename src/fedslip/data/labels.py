"""Labels as class ids: integers kept as they are, names in sorted (or a given) order, the same mapping for
train and test; and the stratified test hold-out for a dataset without a test split."""

from __future__ import annotations

import math
import re

import numpy as np

from fedslip.errors import UserError, warn


HOLDOUT_SEED = 0  # fixed: the train/test hold-out must not move when the run seed changes

INT_RE = re.compile(r"[+-]?\d+")


def warn_test_only(train_ids: np.ndarray, test_ids: np.ndarray, test_lines: list[int], names: list[str],
                    files: dict[str, str], unit: str) -> None:
    """A class the test file has but training never saw cannot be learned, and the global test set is
    balanced over classes, so its accuracy is capped at (C-k)/C. The run can go on; say so once."""
    unseen = set(np.unique(test_ids).tolist()) - set(np.unique(train_ids).tolist())
    if not unseen:
        return
    firsts = sorted((int(np.flatnonzero(test_ids == c)[0]), c) for c in unseen)  # in file order
    k, n = len(unseen), len(names)
    shown = ", ".join(repr(names[c]) for _, c in firsts[:5]) + (f" and {k - 5} more" if k > 5 else "")
    warn(f"{files['test']}: {unit} {test_lines[firsts[0][0]]}: {'class' if k == 1 else 'classes'} {shown} "
          f"never {'appears' if k == 1 else 'appear'} in {files['train']}; no client can learn "
          f"{'it' if k == 1 else 'them'}, so accuracy on the balanced global test is capped at {n - k}/{n}")


def as_int(v) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and INT_RE.fullmatch(v.strip()):
        return int(v.strip())
    return None


def encode_labels(train: list, test: list, num_classes: int | None, files: dict[str, str],
                  label_names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Integer labels are used as they are (range 0..num_classes-1, num_classes = the given one or max+1);
    otherwise the sorted distinct label names become 0..n-1. A given label set (`label_names`, which nodes
    holding only their own files must share) fixes the order instead. Returns (train ids, test ids, names)."""
    if label_names:
        return _by_given_names(train, test, files, label_names)
    everything = list(train) + list(test)
    ints = [as_int(v) for v in everything]
    if all(i is not None for i in ints):
        n = num_classes if num_classes is not None else max(ints) + 1
        for split, values in (("train", train), ("test", test)):
            for v in values:
                if not 0 <= as_int(v) < n:
                    raise UserError(f"{files[split]}: label {as_int(v)} outside 0..{n - 1}; fix the label"
                                    + ("" if num_classes is None else " or raise data.num_classes"))
        empty = sorted(set(range(n)) - set(ints)) if num_classes is None else []
        if empty:  # labels 1..5, or a gap: a class nobody has, and the balanced global test cannot be drawn
            shown = ", ".join(map(str, empty[:5])) + (" ..." if len(empty) > 5 else "")
            raise UserError(f"{files['train']}: integer labels run {min(ints)}..{max(ints)}, so class {shown} has "
                            "no example; labels must be 0..C-1: relabel them, or set data.label_names to read "
                            "them as names")
        names = [str(i) for i in range(n)]
        ids = np.asarray(ints, dtype=np.int64)
    else:
        _refuse_stray_names(ints, everything, len(train), files)
        strings = [str(v).strip() for v in everything]
        names = sorted(set(strings))
        if num_classes is not None and num_classes != len(names):
            raise UserError(f"{files['train']}: {len(names)} distinct labels ({', '.join(names[:10])}) but "
                            f"data.num_classes = {num_classes}; remove data.num_classes or fix the labels")
        index = {name: i for i, name in enumerate(names)}
        ids = np.asarray([index[s] for s in strings], dtype=np.int64)
    if len(names) < 2:
        raise UserError(f"{files['train']}: only one class ({names[0]}); need at least 2 labels")
    return ids[:len(train)], ids[len(train):], names


def _refuse_stray_names(ints: list[int | None], values: list, n_train: int, files: dict[str, str]) -> None:
    """Integer labels with a few non-integers among them (≥ 90 % integers) are a typo, not a label set of
    names: taken as names, every integer would become a class name and the typo a class of its own."""
    strays = [k for k, i in enumerate(ints) if i is None]
    if len(strays) <= 0.1 * len(ints):
        k = strays[0]
        raise UserError(f"{files['train' if k < n_train else 'test']}: label {str(values[k]).strip()!r} is not an "
                        f"integer, while {len(ints) - len(strays)} of {len(ints)} labels are; fix it, or set "
                        "data.label_names to read every label as a name")


def _by_given_names(train: list, test: list, files: dict[str, str], names: list[str]):
    index = {name: i for i, name in enumerate(names)}
    out = []
    for split, values in (("train", train), ("test", test)):
        ids = []
        for v in values:
            key = str(v).strip()
            if key not in index:
                number = as_int(v)
                if number is None or not 0 <= number < len(names):
                    raise UserError(f"{files[split]}: label {key!r} is not in data.label_names "
                                    f"({', '.join(names[:10])}); fix the label or the label set")
                key = names[number]
            ids.append(index[key])
        out.append(np.asarray(ids, dtype=np.int64))
    return out[0], out[1], list(names)


def stratified_holdout(labels: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Hold out round(fraction * n_c) examples of each class c (seeded, fixed); returns sorted (train, test)
    indices so both keep the file's order."""
    rng = np.random.default_rng(HOLDOUT_SEED)
    test = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[:int(math.floor(fraction * len(idx) + 0.5))])
    test_idx = np.sort(np.concatenate(test)) if test else np.empty(0, dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx.astype(np.int64), test_idx.astype(np.int64)


def hold_out(texts: list[str], ids: np.ndarray, fraction: float, where: str, instead: str):
    """(train texts, train ids, test texts, test ids): `fraction` of each class held out as the test set; too
    few rows to hold out any is one line, `instead` saying what else the user can do."""
    tr, te = stratified_holdout(ids, fraction)
    if len(te) == 0:
        raise UserError(f"{where}: too few rows to hold out a test set; raise data.test_fraction or {instead}")
    return [texts[i] for i in tr], ids[tr], [texts[i] for i in te], ids[te]
