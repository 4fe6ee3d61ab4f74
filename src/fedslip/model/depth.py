"""Running only the first L transformer layers: one frozen backbone serves clients of different depths.

`truncated(net, path, depth)` swaps the encoder's layer list (`bert.encoder.layer`,
`distilbert.transformer.layer`, ...) for a shorter `nn.ModuleList` of its first `depth` blocks and restores
it afterwards; the blocks themselves (and their adapters) are the same objects, nothing is copied.

`DepthAdaptedModel` is an `AdaptedModel` whose depth is one of its named tensors (`DEPTH`, an int64
scalar): a client's view carries its depth like any adapter tensor, so loading a view (for training or
for the engine's evaluation) also selects how many layers the forward pass runs.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from fedslip.errors import UserError
from fedslip.model.adapted import AdaptedModel, LayerFactory
from fedslip.model.backbone import Backbone

DEPTH = "depth"  # the tensor name of the active depth in a DepthAdaptedModel
LAYER_LIST_NAMES = ("layer", "layers")


def layer_list_path(net: nn.Module) -> str:
    """Dotted path of the `nn.ModuleList` of transformer blocks (the first one named layer/layers)."""
    for name, module in net.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and name.rsplit(".", 1)[-1] in LAYER_LIST_NAMES:
            return name
    raise UserError(f"{type(net).__name__}: no list of transformer layers (an nn.ModuleList named "
                    f"{' or '.join(LAYER_LIST_NAMES)}) to truncate")


def layer_index(path: str, module_name: str) -> int | None:
    """The block index of a module under the layer list at `path` (None: not inside a block)."""
    prefix = path + "."
    if not module_name.startswith(prefix):
        return None
    head = module_name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


@contextmanager
def truncated(net: nn.Module, path: str, depth: int):
    """Within the block, `net` runs only its first `depth` transformer layers."""
    parent_name, _, attr = path.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    full = getattr(parent, attr)
    if not 1 <= depth <= len(full):
        raise ValueError(f"depth {depth} outside 1..{len(full)}")
    if depth == len(full):
        yield
        return
    setattr(parent, attr, nn.ModuleList(list(full)[:depth]))
    try:
        yield
    finally:
        setattr(parent, attr, full)


class DepthAdaptedModel(AdaptedModel):
    """An `AdaptedModel` whose forward pass runs the first `depth` layers, `depth` being a named tensor."""

    def __init__(self, backbone: Backbone, targets: list[str] | None, make_layer: LayerFactory):
        super().__init__(backbone, targets, make_layer)
        self.layer_path = layer_list_path(self.net)
        self.n_layers = len(self.net.get_submodule(self.layer_path))
        self.depth = torch.tensor(self.n_layers, dtype=torch.int64)
        self._tensors[DEPTH] = self.depth

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with truncated(self.net, self.layer_path, int(self.depth)):
            return super().logits(input_ids, attention_mask)
