"""One frozen backbone with dual-track LoRA, addressed as named tensors.

Clients differ only in a few small tensors (adapters, masks, head). `AdaptedModel` exposes them by name so
the engine swaps a client in by copying tensors into place (`load`) and reads them back (`read`, always to
CPU: client states and payloads live on the host); the backbone itself is never copied per client.

The model sits on `backbone.placement.device`; in bf16 placement its frozen weights are stored in bf16
once (never re-cast per step) and the forward pass runs under autocast, while every adapter, head and
optimizer state stays an fp32 master.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from fedslip.errors import UserError
from fedslip.model.adapters import DualLoRALinear, inject, lora_pair, magnitude_mask
from fedslip.model.backbone import Backbone, is_head, target_modules
from fedslip.model.cheap_dropout import use_cheap_dropout

Tensors = dict[str, torch.Tensor]


LayerFactory = Callable[[str, nn.Linear], nn.Module]


class AdaptedModel:
    """The backbone with every LoRA target wrapped by `make_layer(name, linear)`.

    The default layer is `DualLoRALinear`; a method with another adapter shape (VeRA, a mixture of LoRAs,
    LoRA-SB, ...) passes its own factory. Every parameter and buffer an adapter layer adds (not its wrapped
    `base`) and every head parameter is addressable by its full name.
    """

    def __init__(self, backbone: Backbone, targets: list[str] | None, make_layer: LayerFactory):
        self.net = copy.deepcopy(backbone.model)  # one copy per method; shared by all its clients
        self.pad_id = backbone.tokenizer.pad_token_id or 0
        self.placement = backbone.placement
        self.device = backbone.placement.device
        self.layers: dict[str, nn.Module] = inject(self.net, target_modules(self.net, targets), make_layer)
        self.net.eval()  # new adapter layers start in training mode: an evaluation before any training must not drop out
        self._tensors: Tensors = {}
        for lname, layer in self.layers.items():
            for name, p in [*layer.named_parameters(), *layer.named_buffers()]:
                if not name.startswith("base."):
                    self._tensors[f"{lname}.{name}"] = p
        for name, p in self.net.named_parameters():
            if is_head(name, backbone.head_modules):
                self._tensors[name] = p
        self.global_names = self.names_ending(".g_A", ".g_B")
        self.private_names = self.names_ending(".p_A", ".p_B")
        self.mask_names = self.names_ending("_mask")
        self.head_names = [n for n in self._tensors if is_head(n, backbone.head_modules)]
        if not self.head_names:
            raise UserError(f"model.head_modules = {backbone.head_modules}: no parameter of the model is in them")
        self._place()
        self.head_init = self.read(self.head_names)

    def _place(self) -> None:
        """Move to the device; store the frozen backbone (not adapters, not the head) in its precision.

        On CPU, attention runs as plain matmuls ("eager"): for the short sequences of text classification
        its backward pass was recorded as 2x faster in bf16 than PyTorch's fused CPU attention (an earlier
        session's figure; no kept benchmark reproduces it), and the backbone's own dropout draws cheap masks
        (`cheap_dropout`)."""
        self.net.to(self.device)
        if self.device.type == "cpu" and hasattr(self.net, "set_attn_implementation"):
            use_cheap_dropout(self.net)
        ours = {id(t) for t in self._tensors.values()}
        for t in [*self.net.parameters(), *self.net.buffers()]:
            if id(t) not in ours and t.is_floating_point():
                t.data = t.data.to(self.placement.dtype)

    @classmethod
    def dual(cls, backbone: Backbone, targets: list[str] | None, r_g: int, alpha_g: float, r_p: int,
             alpha_p: float, dropout: float) -> "AdaptedModel":
        """The dual-track LoRA model (r_p = 0: plain LoRA on the global track)."""
        return cls(backbone, targets, lambda name, base: DualLoRALinear(base, r_g, alpha_g, r_p, alpha_p, dropout))

    def names_ending(self, *suffixes: str) -> list[str]:
        return [n for n in self._tensors if n.endswith(suffixes)]

    # --- tensors by name -------------------------------------------------------------------------
    def params(self, names: list[str]) -> list[nn.Parameter]:
        return [self._tensors[n] for n in names]

    def read(self, names: list[str]) -> Tensors:
        """Copies on the host (client states, payloads)."""
        return {n: self._tensors[n].detach().to("cpu", copy=True) for n in names}

    def snapshot(self, names: list[str]) -> Tensors:
        """Copies on the model's device (e.g. FedProx's anchor, read every step)."""
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

    def spec(self, names: list[str]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of each named tensor (what an upload of them must look like)."""
        return {n: (tuple(self._tensors[n].shape), self._tensors[n].dtype) for n in names}

    # --- initial values ---------------------------------------------------------------------------
    def init_track(self, track: str, generator: torch.Generator) -> Tensors:
        """Fresh LoRA values for track "g" or "p" of every layer (A random, B zero)."""
        out: Tensors = {}
        for name, layer in self.layers.items():
            rank = getattr(layer, f"r_{track}", 0)
            if rank:
                a, b = lora_pair(rank, layer.base.in_features, layer.base.out_features, generator)
                out[f"{name}.{track}_A"], out[f"{name}.{track}_B"] = a, b
        return out

    def masks_for(self, private: Tensors, sparsity: float, generator: torch.Generator, ties: str = "random") -> Tensors:
        """Magnitude masks for the private track values given (one mask per tensor)."""
        return {f"{n}_mask": magnitude_mask(private[n], sparsity, generator, ties) for n in self.private_names}

    # --- forward ----------------------------------------------------------------------------------
    @contextmanager
    def mode(self, mode: str):
        """Set `mode` ("global", "both", "private") on every layer that has modes, restore after."""
        moded = {n: layer for n, layer in self.layers.items() if hasattr(layer, "mode")}
        before = {n: layer.mode for n, layer in moded.items()}
        for layer in moded.values():
            layer.mode = mode
        try:
            yield
        finally:
            for n, layer in moded.items():
                layer.mode = before[n]

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """fp32 logits; the forward runs on the device, under bf16 autocast in bf16 placement."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.placement.bf16):
            out = self.net(input_ids=input_ids, attention_mask=attention_mask).logits
        return out.float()
