"""Run configuration: dataclasses, presets, TOML loading, `--set` overrides and validation.

Everything a run needs is in one `Config`, validated once (`validate`) before anything is read or written,
so a bad value is reported as one `UserError` line and nothing is half-done.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedslip.errors import UserError

DEFAULT_BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"
MAX_ROUNDS = 100_000  # far beyond any federation; keeps per-round bookkeeping bounded


@dataclass
class DataConfig:
    source: str = "ag_news"  # ag_news | csv | jsonl | hf | synthetic
    data_dir: str | None = None  # AG News folder; else $FEDSLIP_DATA_DIR; else the hub
    train_file: str | None = None  # csv/jsonl sources
    test_file: str | None = None  # csv/jsonl sources; without it a test_fraction is held out
    test_fraction: float = 0.2
    text_columns: list[str] = field(default_factory=lambda: ["text"])
    label_column: str = "label"
    num_classes: int | None = None  # None: inferred from the training labels
    label_names: list[str] | None = None  # the label set in class order (None: sorted names, or 0..C-1)
    hf_name: str = "fancyzhx/ag_news"  # source = "hf": any hub dataset with text/label columns
    hf_config: str | None = None  # source = "hf": the dataset's configuration ("sst2" of "nyu-mll/glue")
    hf_test_split: str = "test"  # source = "hf": the split to test on; "" (or a dataset without it): hold out
    synthetic_per_class: int = 300  # source = "synthetic": examples per class in each split


@dataclass
class PartitionConfig:
    scheme: str = "dominant"  # dominant | dirichlet | pathological | iid
    n_clients: int = 4
    rho: float = 0.8  # dominant: share of a client's examples from its own class
    n_train: int = 2000  # per client (dominant, iid)
    n_test: int = 500  # per client
    n_global_test: int = 400  # per class, disjoint from every client's test set
    alpha: float = 0.5  # dirichlet concentration
    classes_per_client: int = 2  # pathological
    max_train_per_client: int | None = None  # dirichlet/pathological/iid: at most this many training examples
    validation_fraction: float = 0.0  # > 0: hold out this share of each client's training data and evaluate on it
    holdout_clients: int = 0  # the last k clients never train: they join once after the last round (newcomers)


@dataclass
class ModelConfig:
    backbone: str = DEFAULT_BACKBONE
    max_length: int = 128
    backbone_dropout: float | None = None  # None: the backbone's own dropout; 0.0 trains 7-21 % faster on CPU
    target_modules: list[str] | None = None  # None: PEFT's mapping for the architecture
    head_modules: list[str] | None = None  # None: classifier/score; ["pre_classifier", "classifier"]: the reference's FedAvg


@dataclass
class TrainConfig:
    rounds: int = 30
    local_epochs: int = 2
    local_steps: int | None = None  # each round: exactly this many optimizer steps instead of local_epochs epochs
    lr_schedule: str = "constant"  # constant | cosine (decayed over the rounds, to 0 after the last)
    local_only_epochs: int = 5  # `local` method: epochs of purely local training
    batch_size: int = 32
    length_pool: int = 50  # batches per length-sorting pool (less padding); 1: uniformly shuffled batches
    lr: float = 1e-4
    weight_decay: float = 0.01
    clip: float = 1.0
    client_fraction: float = 1.0
    seed: int = 0
    eval_every: int = 1  # evaluate every k rounds (the last round is always evaluated)
    eval_batch_size: int = 128
    # the final evaluation: clients also report which of their own test examples the personal (synced) and
    # K-step views got right, for the goal check's paired comparison; false: only accuracies leave a client
    eval_per_example: bool = True
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA and on CPUs where a timed probe finds it faster) | fp32 | bf16
    checkpoint_every: int = 1  # rounds between checkpoints (and always after the last)
    failure_rate: float = 0.0  # in-process: chance that a selected client drops out of a round (seeded)
    failures: list[list[int]] = field(default_factory=list)  # in-process: [round, client] pairs that fail
    max_update_norm: float | None = None  # reject an upload whose change to the global state is larger


@dataclass
class MethodConfig:
    name: str = "fedslip"
    # global track (also the single LoRA of fedavg/local)
    r_g: int = 8
    alpha_g: float = 16.0
    dropout: float = 0.1
    # private track
    r_p: int = 32
    alpha_p: float = 64.0
    sparsity: float = 0.75  # fraction of private weights zeroed by the magnitude mask
    warmup_rounds: int = 10
    lambda_p: float = 0.6
    private_lr_scale: float = 0.5
    mu: float = 0.1  # FedProx on the global track (fedslip)
    fedavg_mu: float = 0.0  # FedProx for fedavg (0 = plain FedAvg)
    kstep: bool = True  # fedavg: K-step personalization after the last round
    head: str | None = None  # shared | local | frozen; None: the method's own default
    # how the reference code ran (docs/fidelity.md); the defaults are ours
    mask_ties: str = "random"  # random: exactly the top share, ties broken at random | keep: every |w| >= threshold
    private_optimizer: str = "persist"  # persist: the private AdamW state carries over rounds | fresh: new each round
    global_step_private: str = "off"  # off: the global step runs without the private track | on: with it (frozen)
    private_step_global: str = "constant"  # the global track's output in the private step: constant | live
    # FedSLIP+ candidates (issue 12)
    private_head: bool = False  # each client trains its own head copy in the private step, for its personal model
    private_warmup: str = "masked"  # masked: no private steps in warmup | dense: train unmasked, prune at its end
    private_rewind: bool = False  # after a dense warmup's pruning, restart the kept weights from their init (a lottery ticket)
    private_lr_schedule: str = "train"  # train: the private lr follows train.lr_schedule | cosine: decays over the private rounds
    private_base: str = "local"  # local: private steps on the global track as it trains | received: as it arrived
    strategy: str = "method"  # server aggregation: "method" (its own) or a Flower strategy, e.g. "fedmedian"
    # related methods (see README's method table)
    client_ranks: list[int] | None = None  # flora: LoRA rank per client (cycled); None: [16, 8, 8, 4]
    client_layers: list[int] | None = None  # pfedlora: backbone depth per client (cycled); None: [3, 4, 6, 6]
    n_adaptors: int = 4  # floral: federated LoRA adaptors per layer mixed by private weights
    vera_rank: int = 256  # fedsa-vera: rank of VeRA's frozen shared random matrices
    ffa_alpha_factor: float = 10.0  # ffa: α = factor·alpha_g, standing for the paper's 10× learning rate


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    # {method name: {section: {key: value}}}: settings for one method of a comparison (BY_METHOD_KEYS only)
    by_method: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def for_method(self, name: str, own: dict[str, dict[str, Any]] | None = None) -> "Config":
        """This config for method `name`: its name set, then the method's `own` settings (a method defined by
        them, e.g. fedslip-plus), then the user's `by_method` settings for it."""
        cfg = apply_overrides(self, own or {}, f"method {name}")
        cfg = apply_overrides(cfg, self.by_method.get(name, {}), f"by_method.{name}")
        cfg.method.name = name
        cfg.by_method = {}
        return cfg


