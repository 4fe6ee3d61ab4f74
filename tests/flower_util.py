"""Helpers for the Flower runtime tests: the tiny config as Flower run config, in-process Flower runs."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from conftest import TINY

flwr = pytest.importorskip("flwr", reason="the Flower runtime needs the `flower` extra: pip install -e '.[flower]'")


def overrides(**sections) -> str:
    """The tiny config (with `section={key: value}` changes) as the run config's `overrides` string."""
    table = copy.deepcopy(TINY)
    for section, values in sections.items():
        table.setdefault(section, {}).update(values)
    items = []
    for section, values in table.items():
        for key, value in values.items():
            if isinstance(value, str):
                items.append(f'{section}.{key}="{value}"')
            elif isinstance(value, bool):
                items.append(f"{section}.{key}={str(value).lower()}")
            elif value is None:
                continue
            else:
                items.append(f"{section}.{key}={value}")
    return "; ".join(items)


def run_config(method_name: str, /, out=None, **sections) -> dict:
    rc = {"preset": "", "method": method_name, "overrides": overrides(**sections)}
    if out is not None:
        rc["out"] = str(out)
    return rc


def snapshot_rounds(obj) -> list[dict[str, torch.Tensor]]:
    """Wrap obj.run_round so that the global state after every round is kept (a list, filled as it runs)."""
    history: list[dict[str, torch.Tensor]] = []
    real = obj.run_round

    def run_round(rnd):
        record = real(rnd)
        history.append({k: v.clone() for k, v in obj.glob.items()})
        return record

    obj.run_round = run_round
    return history


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-7), name


def ledger_rows(ledger) -> list[tuple]:
    return [(e.method, e.round, e.client, e.direction, e.bytes, e.n_params, e.n_tensors, e.dtypes)
            for e in ledger.entries]


def flower_run(tmp, method, prep, sections, before_round=None, run_id=11, n_nodes=4, drops=None, late=None,
               **run_extra):
    """Run the registered ServerApp over 4 in-process nodes with state folders; return (server, grid, out)."""
    from flwr.app import Context, RecordDict

    from fedslip.federation.flower.app import client_app, server_app
    from fedslip.federation.flower.runtime import config_from_run, runtime_for
    from fedslip.federation.flower.server import FlowerServer
    from fedslip.federation.flower.local_grid import LocalGrid

    out = tmp / "out"
    rc = {**run_config(method, out=out, **sections), **run_extra}
    cfg = config_from_run(rc)
    runtime_for(cfg, dataclasses.replace(prep, cfg=cfg))  # reuse the session's tokenized data and backbone
    nodes = [{"partition-id": k, "num-partitions": n_nodes, "state-dir": str(tmp / f"node{k}")} for k in range(n_nodes)]
    grid = LocalGrid(client_app, nodes, rc, run_id=run_id, drops=drops, late=late)
    servers = []
    real_init = FlowerServer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.history = snapshot_rounds(self)
        if before_round:
            inner = self.run_round

            def run_round(rnd):
                if rnd in before_round:
                    before_round[rnd](grid)
                return inner(rnd)

            self.run_round = run_round
        servers.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FlowerServer, "__init__", init)
        server_app(grid, Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    return servers[0], grid, out


def both_runtimes(name: str, prep, sections: dict, run_id: int):
    """The same tiny run in process and on Flower (4 LocalGrid nodes, no state folders).

    Returns (the in-process Simulation, its result and ledger, the Flower server, its grid, Flower's result
    and ledger)."""
    from fedslip.federation.flower.app import client_app
    from fedslip.federation.flower.local_grid import LocalGrid
    from fedslip.federation.flower.runtime import config_from_run, runtime_for
    from fedslip.federation.flower.server import FlowerServer
    from fedslip.federation.inprocess import Simulation
    from fedslip.methods import METHODS

    from conftest import tiny_config

    cfg = tiny_config(name, **sections)
    sim = Simulation(dataclasses.replace(prep, cfg=cfg), METHODS[name](cfg))
    result, ledger = sim.run()
    rc = run_config(name, **sections)
    fcfg = config_from_run(rc)
    runtime_for(fcfg, dataclasses.replace(prep, cfg=fcfg))
    grid = LocalGrid(client_app, [{"partition-id": k, "num-partitions": 4} for k in range(4)], rc, run_id=run_id)
    server = FlowerServer(grid, fcfg, rc)
    fl_result, fl_ledger = server.run()
    return sim, result, ledger, server, grid, fl_result, fl_ledger
