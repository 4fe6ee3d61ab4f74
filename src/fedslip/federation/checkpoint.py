"""Checkpoints of a run: everything the round protocol needs to go on, in one safetensors file per method.

`<out>/state/<method>.safetensors` holds the global state (`glob/...`), every client's private state
(`client/<k>/...`, see `client_state.pack_state`) and, as JSON in the file's metadata, the round records,
the ledger, the protocol's own bookkeeping and a fingerprint of what the numbers depend on (config, data
split, package version, device and precision). It is written to a temporary file and renamed, so a crash
while writing leaves the previous checkpoint intact. The last one, marked finished, is the run's final
state (what `export` and `predict` read). Never pickle.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from fedslip.atomic import replace_durably, usual_mode
from fedslip.config import Config
from fedslip.errors import UserError
from fedslip.evaluation.ledger import Entry, Ledger
from fedslip.evaluation.records import ClientRecord, MethodResult, RoundRecord
from fedslip.federation.client_state import pack_state, unpack_state
from fedslip.methods.base import ClientState

FORMAT = 1
STATE_DIR = "state"


def fingerprint(prep, method_name: str) -> dict[str, Any]:
    """What a run's numbers depend on; a resumed run must match it (`check`). "data" digests the token ids
    and labels the run uses, "backbone" the frozen weights as loaded, so the data's and the model's folders
    need not match (a run may move machines); "transformers" is the library that runs the backbone, and
    "targets" the projections adapted (without `model.target_modules`, the default mapping for the
    architecture decides them: fedslip's, else PEFT's)."""
    import transformers

    from fedslip import __version__
    from fedslip.model.backbone import target_modules

    h = hashlib.sha256()
    for group in [*prep.split.train, *prep.split.test, prep.split.global_test]:
        h.update(group.tobytes() + b"|")
    info = prep.backbone.placement.info
    cfg = prep.cfg.to_dict()
    cfg["method"]["name"] = method_name
    targets = prep.cfg.for_method(method_name).model.target_modules
    return {"format": FORMAT, "fedslip": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "config": cfg, "split": h.hexdigest()[:32],
            "targets": sorted(target_modules(prep.backbone.model, targets)),
            "data": data_digest(prep), "backbone": prep.backbone.digest, "device": info.get("device", "cpu"),
            "precision": info.get("precision", "fp32")}


def data_digest(prep) -> str | None:
    """sha256 of every used example's token ids and label, train then test; None where no data is held."""
    if prep.train is None:
        return None
    h = hashlib.sha256()
    for enc in (prep.train, prep.test):
        for ids in enc.ids:
            h.update(ids.tobytes() + b"|")
        h.update(enc.labels.tobytes() + b"#")
    return h.hexdigest()[:32]


PATH_KEYS = ("data_dir", "train_file", "test_file")  # config.data: where the data was read, not what it is


def comparable(saved: dict, now: dict) -> tuple[dict, dict]:
    """The two fingerprints as `check` compares them. The asked `train.device` / `train.precision` are left
    out: the resolved "device" / "precision" are compared (an `auto` resolves as the checkpoint did, and
    naming what it resolved to is no change). The data's paths are left out where both sides digest the data
    (checkpoints made before the digest compare the paths, resolved), the backbone's name where both digest
    its weights; what a checkpoint made before it was recorded lacks ("transformers", "targets") is not
    compared, nor what the clients report beside their accuracies (`train.eval_per_example`: no number
    depends on it)."""
    saved, now = copy.deepcopy(saved), copy.deepcopy(now)
    by_content = saved.get("data") is not None and now.get("data") is not None
    if saved.get("backbone") is not None and now.get("backbone") is not None:
        for fp in (saved, now):
            fp.get("config", {}).get("model", {}).pop("backbone", None)
    for key in ("backbone", "transformers", "targets"):
        if saved.get(key) is None:
            saved.pop(key, None)
            now.pop(key, None)
    for fp in (saved, now):
        cfg = fp.get("config", {})
        for key in ("device", "precision", "eval_per_example"):
            cfg.get("train", {}).pop(key, None)
        data = cfg.get("data", {})
        for key in PATH_KEYS:
            if by_content:
                data.pop(key, None)
            elif data.get(key):
                data[key] = os.path.realpath(data[key])
        if not by_content:
            fp.pop("data", None)
        if fp.get("device") == "cuda":  # `auto` resolves to "cuda": the current device, as a named cuda:0
            fp["device"] = "cuda:0"
    return saved, now


def differences(saved: dict, now: dict, prefix: str = "", defaults: dict | None = None) -> list[str]:
    """What differs; a key the checkpoint lacks (made before it existed) is no difference when it holds its
    default value now (`defaults`, the same nesting as `now`)."""
    out = []
    defaults = defaults or {}
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.", defaults.get(key) if isinstance(defaults.get(key), dict) else None)
        elif key not in saved and key in defaults and b == defaults[key]:
            continue
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} in the checkpoint, {b!r} now")
    return out


PLAN = "comparison.json"  # in STATE_DIR: the methods a run or comparison will train, in order


