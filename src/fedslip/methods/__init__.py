"""Federated methods, one file each, registered by name."""

from fedslip.methods.base import Method
from fedslip.methods.dualtrack_naive import DualTrackNaive
from fedslip.methods.fedavg import FedAvg
from fedslip.methods.fedprox import FedProx
from fedslip.methods.fedslip import FedSLIP
from fedslip.methods.local import LocalOnly

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (LocalOnly, FedAvg, FedProx, DualTrackNaive, FedSLIP)}


def make_method(cfg) -> Method:
    return METHODS[cfg.method.name](cfg)
