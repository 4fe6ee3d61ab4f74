"""What a Flower process needs for a run config: the fedslip config, data, backbone, method and model.

Built once per process and config (a ServerApp or ClientApp is called many times). Every node, and the
server, runs `prepare(cfg)` itself: it is deterministic from the config and the seed, and a node trains and
evaluates only its own partition.
"""

from __future__ import annotations

import json
from typing import Any

from fedslip.config import Config, load_config
from fedslip.federation.client import ClientSide
from fedslip.methods import METHODS

RUN_DEFAULTS: dict[str, Any] = {"preset": "", "method": "fedslip", "config-file": "", "overrides": "",
                                "out": "runs/flower", "min-available": 0, "round-timeout": 600.0}


def split_overrides(text: str) -> list[str]:
    return [s.strip() for s in text.replace("\n", ";").split(";") if s.strip()]


def config_from_run(run_config) -> Config:
    rc = {**RUN_DEFAULTS, **dict(run_config)}
    return load_config(str(rc["config-file"]) or None, str(rc["preset"]) or None, str(rc["method"]) or None,
                       split_overrides(str(rc["overrides"])))


class Runtime:
    def __init__(self, cfg: Config, prep=None):
        from fedslip.prepare import prepare

        self.cfg = cfg
        self.prep = prep if prep is not None else prepare(cfg)
        self.method = METHODS[cfg.method.name](cfg)
        self.model = self.method.build(self.prep.backbone)
        self.side = ClientSide(cfg, self.prep, self.method, self.model)
        self.n_clients = len(self.prep.split.train)


_RUNTIMES: dict[str, Runtime] = {}


def runtime_for(cfg: Config, prep=None) -> Runtime:
    """The process's Runtime for `cfg` (built once; `prep` reuses an already prepared run of the same data)."""
    key = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    if key not in _RUNTIMES:
        _RUNTIMES.clear()  # one config per process at a time: a new run frees the previous one
        _RUNTIMES[key] = Runtime(cfg, prep)
    return _RUNTIMES[key]
