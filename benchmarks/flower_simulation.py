"""Our in-process engine against Flower's simulation engine (Ray): same method, config and machine, one run.

    python benchmarks/flower_simulation.py [--clients 100] [--train 32] [--rounds 3] [--cpus 2] [--threads 1]
                                           [--model tiny|minilm] [--data synthetic|ag_news] [--json PATH]

fedavg, iid, N clients × `--train` examples, 1 local epoch, batch 8, fp32. In-process: `Simulation.run()`
here, `--threads` torch threads. Flower: our own ServerApp/ClientApp on a `--simulation` SuperLink, Ray
with `--cpus` CPUs and 1 per ClientApp. Both time the same thing inside the process that runs the protocol
(`RoundProtocol.run_round`, `finish`); start-up is reported apart, and the headline ratio is the mean of
rounds 2..R (Flower's round 1 also pays each Ray worker's first import and data preparation). A run where
any client failed stops with an error: a failed client does no work and would flatter its side.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from flwr.serverapp import ServerApp

# imported here, not in the ServerApp's body: Flower loads the ClientApp from this module in another thread
# of the same simulation process, and must not find it half-imported
from fedslip.federation.flower.app import server_main

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TIMINGS = "benchmark_timings.json"


@contextmanager
def timed(events: list):
    """Record (name, start, end) wall-clock times of every round and of the final evaluation."""
    from fedslip.federation.protocol import RoundProtocol

    run_round, finish = RoundProtocol.run_round, RoundProtocol.finish

    def timed_round(self, rnd):
        t = time.time()
        out = run_round(self, rnd)
        events.append((f"round {rnd}", t, time.time()))
        return out

    def timed_finish(self):
        pending, t = self.pending, time.time()
        finish(self)
        if pending is not None:
            events.append(("final evaluation", t, time.time()))

    RoundProtocol.run_round, RoundProtocol.finish = timed_round, timed_finish
    try:
        yield events
    finally:
        RoundProtocol.run_round, RoundProtocol.finish = run_round, finish


timed_server_app = ServerApp()


@timed_server_app.main()
def _timed_main(grid, context) -> None:
    """The project's ServerApp, with its rounds timed; the times go to <out>/benchmark_timings.json."""
    events: list = []
    start = time.time()
    with timed(events):
        server_main(grid, context)
    doc = {"main": [start, time.time()], "events": events}
    (Path(str(context.run_config["out"])) / TIMINGS).write_text(json.dumps(doc), encoding="utf-8")


def run_config(args, out: Path) -> dict:
    sets = {"partition.scheme": '"iid"', "partition.n_clients": args.clients, "partition.n_train": args.train,
            "partition.n_test": args.test, "partition.n_global_test": 100, "train.rounds": args.rounds,
            "train.local_epochs": 1, "train.batch_size": 8, "train.lr": 1e-3, "train.precision": '"fp32"'}
    if args.data == "synthetic":  # 4 classes
        sets["data.source"] = '"synthetic"'
        sets["data.synthetic_per_class"] = (args.train + args.test) * args.clients // 4 + 100
    else:
        sets["data.data_dir"] = json.dumps(os.environ.get("FEDSLIP_DATA_DIR", "/work/shared/data/ag_news"))
    if args.model == "tiny":
        sets["model.backbone"], sets["model.max_length"] = '"tiny-random:bert"', 32
    else:
        sets["model.backbone"], sets["model.max_length"] = json.dumps(MINILM), 64
    return {"preset": "", "method": "fedavg", "out": str(out),
            "overrides": "; ".join(f"{k}={v}" for k, v in sets.items())}


def summarize(events: list, t0: float, end: float) -> dict:
    rounds = [b - a for name, a, b in events if name.startswith("round")]
    final = [b - a for name, a, b in events if name == "final evaluation"]
    steady = rounds[1:] or rounds
    return {"startup_s": events[0][1] - t0, "round1_s": rounds[0], "steady_round_s": sum(steady) / len(steady),
            "rounds_s": rounds, "final_eval_s": final[0] if final else 0.0, "total_s": end - t0}


def inprocess(rc: dict, threads: int) -> dict:
    import torch

    from fedslip.federation.flower.runtime import config_from_run
    from fedslip.federation.inprocess import Simulation
    from fedslip.methods import METHODS
    from fedslip.prepare import prepare

    torch.set_num_threads(threads)
    cfg = config_from_run(rc)  # exactly what every Flower process builds from the same run config
    events: list = []
    t0 = time.time()
    sim = Simulation(prepare(cfg), METHODS["fedavg"](cfg))
    with timed(events):
        result, _ = sim.run()
    if any(r.failed or r.rejected for r in result.rounds):
        raise SystemExit("in-process run: some clients failed or were rejected")
    return {**summarize(events, t0, time.time()), "final_train_loss": result.final.get("train_loss")}