# What may differ between the methods of one comparison: never the data, the split or the backbone.
BY_METHOD_KEYS = {"method": None, "train": {"lr", "local_epochs", "local_only_epochs", "weight_decay", "clip",
                                            "batch_size"},
                  "model": {"head_modules"}}


# The reference protocol (AG News, 4 clients, 80 % dominant class, 30 rounds x 2 epochs) is the default.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {},
    # Same shape (4 dominant-class clients, all methods, warmup then private steps), small enough for
    # 2 CPU cores in a few minutes. Fewer examples and rounds, so a larger learning rate; the local work is a
    # step budget, so a client's training does not shrink with its data (README: Configuration).
    "quick": {
        "partition": {"n_train": 256, "n_test": 100, "n_global_test": 50, "max_train_per_client": 256},
        "model": {"max_length": 64, "backbone_dropout": 0.0},
        "train": {"rounds": 5, "local_steps": 16, "local_only_epochs": 3, "lr": 5e-3},
        "method": {"warmup_rounds": 2},
    },
    # The paper protocol as the reference code ran it, its accidents included (docs/fidelity.md).
    "reference": {
        "train": {"precision": "fp32", "length_pool": 1},
        "method": {"mask_ties": "keep", "private_optimizer": "fresh", "global_step_private": "on",
                   "private_step_global": "live"},
        "by_method": {
            # its FedProx term matched no parameter; fedprox, a method of its own, keeps its μ
            "fedslip": {"method": {"head": "frozen", "dropout": 0.0, "mu": 0.0}},
            "dualtrack-naive": {"method": {"dropout": 0.0}},
            # DistilBERT's pre_classifier; on a BERT backbone (MiniLM) its counterpart is the pooler
            "fedavg": {"model": {"head_modules": ["pre_classifier", "bert.pooler", "classifier"]}},
            "local": {"model": {"head_modules": ["pre_classifier", "bert.pooler", "classifier"]}},
        },
    },
}