def write_plan(out: Path, methods: list[str]) -> None:
    """Record which methods the run in `out` trains, so that `fedslip status` shows those still to come."""
    folder = Path(out) / STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (PLAN + ".tmp")
    tmp.write_text(json.dumps({"methods": methods}), encoding="utf-8")
    replace_durably(tmp, folder / PLAN)


def read_plan(out: Path) -> list[str]:
    """The methods recorded by `write_plan` ([] when none were, or the file is unreadable)."""
    try:
        return list(json.loads((Path(out) / STATE_DIR / PLAN).read_text(encoding="utf-8"))["methods"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def path_for(out: Path, method: str) -> Path:
    return Path(out) / STATE_DIR / f"{method}.safetensors"


def existing(out: Path) -> list[Path]:
    folder = Path(out) / STATE_DIR
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


def save(path: Path, glob: dict, clients: list[ClientState] | None, meta: dict[str, Any], crash=None,
         server: dict[str, torch.Tensor] | None = None) -> None:
    """`server`: the aggregation's own state (a Flower strategy's moments), restored as meta["server"]."""
    from safetensors.torch import save_file

    tensors = {f"glob/{n}": t.detach().cpu().contiguous() for n, t in glob.items()}
    tensors.update({f"server/{n}": t.detach().cpu().contiguous() for n, t in (server or {}).items()})
    skeletons = []
    for k, state in enumerate(clients or []):
        packed, skeleton = pack_state(state)
        tensors.update({f"client/{k}/{n}": t for n, t in packed.items()})
        skeletons.append(skeleton)
    meta = {**meta, "client_skeletons": skeletons, "has_clients": clients is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"fedslip": json.dumps(meta)})
    usual_mode(tmp)
    if crash is not None:
        crash("checkpoint")  # tests: a crash after the temporary file, before the rename
    replace_durably(tmp, path)


def _read(path: Path, tensors: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checkpoint's JSON part and (if asked) its tensors; an unreadable file is one clear line."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["fedslip"])
            return meta, ({k: f.get_tensor(k) for k in f.keys()} if tensors else {})
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:120]}); "
                        "delete it to start over") from None


def read_meta(path: Path) -> dict[str, Any]:
    """The checkpoint's JSON part only (no tensors read)."""
    return _read(path, tensors=False)[0]


def kept_precision(paths: list[Path], precision: str) -> dict[str, str]:
    """On resume, what an `auto` precision resolves to: the first existing checkpoint's (no new probe, which
    on another machine, or by noise near its margin, could choose otherwise); {} when none exists or the
    precision is set."""
    for path in paths:
        if precision == "auto" and path.exists():
            return {"precision": read_meta(path)["fingerprint"].get("precision", "fp32")}
    return {}


def check(path: Path, prep, method: str) -> None:
    """One clear line when the checkpoint at `path` is not this run's."""
    saved, now = comparable(read_meta(path)["fingerprint"], fingerprint(prep, method))
    diff = differences(saved, now, defaults={"config": Config().to_dict()})
    diff = [f"backbone: {prep.cfg.model.backbone!r} is not the model the run trained on (other weights or config)"
            if d.startswith("backbone:") else d for d in diff]
    if diff:
        versions = any(d.startswith(("torch:", "transformers:", "fedslip:")) for d in diff[:3])
        hint = "; to resume it, install the versions the checkpoint names" if versions else ""
        raise UserError(f"checkpoint {path} belongs to another run: {'; '.join(diff[:3])}{hint}")


def load(path: Path) -> tuple[dict, list[ClientState] | None, dict[str, Any]]:
    meta, tensors = _read(path, tensors=True)
    glob = {n[len("glob/"):]: t for n, t in tensors.items() if n.startswith("glob/")}
    meta["server"] = {n[len("server/"):]: t for n, t in tensors.items() if n.startswith("server/")}
    clients = None
    if meta.get("has_clients"):
        clients = []
        for k, skeleton in enumerate(meta["client_skeletons"]):
            prefix = f"client/{k}/"
            clients.append(unpack_state({n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)},
                                        skeleton))
    return glob, clients, meta


# --- records <-> JSON -----------------------------------------------------------------------------------
def rounds_to_json(rounds: list[RoundRecord]) -> list[dict]:
    return [asdict(r) for r in rounds]


def rounds_from_json(rows: list[dict]) -> list[RoundRecord]:
    return [RoundRecord(**r) for r in rows]


def ledger_to_json(ledger: Ledger) -> list[dict]:
    return [asdict(e) for e in ledger.entries]


def ledger_from_json(method: str, rows: list[dict]) -> Ledger:
    ledger = Ledger(method)
    ledger.entries = [Entry(**r) for r in rows]
    return ledger


def result_from_json(doc: dict) -> MethodResult:
    return MethodResult(method=doc["method"], rounds=rounds_from_json(doc["rounds"]),
                        clients=[ClientRecord(**c) for c in doc["clients"]], final=doc["final"],
                        wall_time_s=doc["wall_time_s"])
