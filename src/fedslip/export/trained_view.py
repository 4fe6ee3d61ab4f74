"""The model a finished run evaluated, rebuilt from its run folder: what `export` folds and checks against.

A finished run folder holds `state/<method>.safetensors` (the final global state, every client's private
state, and the run's config in its fingerprint). From it we rebuild the method's model on the same frozen
backbone (same name, same seed) in fp32 on the CPU and load exactly the view the run evaluated:
`--global` = `method.global_view(final global state)` (mode "global"), `--client K` =
`method.personal_view(what K received, K's state)` (mode "both", "personal, synced").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from fedslip.config import Config, apply_overrides
from fedslip.errors import UserError
from fedslip.federation import checkpoint
from fedslip.methods import method_for
from fedslip.methods.base import ClientState, Method
from fedslip.model.adapted import AdaptedModel
from fedslip.model.backbone import Backbone, load_backbone, require_model


@dataclass
class TrainedView:
    run_dir: Path
    cfg: Config  # the method's config (its by_method settings applied)
    method: Method
    backbone: Backbone  # pristine: PEFT wraps copies of backbone.model
    model: AdaptedModel  # the view loaded
    mode: str  # "global" or "both"
    client: int | None  # None: the global model
    label_names: list[str]
    result: dict  # the run's metrics for this method: {"final": ..., "clients": [...]}
    precision: str  # what the run computed in (fp32, bf16)

    @property
    def who(self) -> str:
        return "global model" if self.client is None else f"personal model of client {self.client} (personal, synced)"


def checkpoint_path(run_dir: Path, method: str | None) -> Path:
    """The finished checkpoint of `method` in `run_dir` (the only one there when `method` is None)."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: folder not found")
    found = {p.stem: p for p in checkpoint.existing(run_dir)}
    if not found:
        seeds = sorted(p.name for p in run_dir.glob("seed-*") if p.is_dir())
        hint = f" (a run of several seeds: pass {run_dir}/{seeds[0]})" if seeds else ""
        raise UserError(f"{run_dir} holds no checkpoint ({run_dir}/{checkpoint.STATE_DIR}/*.safetensors){hint}")
    if method is None and len(found) > 1:
        raise UserError(f"{run_dir} holds checkpoints of several methods ({', '.join(found)}): pass --method")
    name = method or next(iter(found))
    if name not in found:
        raise UserError(f"{run_dir} holds no checkpoint of {name!r} (it holds: {', '.join(found)})")
    return found[name]


def config_of(meta: dict) -> Config:
    return apply_overrides(Config(), meta["fingerprint"]["config"], "the checkpoint's config")


def label_names_of(cfg: Config, meta: dict, given: list[str] | None, data_dir: str | None = None) -> list[str]:
    """Class names in class order: given, else the checkpoint's, else the config's `data.label_names`, else
    the run's data source's (checkpoints written before they held the names), read from `data_dir` if given."""
    saved = meta.get("label_names") or cfg.data.label_names
    if given:
        if saved and len(given) != len(saved):
            raise UserError(f"--label-names: {len(given)} names for the run's {len(saved)} classes ({', '.join(saved)})")
        return list(given)
    if saved:
        return list(saved)
    from fedslip.data.sources import load_data

    data_cfg = replace(cfg.data, data_dir=data_dir) if data_dir else cfg.data
    try:
        return load_data(data_cfg).label_names
    except UserError as e:
        raise UserError(f"class names: the run's data cannot be read here ({e}); pass --label-names a,b,... "
                        "or --data-dir") from None


def run_metrics(run_dir: Path, method: str, meta: dict) -> dict:
    """The run's final metrics for `method`: results.json when present, else the checkpoint's copy."""
    results = run_dir / "results.json"
    if results.is_file():
        doc = json.loads(results.read_text(encoding="utf-8"))
        if method in doc.get("methods", {}):
            return doc["methods"][method]
    return meta["result"]


def load_view(run_dir: Path, client: int | None, method: str | None = None,
              label_names: list[str] | None = None, data_dir: str | None = None) -> TrainedView:
    path = checkpoint_path(run_dir, method)
    meta = checkpoint.read_meta(path)
    if not meta.get("finished"):
        raise UserError(f"{path}: the run has not finished (round {len(meta['rounds'])}); finish it "
                        "(fedslip run ... --resume) before exporting")
    glob, clients, meta = checkpoint.load(path)
    cfg = config_of(meta)
    if cfg.model.target_modules is None and meta["fingerprint"].get("targets"):  # the default mapping may have moved
        cfg.model.target_modules = list(meta["fingerprint"]["targets"])
    m = method_for(cfg)
    names = label_names_of(cfg, meta, label_names, data_dir)
    backbone = load_backbone(cfg.model.backbone, len(names), cfg.train.seed, cfg.model.backbone_dropout)
    import transformers

    then = meta["fingerprint"].get("transformers")
    why = (f"; the run loaded it with transformers {then}, this is {transformers.__version__}"
           if then and then != transformers.__version__ else "")
    require_model(backbone, meta["fingerprint"].get("backbone"), "the run trained on", why)
    model = m.build(backbone)
    if client is None:
        view, mode = global_view(m, model, glob), "global"
    else:
        if clients is None:
            raise UserError(f"{path} holds no client states (a Flower run keeps them on its nodes): only "
                            "--global exports")
        if not 0 <= client < len(clients):
            raise UserError(f"--client {client}: the run has clients 0..{len(clients) - 1}")
        first_held = cfg.partition.n_clients - cfg.partition.holdout_clients
        if client >= first_held:
            raise UserError(f"--client {client} was held out (partition.holdout_clients): it only joined once, and "
                            f"that model is not kept; export --global or a client in 0..{first_held - 1}")
        view, mode = m.personal_view(model, m.down_payload(glob, client), clients[client]), "both"
    model.load(view)
    model.net.eval()  # the adapter layers are created in training mode: their dropout must be off, as after training
    return TrainedView(run_dir, m.cfg, m, backbone, model, mode, client, names,
                       run_metrics(run_dir, m.name, meta), meta["fingerprint"].get("precision", "fp32"))


def global_view(m: Method, model: AdaptedModel, glob) -> dict:
    if m.head == "local":
        raise UserError(f"{m.name} keeps each client's head on the client (method.head = 'local'), so there is no "
                        "one global model: export --client K")
    view = m.global_view(model, glob, ClientState())
    if view is None:
        raise UserError(f"{m.name} has no global model: export --client K")
    return view
