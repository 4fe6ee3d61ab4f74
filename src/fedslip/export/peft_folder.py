"""Write a run's model as a folder that plain PEFT loads, and prove that it loads what was written.

The folder is PEFT's own: we build a `PeftModel` (LoRA, task SEQ_CLS, the head in `modules_to_save`) on
the run's backbone, copy the folded tensors into its LoRA and head modules, and let `save_pretrained`
name the keys. PEFT only warns when a key does not match and silently keeps its initial weights, so after
saving we load the folder back into a fresh copy of the backbone and require (1) every saved LoRA and head
tensor to come back exactly as written, (2) every loaded LoRA layer to add what fedslip's layer adds, on
random inputs, and (3) the loaded model's logits to equal fedslip's own on a few probe sequences (the base
and the head). Anything else fails loudly, and nothing is left at --out: the folder is written into a
hidden sibling and renamed only once every check passes.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from fedslip.atomic import usual_mode
from fedslip.errors import UserError
from fedslip.export.fold import fold
from fedslip.export.model_card import model_card
from fedslip.export.trained_view import TrainedView
from fedslip.model.backbone import HEAD_MODULES

ADAPTER = "default"
META = "fedslip.json"
PROBES = 4  # probe sequences (and random inputs per layer) for the checks
PROBE_LENGTH = 16
# fp32 rounding of another summation order is ~1e-7 relative; a wrong fold is off by far more
LAYER_TOLERANCE = 1e-4  # relative to the largest |change| the layer adds
LOGIT_TOLERANCE = 1e-4  # relative to the largest |logit| (at least 1)


def base_name(backbone: str) -> str:
    """The base model as the folder names it: a local folder made absolute (a relative one would be looked
    up from wherever the folder is later loaded), a hub name as it is."""
    return str(Path(backbone).resolve()) if Path(backbone).is_dir() else backbone


@contextmanager
def quiet_peft():
    """PEFT calls a transformers method that transformers 5 deprecates: one FutureWarning per call, not ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def head_module(view: TrainedView, tensor_name: str) -> str:
    return next(m for m in (view.cfg.model.head_modules or HEAD_MODULES) if tensor_name.startswith(m + "."))


def build_peft_model(view: TrainedView):
    """A PeftModel on a copy of the backbone, holding the folded view: (model, its rank)."""
    from peft import LoraConfig, TaskType, get_peft_model
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    pairs, rank = fold(view.model, view.mode, view.method.name)
    heads = view.model.read(view.model.head_names)
    head_mods = {head_module(view, n) for n in heads}
    # weights the backbone's checkpoint lacks (a BERT without its pooler, say) were drawn from the run's seed:
    # a plain from_pretrained elsewhere would draw others, so they travel in the folder too
    fresh = {n.rsplit(".", 1)[0] for n in view.backbone.fresh
             if not any(n.startswith(m + ".") for m in head_mods)}
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=rank, lora_alpha=rank, lora_dropout=0.0, use_rslora=False,
                        target_modules=sorted({n.rsplit(".", 1)[-1] for n in pairs}),
                        modules_to_save=sorted(head_mods | fresh))
    with quiet_peft():
        peft_model = get_peft_model(copy.deepcopy(view.backbone.model), config)
    peft_model.peft_config[ADAPTER].base_model_name_or_path = base_name(view.cfg.model.backbone)
    inner = peft_model.base_model.model
    lora = {n for n, m in inner.named_modules() if isinstance(m, LoraLayer)}
    if lora != set(pairs):
        raise UserError(f"PEFT's LoRA targets ({len(lora)} layers) are not the run's ({len(pairs)} layers): "
                        f"{sorted(lora ^ set(pairs))[:3]}")
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            layer = inner.get_submodule(name)
            layer.lora_A[ADAPTER].weight.copy_(a)
            layer.lora_B[ADAPTER].weight.copy_(b)
        for name, t in heads.items():
            module = head_module(view, name)
            wrapper = inner.get_submodule(module)
            if not isinstance(wrapper, ModulesToSaveWrapper):
                raise UserError(f"PEFT did not put head module {module!r} in modules_to_save")
            wrapper.modules_to_save[ADAPTER].get_parameter(name[len(module) + 1:]).copy_(t)
    return peft_model.eval(), rank


