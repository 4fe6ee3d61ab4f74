"""`fedslip deploy`: run one method on a real Flower deployment on this machine, collect its outputs.

The deployment itself (a SuperLink and one SuperNode per client on 127.0.0.1, TLS and SuperNode keys, the
Flower app submitted with `flwr run`, every process stopped afterwards) is `loopback.Loopback`; certificates
and keys are `tls`. Here: the run config for a fedslip run (`run_config_for`), one run start to finish
(`deploy`), and the nodes' own logs copied next to the ServerApp's outputs (`collect_node_logs`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from fedslip.federation.flower.loopback import Loopback


def run_config_for(preset: str | None, method: str, config_file: str | None, sets: list[str], out: Path,
                   min_available: int = 0, round_timeout: float = 600.0) -> dict[str, Any]:
    """Every key of the app's run config (loopback.APP_CONFIG), paths made absolute."""
    return {"preset": preset or "", "method": method, "config-file": str(Path(config_file).resolve()) if config_file
            else "", "overrides": "; ".join(sets), "out": str(Path(out).resolve()), "min-available": min_available,
            "round-timeout": round_timeout}


def collect_node_logs(lb: Loopback, out: Path) -> None:
    """Copy each node's wire log and events next to the ServerApp's outputs (out/nodes/node<k>/)."""
    for k in range(lb.n_nodes):
        for name in ("wire.jsonl", "events.jsonl"):
            src = lb.state_dir(k) / name
            if src.is_file():
                dst = out / "nodes" / f"node{k}" / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)


def deploy(run_config: dict[str, Any], workdir: Path, n_nodes: int = 4, insecure: bool = False,
           timeout: float = 1800.0) -> dict[str, Any]:
    """Start everything, run the app once, collect, stop everything. Returns the run's final status."""
    with Loopback(workdir, n_nodes, insecure=insecure) as lb:
        run_id = lb.submit(run_config)
        info = lb.wait(run_id, timeout)
        (Path(workdir) / "run.log").write_text(lb.logs(run_id), encoding="utf-8")
        out = Path(run_config["out"])
        if info["status"] != "finished:completed" or not (out / "results.json").is_file():
            raise RuntimeError(f"run {run_id} ended as {info['status']}; see {workdir}/run.log")
        collect_node_logs(lb, out)
        return info
