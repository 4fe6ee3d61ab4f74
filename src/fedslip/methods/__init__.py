"""Federated methods, one file each, registered by name."""

from fedslip.methods.base import Method
from fedslip.methods.dualtrack_naive import DualTrackNaive
from fedslip.methods.fedavg import FedAvg
from fedslip.methods.fedprox import FedProx
from fedslip.methods.fedsa import FedSA
from fedslip.methods.fedsa_rslora import FedSARsLoRA
from fedslip.methods.fedsa_vera import FedSAVeRA
from fedslip.methods.fedsb import FedSB
from fedslip.methods.fedslip import FedSLIP
from fedslip.methods.fedslip_plus import FedSLIPPlus
from fedslip.methods.ffa import FFALoRA
from fedslip.methods.flora import FLoRA
from fedslip.methods.floral import FLoRAL
from fedslip.methods.local import LocalOnly
from fedslip.methods.pfedlora import PFedLoRA

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (LocalOnly, FedAvg, FedProx, DualTrackNaive, FedSLIP, FedSLIPPlus,
                                                             FedSA, FedSARsLoRA, FedSAVeRA, FFALoRA,
                                                             FLoRAL, PFedLoRA, FLoRA, FedSB)}


def method_for(cfg) -> Method:
    """The method `cfg.method.name` names, built for `cfg` (with its `by_method` settings); an unknown name is
    one clear line."""
    if cfg.method.name not in METHODS:
        from fedslip.errors import UserError

        raise UserError(f"unknown method {cfg.method.name!r} (known: {', '.join(METHODS)})")
    return METHODS[cfg.method.name](cfg)