def flower(rc: dict, clients: int, cpus: int, workdir: Path, poll: float) -> dict:
    from fedslip.federation.flower.loopback import APP_COMPONENTS, Loopback, write_app_dir

    here = str(Path(__file__).resolve().parent)  # the ServerApp imports `flower_simulation` from here
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    app = write_app_dir(workdir / "app")
    text = (app / "pyproject.toml").read_text(encoding="utf-8")
    (app / "pyproject.toml").write_text(text.replace(APP_COMPONENTS["serverapp"], "flower_simulation:timed_server_app"),
                                        encoding="utf-8")
    federation = {"num-supernodes": clients, "client-resources-num-cpus": 1, "client-resources-num-gpus": 0.0,
                  "init-args-num-cpus": cpus, "init-args-num-gpus": 0}  # as flower_cli.run_simulation
    t0 = time.time()
    with Loopback(workdir, clients, insecure=True, simulation=True, project=app) as lb:
        run_id = lb.submit(rc, federation)
        info = lb.wait(run_id, 3600, ask_every=poll)  # `flwr list` (a CLI process) every `poll` s, and at the end
        seen = time.time()
        (workdir / "run.log").write_text(lb.logs(run_id), encoding="utf-8")
    stopped = time.time()
    timings = Path(rc["out"]) / TIMINGS
    if info["status"] != "finished:completed" or not timings.is_file():
        raise SystemExit(f"Flower run {run_id} ended as {info['status']}; see {workdir}/run.log")
    failures = json.loads((Path(rc["out"]) / "flower.json").read_text(encoding="utf-8"))["failures"]
    if failures:  # a failed client does no work: its times would flatter Flower
        raise SystemExit(f"Flower run {run_id}: {len(failures)} failed requests, e.g. {failures[0]}; "
                         f"see {workdir}/run.log")
    doc = json.loads(timings.read_text(encoding="utf-8"))
    result = json.loads((Path(rc["out"]) / "results.json").read_text(encoding="utf-8"))
    return {**summarize(doc["events"], t0, doc["main"][1]), "seen_finished_s": seen - t0,
            "stopped_s": stopped - t0, "final_train_loss": result["methods"]["fedavg"]["final"].get("train_loss")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--train", type=int, default=32, help="training examples per client")
    ap.add_argument("--test", type=int, default=8, help="test examples per client")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the in-process run")
    ap.add_argument("--model", choices=("tiny", "minilm"), default="tiny")
    ap.add_argument("--data", choices=("synthetic", "ag_news"), default="synthetic")
    ap.add_argument("--poll", type=float, default=10.0, help="seconds between `flwr list` status checks")
    ap.add_argument("--workdir", help="Flower workdir and outputs (default: a temp folder)")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fedslip-bench-flower-")).resolve()
    load_before = os.getloadavg()
    ours = inprocess(run_config(args, work / "out-inprocess"), args.threads)
    theirs = flower(run_config(args, work / "out-flower"), args.clients, args.cpus, work / "flower", args.poll)
    doc = {"clients": args.clients, "train_per_client": args.train, "test_per_client": args.test,
           "rounds": args.rounds, "cpus": args.cpus, "threads": args.threads, "model": args.model, "data": args.data,
           "method": "fedavg", "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
           "inprocess": ours, "flower_ray": theirs,
           "ratio_steady_round": theirs["steady_round_s"] / ours["steady_round_s"],
           "ratio_round1": theirs["round1_s"] / ours["round1_s"], "ratio_total": theirs["total_s"] / ours["total_s"]}
    print(f"fedavg, {args.clients} clients x {args.train} train / {args.test} test examples, {args.rounds} rounds, "
          f"{args.model} model, {args.data} data, fp32; in-process {args.threads} torch thread(s), Ray {args.cpus} "
          f"CPUs (1 per ClientApp)")
    print(f"{'seconds':<26}{'in-process':>12}{'Flower+Ray':>12}{'ratio':>8}")
    for key, label in [("startup_s", "start-up"), ("round1_s", "round 1"),
                       ("steady_round_s", f"round (mean 2..{args.rounds})"),
                       ("final_eval_s", "final evaluation"), ("total_s", "total (launch to end)")]:
        print(f"{label:<26}{ours[key]:>12.2f}{theirs[key]:>12.2f}{theirs[key] / ours[key]:>7.1f}x")
    print(f"load average (1, 5, 15 min) before {load_before}, after {doc['loadavg_after']}")
    print(f"final train loss: in-process {ours['final_train_loss']:.6f}, Flower {theirs['final_train_loss']:.6f}")
    print(json.dumps(doc) if not args.json else f"wrote {args.json}")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