def saved_tensors(peft_model) -> dict[str, torch.Tensor]:
    """Exactly what `save_pretrained` writes (LoRA and modules_to_save tensors, PEFT's key names)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)  # False: no hub look-up
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def load_folder(base_model, folder: Path):
    from peft import PeftModel

    with quiet_peft():
        return PeftModel.from_pretrained(copy.deepcopy(base_model), str(folder)).eval()


def check_loaded(loaded, written: dict[str, torch.Tensor], folder: Path) -> None:
    """Every tensor written must come back from `folder` unchanged (PEFT keeps its initial weights for keys
    it does not recognise, and only warns)."""
    back = saved_tensors(loaded)
    wrong = sorted(k for k in set(written) | set(back)
                   if k not in back or k not in written or not torch.equal(back[k], written[k]))
    if wrong:
        raise UserError(f"export check failed: {len(wrong)} of the {len(written)} tensors written to {folder} did "
                        f"not load back as written (first: {wrong[0]}); its keys are not what PEFT expects")


def probe_batch(view: TrainedView) -> tuple[torch.Tensor, torch.Tensor]:
    """A few seeded random token sequences, one of them half padding."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, view.backbone.model.config.vocab_size, (PROBES, PROBE_LENGTH), generator=gen)
    mask = torch.ones_like(ids)
    mask[-1, PROBE_LENGTH // 2:] = 0
    return ids, mask


@torch.inference_mode()
def check_layers(view: TrainedView, loaded) -> None:
    """Each loaded LoRA layer adds what fedslip's layer adds in the view's mode, on random inputs."""
    gen = torch.Generator().manual_seed(0)
    inner = loaded.base_model.model
    with view.model.mode(view.mode):
        for name, layer in view.model.layers.items():
            x = torch.randn(PROBES, layer.base.in_features, generator=gen)
            ours = layer(x) - layer.base(x)
            peft_layer = inner.get_submodule(name)
            theirs = peft_layer(x) - peft_layer.base_layer(x)
            gap, scale = float((ours - theirs).abs().max()), float(ours.abs().max())
            if not gap <= LAYER_TOLERANCE * scale:
                raise UserError(f"export check failed: the exported LoRA of {name} adds {gap:.3g} more or less "
                                f"than fedslip's layer (largest change {scale:.3g})")


@torch.inference_mode()
def check_logits(view: TrainedView, loaded) -> float:
    """The loaded model's logits are fedslip's (the base and the head too); returns the largest |Δlogit|."""
    ids, mask = probe_batch(view)
    with view.model.mode(view.mode):
        ours = view.model.logits(ids, mask)
    theirs = loaded(input_ids=ids, attention_mask=mask).logits.float()
    gap, scale = float((ours - theirs).abs().max()), float(ours.abs().max())
    if not gap <= LOGIT_TOLERANCE * max(1.0, scale):
        raise UserError(f"export check failed: the exported model's logits differ from fedslip's by {gap:.3g} "
                        f"(largest logit {scale:.3g})")
    return gap


def export(view: TrainedView, out: Path) -> dict:
    """Write the folder at `out` (which must not exist, or be empty); return what fedslip.json holds."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty folder; choose another")
    peft_model, rank = build_peft_model(view)
    written = saved_tensors(peft_model)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        peft_model.save_pretrained(str(stage), save_embedding_layers=False)
        loaded = load_folder(view.backbone.model, stage)
        check_loaded(loaded, written, stage)
        check_layers(view, loaded)
        gap = check_logits(view, loaded)
        meta = {"format": 1, "backbone": base_name(view.cfg.model.backbone), "backbone_seed": view.cfg.train.seed,
                "backbone_digest": view.backbone.digest,
                "num_labels": len(view.label_names), "label_names": view.label_names,
                "max_length": view.cfg.model.max_length, "text_columns": view.cfg.data.text_columns,
                "method": view.method.name, "client": view.client, "mode": view.mode, "rank": rank,
                "run": str(view.run_dir.resolve()), "run_precision": view.precision,
                "check": {"tensors": len(written), "max_abs_logit_diff": gap}}
        (stage / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (stage / "README.md").write_text(model_card(view, rank), encoding="utf-8")
        if out.exists():
            out.rmdir()
        usual_mode(stage, folder=True)
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return meta