def _section_classes() -> dict[str, type]:
    return {"data": DataConfig, "partition": PartitionConfig, "model": ModelConfig,
            "train": TrainConfig, "method": MethodConfig}


def apply_overrides(cfg: Config, overrides: dict[str, dict[str, Any]], origin: str) -> Config:
    """Return a copy of `cfg` with `{section: {key: value}}` applied; unknown keys are user errors."""
    cfg = copy.deepcopy(cfg)
    classes = _section_classes()
    for section, values in overrides.items():
        if section == "by_method":
            for name, sections in _by_method(values, origin).items():
                mine = cfg.by_method.setdefault(name, {})
                for section, keys in sections.items():
                    mine[section] = {**mine.get(section, {}), **keys}
            continue
        if section not in classes:
            raise UserError(f"{origin}: unknown section [{section}] (known: {', '.join(classes)})")
        if not isinstance(values, dict):
            raise UserError(f"{origin}: [{section}] must be a table of key = value")
        target = getattr(cfg, section)
        known = {f.name for f in dataclasses.fields(classes[section])}
        for key, value in values.items():
            if key not in known:
                raise UserError(f"{origin}: unknown key {section}.{key} (known: {', '.join(sorted(known))})")
            setattr(target, key, value)
    return cfg


def _by_method(values: Any, origin: str) -> dict[str, dict[str, dict[str, Any]]]:
    """Check `[by_method.<method>.<section>]` tables: only BY_METHOD_KEYS, each key known."""
    if not isinstance(values, dict):
        raise UserError(f"{origin}: [by_method] must hold [by_method.<method>.<section>] tables")
    nested: dict[str, Any] = {}
    for dotted, value in values.items():  # --set by_method.fedavg.method={...} arrives as "fedavg.method"
        *path, last = dotted.split(".")
        node = nested
        for part in path:
            node = node.setdefault(part, {})
        node[last] = {**node.get(last, {}), **value} if isinstance(value, dict) else value
    values = nested
    if not all(isinstance(v, dict) for v in values.values()):
        raise UserError(f"{origin}: [by_method] must hold [by_method.<method>.<section>] tables")
    for name, sections in values.items():
        for section, keys in sections.items():
            allowed = BY_METHOD_KEYS.get(section, set())
            if section not in BY_METHOD_KEYS or not isinstance(keys, dict) or (
                    allowed is not None and not set(keys) <= allowed):
                raise UserError(f"{origin}: by_method.{name}.{section} may set only "
                                + "; ".join(f"{s}.{'*' if k is None else ', '.join(sorted(k))}"
                                            for s, k in BY_METHOD_KEYS.items()))
        apply_overrides(Config(), sections, f"{origin}: by_method.{name}")  # unknown keys fail here
    return {name: dict(sections) for name, sections in values.items()}


def parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """Parse `--set section.key=value` items; values are TOML literals (`none` unsets an optional key), else
    plain strings."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UserError(f"--set {item!r}: expected section.key=value, e.g. train.rounds=3")
        dotted, raw = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        if raw.strip() in ("none", "null"):  # TOML has no null: unset an optional key (e.g. train.local_steps)
            value = None
        else:
            try:
                value = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError:
                value = raw
        out.setdefault(section, {})[key] = value
    return out


def load_config(path: str | None = None, preset: str | None = None, method: str | None = None,
                sets: list[str] | None = None) -> Config:
    """Preset, then TOML file, then `--method`, then `--set` overrides; validated at the end."""
    cfg = Config()
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        cfg = apply_overrides(cfg, PRESETS[preset], f"preset {preset}")
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            table = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid TOML ({e})") from None
        cfg = apply_overrides(cfg, table, path)
    if method is not None:
        cfg.method.name = method
    if sets:
        cfg = apply_overrides(cfg, parse_set(sets), "--set")
    validate(cfg)
    return cfg


UNBOUNDED = {("train", "clip")}  # inf is meaningful here: no clipping


def _check_types(cfg: Config) -> None:
    """Each value must match its field's annotation (ints are accepted where floats are expected)."""
    for section, cls in _section_classes().items():
        obj = getattr(cfg, section)
        for f in dataclasses.fields(cls):
            value = getattr(obj, f.name)
            annotation = str(f.type)
            if value is None and annotation.endswith("| None"):
                continue
            kind = annotation.removesuffix(" | None")
            if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(obj, f.name, value)
            ok = {"int": isinstance(value, int) and not isinstance(value, bool),
                  "float": isinstance(value, float) and (math.isfinite(value) or (
                      value == math.inf and (section, f.name) in UNBOUNDED)),  # nan, inf: never a setting but these
                  "bool": isinstance(value, bool),
                  "str": isinstance(value, str),
                  "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
                  "list[int]": isinstance(value, list) and all(_is_int(v) for v in value),
                  "list[list[int]]": isinstance(value, list) and all(
                      isinstance(v, list) and all(_is_int(x) for x in v) for v in value)}[kind]
            if not ok:
                finite = " (finite)" if kind == "float" and isinstance(value, float) else ""
                raise UserError(f"{section}.{f.name} = {value!r}: expected {kind}{finite}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate(cfg: Config) -> None:
    """Check ranges and names; raise one UserError naming the first bad value."""
    _check_types(cfg)
    for name in cfg.by_method:
        if cfg.train.local_steps is not None and "local_epochs" in cfg.by_method[name].get("train", {}):
            raise UserError(f"by_method.{name}.train.local_epochs has no effect: train.local_steps = "
                            f"{cfg.train.local_steps} sets every round's budget (set train.local_steps = none)")
        validate(cfg.for_method(name))
    d, p, t, m = cfg.data, cfg.partition, cfg.train, cfg.method

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)

    need(d.source in ("ag_news", "csv", "jsonl", "hf", "synthetic"),
         f"data.source = {d.source!r}: expected ag_news, csv, jsonl, hf or synthetic")
    need(0 < d.test_fraction < 1, f"data.test_fraction = {d.test_fraction}: must be in (0, 1)")
    need(len(d.text_columns) > 0, "data.text_columns must name at least one column")
    need(d.num_classes is None or d.num_classes >= 2, f"data.num_classes = {d.num_classes}: must be >= 2")
    need(d.label_names is None or len(set(d.label_names)) == len(d.label_names) >= 2,
         f"data.label_names = {d.label_names}: at least 2 distinct names")
    need(d.label_names is None or d.num_classes in (None, len(d.label_names or [])),
         f"data.num_classes = {d.num_classes} but data.label_names has {len(d.label_names or [])} names")
    need(p.scheme in ("dominant", "dirichlet", "pathological", "iid"),
         f"partition.scheme = {p.scheme!r}: expected dominant, dirichlet, pathological or iid")
    need(p.n_clients >= 1, f"partition.n_clients = {p.n_clients}: must be >= 1")
    need(0 <= p.rho <= 1, f"partition.rho = {p.rho}: must be in [0, 1]")
    need(p.n_train >= 1, f"partition.n_train = {p.n_train}: must be >= 1")
    need(p.n_test >= 1, f"partition.n_test = {p.n_test}: must be >= 1")
    need(p.n_global_test >= 1, f"partition.n_global_test = {p.n_global_test}: must be >= 1")
    need(p.alpha > 0, f"partition.alpha = {p.alpha}: must be > 0")
    need(p.max_train_per_client is None or p.max_train_per_client >= 1,
         f"partition.max_train_per_client = {p.max_train_per_client}: must be >= 1")
    need(0 <= p.validation_fraction < 1, f"partition.validation_fraction = {p.validation_fraction}: must be in [0, 1)")
    need(0 <= p.holdout_clients < p.n_clients,
         f"partition.holdout_clients = {p.holdout_clients}: must be in [0, {p.n_clients - 1}] "
         f"(partition.n_clients = {p.n_clients}; at least one client must train)")
    need(p.classes_per_client >= 1, f"partition.classes_per_client = {p.classes_per_client}: must be >= 1")
    need(cfg.model.backbone_dropout is None or 0 <= cfg.model.backbone_dropout < 1,
         f"model.backbone_dropout = {cfg.model.backbone_dropout}: must be in [0, 1)")
    need(cfg.model.max_length >= 8, f"model.max_length = {cfg.model.max_length}: must be >= 8")
    for key in ("target_modules", "head_modules"):  # [] would quietly mean the default
        need(getattr(cfg.model, key) != [], f"model.{key} = []: name at least one module, or leave it unset")
    need(1 <= t.rounds <= MAX_ROUNDS, f"train.rounds = {t.rounds}: must be in [1, {MAX_ROUNDS:,}]")
    need(t.local_epochs >= 1, f"train.local_epochs = {t.local_epochs}: must be >= 1")
    need(t.local_only_epochs >= 1, f"train.local_only_epochs = {t.local_only_epochs}: must be >= 1")
    need(t.batch_size >= 1, f"train.batch_size = {t.batch_size}: must be >= 1")
    need(0 < t.lr < math.inf, f"train.lr = {t.lr}: must be > 0 and finite")
    need(t.seed >= 0, f"train.seed = {t.seed}: must be >= 0")
    need(t.local_steps is None or t.local_steps >= 1, f"train.local_steps = {t.local_steps}: must be >= 1")
    need(t.lr_schedule in ("constant", "cosine"), f"train.lr_schedule = {t.lr_schedule!r}: expected constant or cosine")
    need(t.weight_decay >= 0, f"train.weight_decay = {t.weight_decay}: must be >= 0")
    need(t.clip > 0, f"train.clip = {t.clip}: must be > 0")
    need(0 < t.client_fraction <= 1, f"train.client_fraction = {t.client_fraction}: must be in (0, 1]")
    need(t.eval_every >= 1, f"train.eval_every = {t.eval_every}: must be >= 1")
    need(t.length_pool >= 1, f"train.length_pool = {t.length_pool}: must be >= 1 (1: uniformly shuffled batches)")
    need(t.eval_batch_size >= 1, f"train.eval_batch_size = {t.eval_batch_size}: must be >= 1")
    need(t.device in ("auto", "cpu", "cuda") or (t.device.startswith("cuda:") and t.device[5:].isdigit()),
         f"train.device = {t.device!r}: expected auto, cpu, cuda or cuda:N")
    need(t.precision in ("auto", "fp32", "bf16"), f"train.precision = {t.precision!r}: expected auto, fp32 or bf16")
    need(t.checkpoint_every >= 1, f"train.checkpoint_every = {t.checkpoint_every}: must be >= 1")
    need(0 <= t.failure_rate < 1, f"train.failure_rate = {t.failure_rate}: must be in [0, 1)")
    need(all(len(f) == 2 and f[0] >= 1 and 0 <= f[1] < p.n_clients for f in t.failures),
         f"train.failures = {t.failures}: expected [round, client] pairs, round >= 1, client in [0, {p.n_clients})")
    need(t.max_update_norm is None or t.max_update_norm > 0,
         f"train.max_update_norm = {t.max_update_norm}: must be > 0")
    need(m.r_g >= 1, f"method.r_g = {m.r_g}: must be >= 1")
    need(m.r_p >= 1, f"method.r_p = {m.r_p}: must be >= 1")
    need(m.alpha_g > 0 and m.alpha_p > 0, "method.alpha_g and method.alpha_p must be > 0")
    need(0 <= m.dropout < 1, f"method.dropout = {m.dropout}: must be in [0, 1)")
    need(0 <= m.sparsity < 1, f"method.sparsity = {m.sparsity}: must be in [0, 1)")
    need(m.warmup_rounds >= 0, f"method.warmup_rounds = {m.warmup_rounds}: must be >= 0")
    need(m.lambda_p > 0, f"method.lambda_p = {m.lambda_p}: must be > 0")
    need(m.private_lr_scale > 0, f"method.private_lr_scale = {m.private_lr_scale}: must be > 0")
    need(m.mu >= 0 and m.fedavg_mu >= 0, "method.mu and method.fedavg_mu must be >= 0")
    need(m.client_ranks is None or (m.client_ranks and min(m.client_ranks) >= 1),
         f"method.client_ranks = {m.client_ranks}: a non-empty list of ranks >= 1")
    need(m.client_layers is None or (m.client_layers and min(m.client_layers) >= 1),
         f"method.client_layers = {m.client_layers}: a non-empty list of depths >= 1")
    need(m.n_adaptors >= 1, f"method.n_adaptors = {m.n_adaptors}: must be >= 1")
    need(m.vera_rank >= 1, f"method.vera_rank = {m.vera_rank}: must be >= 1")
    need(m.ffa_alpha_factor > 0, f"method.ffa_alpha_factor = {m.ffa_alpha_factor}: must be > 0")
    need(m.mask_ties in ("random", "keep"), f"method.mask_ties = {m.mask_ties!r}: expected random or keep")
    need(m.private_optimizer in ("persist", "fresh"),
         f"method.private_optimizer = {m.private_optimizer!r}: expected persist or fresh")
    need(m.global_step_private in ("off", "on"),
         f"method.global_step_private = {m.global_step_private!r}: expected off or on")
    need(m.private_step_global in ("constant", "live"),
         f"method.private_step_global = {m.private_step_global!r}: expected constant or live")
    need(m.private_base in ("local", "received"), f"method.private_base = {m.private_base!r}: expected local or received")
    need(m.private_warmup in ("masked", "dense"), f"method.private_warmup = {m.private_warmup!r}: expected masked or dense")
    need(not m.private_rewind or (m.private_warmup == "dense" and m.warmup_rounds > 0),
         "method.private_rewind = true rewinds after a dense warmup: it needs method.private_warmup = \"dense\" "
         "and method.warmup_rounds >= 1")
    need(m.private_lr_schedule in ("train", "cosine"),
         f"method.private_lr_schedule = {m.private_lr_schedule!r}: expected train or cosine")
    need(m.head in (None, "shared", "local", "frozen"),
         f"method.head = {m.head!r}: expected shared, local or frozen")
