"""`fedslip deploy` and `fedslip flower`: the same runs as `fedslip run`, on Flower.

* `fedslip deploy`: a real deployment on this machine: one SuperLink and one SuperNode per client on
  127.0.0.1, TLS certificates and SuperNode keys generated for the run (`--insecure`: neither), the app
  submitted with `flwr run`; the ServerApp writes the usual output files into `--out`.
* `fedslip flower --runtime local`: the ServerApp and ClientApp in this process over an in-memory grid
  (messages still go through Flower's serialization); `--runtime simulation`: Flower's simulation engine
  (Ray) behind a SuperLink started for the run.

Hooked into `fedslip.cli` by `add_commands(sub, add_common)` in `build_parser` and, in `main`,
`if hasattr(args, "flower_handler"): return args.flower_handler(args)`.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import time
from pathlib import Path

from fedslip.cli_common import exclusive


def add_commands(sub, common) -> None:
    dep = sub.add_parser("deploy", help="run one method on a SuperLink + one SuperNode per client on 127.0.0.1")
    common(dep)
    dep.add_argument("--method", help="method name (default fedslip)")
    dep.add_argument("--resume", action="store_true", help="go on from the checkpoint in --out")
    dep.add_argument("--insecure", action="store_true", help="no TLS and no SuperNode authentication (debugging)")
    dep.add_argument("--min-available", type=int, default=0, help="clients that must be online (default: all)")
    dep.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run (default 3600)")
    dep.add_argument("--workdir", help="folder for certificates, keys, node state, logs and commands.sh, the "
                     "commands it ran (default: a temp folder)")
    dep.set_defaults(flower_handler=_deploy)
    fl = sub.add_parser("flower", help="run one method as a Flower app in this process or on Flower's "
                                       "simulation engine")
    common(fl)
    fl.add_argument("--method", help="method name (default fedslip)")
    fl.add_argument("--resume", action="store_true", help="go on from the checkpoint in --out")
    fl.add_argument("--runtime", choices=("local", "simulation"), default="local",
                    help="local: in-process grid (no Ray); simulation: Flower's simulation engine (Ray)")
    fl.add_argument("--cpus", type=int, default=2, help="simulation: CPUs Ray may use (default 2)")
    fl.add_argument("--gpus", type=float, default=None,
                    help="simulation: GPUs Ray may use (default: every visible CUDA device), shared evenly "
                         "by the ClientApps that run at once")
    fl.add_argument("--timeout", type=float, default=3600.0, help="simulation: seconds to wait (default 3600)")
    fl.add_argument("--workdir", help="folder for node state and logs (default: a temp folder)")
    fl.set_defaults(flower_handler=_flower)


def _prepare_run(args, default_out: str):
    from fedslip.cli_common import check_out, config_from_args, method_list, out_dir, toml_str
    from fedslip.errors import UserError
    from fedslip.federation.flower.deploy import run_config_for
    from fedslip.federation.protocol import warn_settings
    from fedslip.methods import method_for

    try:
        from flwr.common.logger import update_console_handler
    except ImportError:
        raise UserError("the Flower runtime needs Flower: pip install -e '.[flower]'") from None
    update_console_handler(colored=sys.stderr.isatty())  # no colour codes in a log file
    methods = method_list(args.method or config_from_args(args, None).method.name)
    if len(methods) > 1:
        raise UserError(f"--method {args.method}: a Flower run trains one method")
    method = methods[0]
    if args.resume and getattr(args, "runtime", "") == "simulation":
        raise UserError("--resume with --runtime simulation: Flower's simulation engine keeps no node state "
                        "from one run to the next, so the clients' private states would be lost; resume with "
                        "--runtime local or fedslip deploy")
    if args.resume and not args.workdir:
        raise UserError("--resume needs --workdir: the folder of the run it resumes, where its nodes keep "
                        "their private states")
    cfg = config_from_args(args, method)  # validated here: a bad config stops before anything starts
    if getattr(args, "runtime", "") != "local":  # elsewhere the ServerApp's log, which says it too, is a file
        warn_settings([method_for(cfg)])
    out = out_dir(args, default_out.format(method=method))
    check_out(args, out)
    sets = list(args.sets)
    for key in ("data_dir", "train_file", "test_file"):  # the nodes run in other folders: absolute paths
        value = getattr(cfg.data, key)
        if value:
            sets.append(f"data.{key}={toml_str(str(Path(value).expanduser().resolve()))}")
    if cfg.train.precision == "auto":  # resolved once, here, for the server and every node alike
        gpu_less = getattr(args, "runtime", "") == "simulation" and args.gpus == 0  # Ray hides the GPUs from them
        device = "cpu" if gpu_less and cfg.train.device == "auto" else cfg.train.device
        sets.append(f"train.precision={toml_str(run_precision(device, out, method, args.resume))}")
    rc = run_config_for(args.preset, method, args.config, sets, out, getattr(args, "min_available", 0))
    rc["resume"] = bool(args.resume)
    return cfg, rc, out


def run_precision(device: str, out: Path, method: str, resume: bool) -> str:
    """What `auto` is for the whole run: a resumed run's checkpoint's, else this machine's probe. Left to
    each process, the server and every node would probe on their own (a ClientApp in its own process: for
    every message) and, near the probe's margin, could train one run in two precisions. All of `fedslip
    flower`'s and `fedslip deploy`'s processes run on this machine."""
    from fedslip.federation import checkpoint
    from fedslip.model.placement import resolve

    kept = checkpoint.kept_precision([checkpoint.path_for(out, method)], "auto") if resume else {}
    return kept.get("precision") or resolve(device, "auto").info["precision"]


def _workdir(args) -> Path:
    """The node state and logs folder: --workdir, else a fresh temporary one (made once the run holds --out)."""
    return Path(args.workdir or tempfile.mkdtemp(prefix="fedslip-flower-")).resolve()


def _report(out: Path, workdir: Path, start: float) -> int:
    print((out / "comparison.md").read_text(encoding="utf-8").rstrip())
    print(f"wrote {out}/ (results.json rounds.csv clients.csv ledger.csv wire.csv flower.json ...) in "
          f"{time.perf_counter() - start:.0f} s; node state and logs in {workdir}/")
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from fedslip.federation.flower.deploy import deploy

    start = time.perf_counter()
    cfg, rc, out = _prepare_run(args, "runs/deploy-{method}")
    with exclusive(out):
        workdir = _workdir(args)
        print(f"deploying {rc['method']}: SuperLink + {cfg.partition.n_clients} SuperNodes on 127.0.0.1 "
              f"({'insecure' if args.insecure else 'TLS, SuperNode authentication'}); workdir {workdir}")
        try:
            deploy(rc, workdir, n_nodes=cfg.partition.n_clients, insecure=args.insecure, timeout=args.timeout)
        except (RuntimeError, TimeoutError) as e:  # the run failed, not the input: exit 1, logs kept in workdir
            return _failed(e, workdir)
        return _report(out, workdir, start)


def _failed(error: Exception, workdir: Path) -> int:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"fedslip: the Flower run failed: {first} (processes stopped; logs in {workdir}/)", file=sys.stderr)
    return 1


def _flower(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    cfg, rc, out = _prepare_run(args, "runs/flower-{method}")
    with exclusive(out):
        workdir = _workdir(args)
        n = cfg.partition.n_clients
        if args.runtime == "local":
            from flwr.app import Context, RecordDict

            from fedslip.federation.flower.app import client_app, server_app
            from fedslip.federation.flower.local_grid import LocalGrid

            nodes = [{"partition-id": k, "num-partitions": n, "state-dir": str(workdir / f"node{k}")} for k in range(n)]
            run_id = secrets.randbits(62) + 1  # names the node state files: a new run never reads an old one's
            grid = LocalGrid(client_app, nodes, rc, run_id=run_id, seed=cfg.train.seed)
            server_app(grid, Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
        else:
            try:
                run_simulation(rc, workdir, n, cpus=args.cpus, gpus=args.gpus, timeout=args.timeout)
            except (RuntimeError, TimeoutError) as e:
                return _failed(e, workdir)
        return _report(out, workdir, start)


def run_simulation(rc: dict, workdir: Path, n_nodes: int, cpus: int = 2, gpus: float | None = None,
                   timeout: float = 3600.0) -> dict:
    """`flwr run` on Flower's simulation engine (Ray), behind a SuperLink started (and stopped) for this run."""
    from fedslip.federation.flower.loopback import Loopback

    gpus = gpu_count() if gpus is None else gpus
    per_client = min(1.0, gpus / min(cpus, n_nodes)) if gpus else 0.0  # the ClientApps running at once share them
    federation = {"num-supernodes": n_nodes, "client-resources-num-cpus": 1,
                  "client-resources-num-gpus": round(per_client, 4),
                  "init-args-num-cpus": cpus, "init-args-num-gpus": gpus}
    with Loopback(workdir, n_nodes, insecure=True, simulation=True) as lb:
        run_id = lb.submit(rc, federation)
        info = lb.wait(run_id, timeout)
        (workdir / "run.log").write_text(lb.logs(run_id), encoding="utf-8")
    if info["status"] != "finished:completed" or not (Path(rc["out"]) / "results.json").is_file():
        raise RuntimeError(f"simulation run {run_id} ended as {info['status']}; see {workdir}/run.log")
    return info


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
