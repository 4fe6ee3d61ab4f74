"""`fedslip` command line: run one method, or compare several on the same split.

User mistakes (bad config, missing data, unknown method, ...) print one line and exit with code 2 before
anything is written; outputs appear only when a run has finished.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from fedslip.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own default prints usage too)
        raise UserError(message)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.toml", help="TOML file with [data] [partition] [model] [train] [method]")
    p.add_argument("--preset", choices=None, metavar="{quick,paper}", help="start from a preset (default: paper)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set train.rounds=3 (repeatable)")
    p.add_argument("--data-dir", help="AG News folder with train.csv and test.csv (else $FEDSLIP_DATA_DIR, then the hub)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedslip", description="Federated, personalized, parameter-efficient fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="train one method federated and report its metrics")
    _common(run)
    run.add_argument("--method", help="method name (default fedslip; see `fedslip methods`)")
    cmp_ = sub.add_parser("compare", help="run several methods on the same split and compare them")
    _common(cmp_)
    cmp_.add_argument("--methods", default="local,fedavg,dualtrack-naive,fedslip",
                      help="comma-separated method names, or 'all'")
    sub.add_parser("methods", help="list the available methods")
    from fedslip.flower_cli import add_commands

    add_commands(sub, _common)
    return parser


def _config(args, method: str | None):
    from fedslip.config import load_config

    sets = list(args.sets)
    if args.data_dir:
        sets.append(f"data.data_dir={_toml_str(args.data_dir)}")
    return load_config(args.config, args.preset, method, sets)


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _method_list(spec: str) -> list[str]:
    from fedslip.methods import METHODS

    names = list(METHODS) if spec.strip() == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise UserError(f"unknown method {', '.join(unknown) or spec!r} (known: {', '.join(METHODS)})")
    return names


def _out_dir(args, default: str) -> Path:
    out = Path(args.out or default)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    return out


def _execute(args, methods: list[str], out: Path) -> int:
    import copy

    from rich.console import Console

    from fedslip.evaluation.outputs import write_outputs
    from fedslip.evaluation.tables import comparison_rows, to_markdown
    from fedslip.federation.simulation import Simulation
    from fedslip.methods import METHODS
    from fedslip.prepare import prepare
    from fedslip.progress import NullProgress, RichProgress

    cfg = _config(args, methods[0])
    if cfg.method.strategy != "method":
        raise UserError(f"method.strategy = {cfg.method.strategy!r} applies to Flower runs (fedslip flower, "
                        "fedslip deploy); the in-process engine aggregates with the method's own rule")
    console = Console(stderr=True)
    start = time.perf_counter()
    prep = prepare(cfg)
    console.print(f"data: {prep.data.description}; backbone: {prep.backbone.name} ({prep.backbone.source}); "
                  f"{len(prep.split.train)} clients, train sizes {[len(s) for s in prep.split.train]}")
    runs = []
    progress = NullProgress() if args.quiet else RichProgress()
    with progress if not args.quiet else nullcontext():
        for name in methods:
            run_cfg = copy.deepcopy(cfg)
            run_cfg.method.name = name
            runs.append(Simulation(prep, METHODS[name](run_cfg), progress).run())
    write_outputs(out, prep, runs, time.perf_counter() - start)
    print(to_markdown(comparison_rows([r for r, _ in runs])))
    console.print(f"wrote {out}/: results.json rounds.csv clients.csv ledger.csv comparison.md comparison.csv figure.png")
    return 0


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
        if args.command == "run":
            methods = _method_list(args.method or "fedslip")
            return _execute(args, methods[:1], _out_dir(args, f"runs/{methods[0]}"))
        methods = _method_list(args.methods)
        return _execute(args, methods, _out_dir(args, "runs/compare"))
    except UserError as e:
        print(f"fedslip: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedslip: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
