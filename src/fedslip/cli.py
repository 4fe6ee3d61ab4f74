"""`fedslip` command line: run one method, or compare several on the same split.

User mistakes (bad config, missing data, unknown method, ...) print one line and exit with code 2 before
anything is written; outputs appear only when a run has finished.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from fedslip.cli_common import Parser, add_common, check_out, config_from_args, method_list, out_dir
from fedslip.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fedslip", description="Federated, personalized, parameter-efficient fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    run = sub.add_parser("run", help="train one method federated and report its metrics")
    add_common(run)
    run.add_argument("--method", help="method name (default fedslip; see `fedslip methods`)")
    run.add_argument("--resume", action="store_true", help="go on from the checkpoint in --out")
    cmp_ = sub.add_parser("compare", help="run several methods on the same split and compare them")
    add_common(cmp_)
    cmp_.add_argument("--methods", default="local,fedavg,dualtrack-naive,fedslip",
                      help="comma-separated method names, or 'all'")
    cmp_.add_argument("--resume", action="store_true", help="go on from the checkpoints in --out")
    sub.add_parser("methods", help="list the available methods")
    split = sub.add_parser("split", help="write each client's files of the split (for nodes that read only their own)")
    add_common(split)
    from fedslip.flower_cli import add_commands

    add_commands(sub, add_common)
    return parser


def _execute(args, methods: list[str], out: Path) -> int:
    import copy

    from rich.console import Console

    from fedslip.evaluation.outputs import write_outputs
    from fedslip.evaluation.tables import comparison_rows, to_markdown
    from fedslip.federation.inprocess import Simulation
    from fedslip.methods import method_for
    from fedslip.prepare import prepare
    from fedslip.progress import for_terminal

    cfg = config_from_args(args, methods[0])
    if cfg.method.strategy != "method":
        _need_flower(cfg.method.strategy)
    check_out(args, out)
    console = Console(stderr=True)
    start = time.perf_counter()
    prep = prepare(cfg)
    console.print(f"data: {prep.data.description}; backbone: {prep.backbone.name} ({prep.backbone.source}); "
                  f"{len(prep.split.train)} clients, training on {[len(s) for s in prep.split.train]} examples")
    console.print(f"device: {describe_placement(prep.backbone.placement.info)}")
    paths = resumable(out, prep, methods)
    runs = []
    progress = for_terminal(args.quiet)
    with progress:
        for name in methods:
            run_cfg = copy.deepcopy(cfg)
            run_cfg.method.name = name
            runs.append(Simulation(prep, method_for(run_cfg), progress).run(paths[name], args.resume))
    write_outputs(out, prep, runs, time.perf_counter() - start)
    print(to_markdown(comparison_rows([r for r, _ in runs])))
    console.print(f"wrote {out}/: results.json rounds.csv clients.csv ledger.csv comparison.md comparison.csv figure.png")
    return 0


def _split(args) -> int:
    from fedslip.data.client_files import write_client_files
    from fedslip.data.partition import make_split
    from fedslip.data.sources import load_data
    from fedslip.evaluation.outputs import staged

    cfg = config_from_args(args, None)
    out = out_dir(args, "runs/split")
    data = load_data(cfg.data)
    split = make_split(data, cfg.partition, cfg.train.seed)
    with staged(out) as stage:
        write_client_files(data, split, stage)
    names = ", ".join(f'"{n}"' for n in data.label_names)
    print(f"wrote {out}/: client0..{len(split.train) - 1}/train.csv, test.csv, global_test.csv")
    print(f"run config: node-data = true, overrides = \"data.label_names=[{names}]\"")
    print(f"node k: --node-config 'partition-id=k num-partitions={len(split.train)} "
          f"train-file=\"{out.resolve()}/clientk/train.csv\" test-file=\"{out.resolve()}/clientk/test.csv\"'")
    return 0


def resumable(out: Path, prep, methods: list[str]) -> dict[str, Path]:
    """Each method's checkpoint path; one clear line when an existing checkpoint is another run's."""
    from fedslip.federation import checkpoint

    paths = {name: checkpoint.path_for(out, name) for name in methods}
    for name, path in paths.items():
        if path.exists():
            checkpoint.check(path, prep, name)
    return paths


def describe_placement(info: dict) -> str:
    text = f"{info['device']}, {info['precision']}"
    if "probe" in info:
        p = info["probe"]
        text += (f" (precision auto: matmul fp32 {p['fp32_gflops']:.0f} GFLOP/s, bf16 {p['bf16_gflops']:.0f} "
                 f"GFLOP/s, x{p['bf16_speedup']:.2f})")
    return text


def _need_flower(strategy: str) -> None:
    from fedslip.federation.flower.strategies import parse_spec

    parse_spec(strategy)
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise UserError(f"method.strategy = {strategy!r} is a Flower strategy: pip install -e '.[flower]'") from None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)
        if hasattr(args, "flower_handler"):
            return args.flower_handler(args)
        if args.command == "methods":
            from fedslip.methods import METHODS

            for name, cls in METHODS.items():
                doc = cls.__doc__ or sys.modules[cls.__module__].__doc__ or ""
                print(f"{name:18s} {(doc.strip().splitlines() or [''])[0]}")
            return 0
        if args.command == "split":
            return _split(args)
        if args.command == "run":
            # --method, else the config's method.name (a --config file may set it), else fedslip
            methods = method_list(args.method or config_from_args(args, None).method.name)
            return _execute(args, methods[:1], out_dir(args, f"runs/{methods[0]}"))
        methods = method_list(args.methods)
        return _execute(args, methods, out_dir(args, "runs/compare"))
    except UserError as e:
        print(f"fedslip: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedslip: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
