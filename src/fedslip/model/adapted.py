"""One frozen backbone with dual-track LoRA, addressed as named tensors.

Clients differ only in a few small tensors (adapters, masks, head). `AdaptedModel` exposes them by name so
the engine swaps a client in by copying tensors into place (`load`) and reads them back (`read`); the
backbone itself is never copied per client.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

from fedslip.errors import UserError
from fedslip.model.adapters import DualLoRALinear, inject, lora_pair, magnitude_mask
from fedslip.model.backbone import Backbone, is_head, target_modules

Tensors = dict[str, torch.Tensor]


class AdaptedModel:
    def __init__(self, backbone: Backbone, targets: list[str] | None, r_g: int, alpha_g: float,
                 r_p: int, alpha_p: float, dropout: float):
        self.net = copy.deepcopy(backbone.model)  # one copy per method; shared by all its clients
        self.pad_id = backbone.tokenizer.pad_token_id or 0
        self.layers: dict[str, DualLoRALinear] = inject(
            self.net, target_modules(self.net, targets), r_g, alpha_g, r_p, alpha_p, dropout)
        self.r_g, self.r_p = r_g, r_p
        self._tensors: Tensors = {}
        for name, p in self.net.named_parameters():
            if name.endswith((".g_A", ".g_B", ".p_A", ".p_B")) or is_head(name):
                self._tensors[name] = p
        for name, b in self.net.named_buffers():
            if name.endswith(("p_A_mask", "p_B_mask")):
                self._tensors[name] = b
        self.global_names = [n for n in self._tensors if n.endswith((".g_A", ".g_B"))]
        self.private_names = [n for n in self._tensors if n.endswith((".p_A", ".p_B"))]
        self.mask_names = [n for n in self._tensors if n.endswith("_mask")]
        self.head_names = [n for n in self._tensors if is_head(n)]
        self.head_init = self.read(self.head_names)

    # --- tensors by name -------------------------------------------------------------------------
    def params(self, names: list[str]) -> list[nn.Parameter]:
        return [self._tensors[n] for n in names]

    def read(self, names: list[str]) -> Tensors:
        return {n: self._tensors[n].detach().clone() for n in names}

    @torch.no_grad()
    def load(self, tensors: Tensors) -> None:
        for name, t in tensors.items():
            target = self._tensors.get(name)
            if target is None:
                raise UserError(f"tensor {name!r} does not belong to this model's adapters or head")
            if target.shape != t.shape:
                raise UserError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(target.shape)}")
            target.copy_(t)

    def set_trainable(self, names: list[str]) -> None:
        wanted = set(names)
        for name, t in self._tensors.items():
            if isinstance(t, nn.Parameter):
                t.requires_grad_(name in wanted)

    # --- initial values ---------------------------------------------------------------------------
    def init_track(self, track: str, generator: torch.Generator) -> Tensors:
        """Fresh LoRA values for track "g" or "p" of every layer (A random, B zero)."""
        out: Tensors = {}
        for name, layer in self.layers.items():
            rank = layer.r_g if track == "g" else layer.r_p
            if rank:
                a, b = lora_pair(rank, layer.base.in_features, layer.base.out_features, generator)
                out[f"{name}.{track}_A"], out[f"{name}.{track}_B"] = a, b
        return out

    def masks_for(self, private: Tensors, sparsity: float, generator: torch.Generator) -> Tensors:
        """Magnitude masks for the private track values given (one mask per tensor)."""
        return {f"{n}_mask": magnitude_mask(private[n], sparsity, generator) for n in self.private_names}

    # --- forward ----------------------------------------------------------------------------------
    @contextmanager
    def mode(self, mode: str):
        before = {n: layer.mode for n, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.mode = mode
        try:
            yield
        finally:
            for n, layer in self.layers.items():
                layer.mode = before[n]

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=input_ids, attention_mask=attention_mask).logits
