"""What a Flower process needs for a run config: the fedslip config, data, backbone, method and model.

Built once per process and config (a ServerApp or ClientApp is called many times). Every node, and the
server, runs `prepare(cfg)` itself: it is deterministic from the config and the seed, and a node trains and
evaluates only its own partition.
"""

from __future__ import annotations

import json
from typing import Any

from fedslip.config import Config, load_config
from fedslip.errors import UserError
from fedslip.federation.client import ClientSide
from fedslip.methods import METHODS, method_for

RUN_DEFAULTS: dict[str, Any] = {"preset": "", "method": "fedslip", "config-file": "", "overrides": "",
                                "out": "runs/flower", "min-available": 0, "round-timeout": 600.0,
                                "node-data": False, "resume": False}
# Node config keys of a SuperNode that reads only its own files (run config node-data = true)
NODE_FILES = ("train-file", "test-file", "global-test-file")


def split_overrides(text: str) -> list[str]:
    """`"a.b=1; c.d='x;y'"` -> ["a.b=1", "c.d='x;y'"]: split at ; and newlines outside TOML strings."""
    parts, current, quote, escaped = [], [], "", False
    for ch in text:
        if quote:
            if escaped:
                escaped = False
            elif quote == '"' and ch == "\\":  # a basic string's escape: the next character is its own
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in ";\n":
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def config_from_run(run_config) -> Config:
    rc = {**RUN_DEFAULTS, **dict(run_config)}
    cfg = load_config(str(rc["config-file"]) or None, str(rc["preset"]) or None, str(rc["method"]) or None,
                      split_overrides(str(rc["overrides"])))
    if cfg.method.name not in METHODS:
        raise UserError(f"unknown method {cfg.method.name!r} (known: {', '.join(METHODS)})")
    return cfg


def node_data(run_config) -> bool:
    return bool({**RUN_DEFAULTS, **dict(run_config)}["node-data"])


class Runtime:
    """`files`: a node's own files by NODE_FILES key (node-data runs); `server`: the server of such a run."""

    def __init__(self, cfg: Config, prep=None, files: dict[str, str] | None = None, pid: int = -1,
                 server: bool = False):
        from fedslip.prepare import prepare, prepare_node, prepare_server

        self.cfg = cfg
        if prep is None:
            if server:
                prep = prepare_server(cfg)
            elif files is not None:
                prep = prepare_node(cfg, pid, files["train-file"], files.get("test-file"), files.get("global-test-file"))
            else:
                prep = prepare(cfg)
        self.prep = prep
        self.method = method_for(cfg)
        self.model = self.method.build(self.prep.backbone)
        self.side = ClientSide(self.method.cfg, self.prep, self.method, self.model)  # by_method applied, as in-process
        self.n_clients = len(self.prep.split.train)


_RUNTIMES: dict[str, Runtime] = {}
KEEP = 8  # runtimes kept per process (one per node when in-process nodes each read their own files)


def runtime_for(cfg: Config, prep=None, node_config=None, server: bool = False) -> Runtime:
    """The process's Runtime for `cfg` (built once; `prep` reuses an already prepared run of the same data).

    With `node_config` holding a node's own files, the runtime holds that node's data only."""
    files = {k: str(v) for k, v in dict(node_config or {}).items() if k in NODE_FILES and str(v)} or None
    if files is not None and "train-file" not in files:
        raise UserError(f"node config names {', '.join(files)} but no train-file")
    pid = int(dict(node_config or {}).get("partition-id", -1))
    key = json.dumps([cfg.to_dict(), files, pid if files else None, server], sort_keys=True, default=str)
    if key not in _RUNTIMES:
        while len(_RUNTIMES) >= KEEP:
            del _RUNTIMES[next(iter(_RUNTIMES))]
        _RUNTIMES[key] = Runtime(cfg, prep, files, pid, server)
    return _RUNTIMES[key]
