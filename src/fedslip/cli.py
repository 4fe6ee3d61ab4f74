"""`fedslip` command line: run one method, or compare several on the same split.

User mistakes (bad config, missing data, unknown method, ...) print one line and exit with code 2 before
anything is written; outputs appear only when a run has finished.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

from fedslip.cli_common import (Parser, add_common, check_out, config_from_args, exclusive, method_list, out_dir,
                                toml_str)
from fedslip.errors import UserError


RESCORE = ("with --resume: a finished method's final evaluation runs again from its checkpoint (trains nothing), "
           "e.g. for the per-example answers of train.eval_per_example that older runs lack")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fedslip", description="Federated, personalized, parameter-efficient fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    run = sub.add_parser("run", help="train one method federated and report its metrics")
    add_common(run)
    run.add_argument("--method", help="method name (default fedslip; see `fedslip methods`)")
    run.add_argument("--resume", action="store_true", help="go on from the checkpoint in --out")
    run.add_argument("--rescore", action="store_true", help=RESCORE)
    run.add_argument("--seeds", help="comma-separated seeds: one run per seed in --out/seed-<s>/, mean ± std")
    cmp_ = sub.add_parser("compare", help="run several methods on the same split and compare them")
    add_common(cmp_)
    cmp_.add_argument("--methods", default="local,fedavg,dualtrack-naive,fedslip",
                      help="comma-separated method names, or 'all'")
    cmp_.add_argument("--resume", action="store_true", help="go on from the checkpoints in --out")
    cmp_.add_argument("--rescore", action="store_true", help=RESCORE)
    cmp_.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2: each seed its own split (the same for "
                      "every method) in --out/seed-<s>/; the top-level table and figure show mean ± std")
    sub.add_parser("methods", help="list the available methods")
    status = sub.add_parser("status", help="where a run stands (rounds, time left, latest accuracies), from its checkpoints")
    status.add_argument("run_dir", metavar="RUN_DIR", help="a run's --out folder (a comparison's, or a multi-seed one)")
    split = sub.add_parser("split", help="write each client's files of the split (for nodes that read only their own)")
    add_common(split)
    from fedslip.flower_cli import add_commands

    add_commands(sub, add_common)
    from fedslip.export.commands import add_commands as add_export_commands

    add_export_commands(sub)
    return parser


def _execute(args, methods: list[str], out: Path) -> int:
    from fedslip.evaluation.goal import goal_rows
    from fedslip.evaluation.outputs import with_goal
    from fedslip.evaluation.tables import to_markdown
    from fedslip.federation.checkpoint import write_plan

    if args.rescore and not args.resume:
        raise UserError("--rescore scores a finished run's checkpoint again: add --resume (and the run's --out)")
    cfg = config_from_args(args, methods[0])
    if cfg.method.strategy.strip().lower() != "method":
        _need_flower(cfg.method.strategy)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    folders = {s: out / f"seed-{s}" for s in seeds} if seeds else {cfg.train.seed: out}
    with exclusive(out):
        check_out(args, out, list(folders.values()))
        if args.rescore:
            _all_finished(list(folders.values()), methods)
        for folder in folders.values():
            kept_together(folder, methods)
        for folder in folders.values():  # what `fedslip status` lists as still to come
            write_plan(folder, methods)
        per_seed = _seeds(args, cfg, methods, folders, seeds)
        if seeds:
            _write_seed_summary(out, per_seed, methods)
    if not seeds:
        rows = per_seed[cfg.train.seed]
        print(with_goal(to_markdown(rows), goal_rows(rows)), end="")
    return 0


def _all_finished(folders: list[Path], methods: list[str]) -> None:
    """--rescore trains nothing: refuse (one line) where a method has not finished."""
    from fedslip.federation import checkpoint

    for folder in folders:
        metas = {m: checkpoint.read_meta(p) for m in methods if (p := checkpoint.path_for(folder, m)).exists()}
        unfinished = [m for m in methods if not metas.get(m, {}).get("finished")]
        if unfinished:
            raise UserError(f"--rescore: {', '.join(unfinished)} in {folder} has no finished checkpoint (--rescore "
                            "trains nothing): leave out --rescore to go on with it, or leave it out of --methods")
        on_nodes = [m for m, meta in metas.items() if not meta.get("has_clients")]
        if on_nodes:
            raise UserError(f"--rescore: {', '.join(on_nodes)} in {folder} ran on Flower (its clients' states are "
                            "on its nodes): only an in-process run can be scored again from its checkpoint")


def _seeds(args, cfg, methods: list[str], folders: dict[int, Path], seeds: list[int] | None) -> dict[int, list[dict]]:
    from rich.console import Console

    from fedslip.evaluation.tables import comparison_rows
    from fedslip.federation.protocol import warn_settings
    from fedslip.methods import method_for
    from fedslip.progress import for_terminal

    console = Console(stderr=True)
    warn_settings([method_for(replace(cfg, method=replace(cfg.method, name=name))) for name in methods])  # once
    per_seed = {}
    with for_terminal(args.quiet) as progress:
        for seed, folder in folders.items():
            if seeds:
                console.print(f"seed {seed} → {folder}/")
            seed_cfg = replace(cfg, train=replace(cfg.train, seed=seed))
            results = _compare(args, seed_cfg, methods, folder, console, progress)
            per_seed[seed] = comparison_rows(results)
    return per_seed


def _compare(args, cfg, methods: list[str], out: Path, console, progress):
    """Every method on one split (one seed): outputs in `out`, checkpoints in `out`/state."""
    from fedslip.evaluation.outputs import write_outputs
    from fedslip.federation import checkpoint
    from fedslip.federation.inprocess import Simulation, check_failures
    from fedslip.federation.protocol import check_strategies
    from fedslip.methods import method_for
    from fedslip.prepare import prepare

    if args.resume:  # an `auto` precision goes on as the checkpoint resolved it
        kept = checkpoint.kept_precision([checkpoint.path_for(out, m) for m in methods], cfg.train.precision)
        cfg = replace(cfg, train=replace(cfg.train, **kept))
    chosen = [method_for(replace(cfg, method=replace(cfg.method, name=name))) for name in methods]
    check_failures(chosen)  # before the data and the backbone load: one line, and nothing else
    check_strategies(chosen)
    prep = prepare(cfg)
    console.print(f"data: {prep.data.description}; backbone: {prep.backbone.name} ({prep.backbone.source}); "
                  f"{len(prep.split.train)} clients, training on {[len(s) for s in prep.split.train]} examples")
    console.print(f"device: {describe_placement(prep.backbone.placement.info)}")
    paths = resumable(out, prep, methods)
    runs = []
    for method in chosen:  # the outputs after each method: a long comparison shows what is done as it goes
        runs.append(Simulation(prep, method, progress).run(paths[method.name], args.resume, args.rescore))
        write_outputs(out, prep, runs)
        to_come = methods[len(runs):]
        console.print(f"wrote {out}/: results.json rounds.csv clients.csv ledger.csv comparison.md comparison.csv "
                      f"figure.png ({', '.join(r.method for r, _ in runs)}"
                      + (f"; to come: {', '.join(to_come)})" if to_come else ")"))
    return [r for r, _ in runs]


def parse_seeds(spec: str) -> list[int]:
    try:
        seeds = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--seeds {spec!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UserError(f"--seeds {spec!r}: expected distinct non-negative integers, e.g. 0,1,2")
    return seeds


def _write_seed_summary(out: Path, per_seed: dict[int, list[dict]], methods: list[str]) -> None:
    from fedslip.evaluation import seeds as summary
    from fedslip.evaluation.figures import save_figure
    from fedslip.evaluation.goal import goal_rows
    from fedslip.evaluation.outputs import staged, with_goal, without_answers, write_dicts

    rows = summary.summary_rows(per_seed)
    text = with_goal(summary.to_markdown(rows), goal_rows(rows, per_seed))
    with staged(out) as stage:
        (stage / "comparison.md").write_text(text, encoding="utf-8")
        summary.write_csv(rows, stage / "comparison.csv")
        write_dicts([{"seed": s, **without_answers(r)} for s, rs in per_seed.items() for r in rs], stage / "seeds.csv")
        save_figure(summary.build_figure(rows, f"{', '.join(methods)} · seeds {', '.join(map(str, per_seed))}"),
                    stage / "figure.png")
    print(text, end="")
    print(f"wrote {out}/: comparison.md comparison.csv seeds.csv figure.png (mean ± std over "
          f"{len(per_seed)} seeds; each seed in seed-<s>/)", file=sys.stderr)


def _split(args) -> int:
    from fedslip.data.client_files import write_client_files
    from fedslip.data.partition import make_split
    from fedslip.data.sources import load_data
    from fedslip.evaluation.outputs import staged

    cfg = config_from_args(args, None)
    out = out_dir(args, "runs/split")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out}: exists and is not empty; choose another")
    data = load_data(cfg.data)
    split = make_split(data, cfg.partition, cfg.train.seed)
    with staged(out) as stage:
        write_client_files(data, split, stage)
    names = ", ".join(f"'{n}'" if "'" not in n and "\n" not in n else toml_str(n) for n in data.label_names)
    print(f"wrote {out}/: client0..{len(split.train) - 1}/train.csv, test.csv, global_test.csv")
    overrides = f"data.label_names=[{names}]; data.text_columns=['text']; data.label_column='label'"
    print(f"run config: node-data = true, overrides = {toml_str(overrides)}")
    print(f"node k: --node-config 'partition-id=k num-partitions={len(split.train)} "
          f"train-file=\"{out.resolve()}/clientk/train.csv\" test-file=\"{out.resolve()}/clientk/test.csv\"' "
          f"(and global-test-file=\"{out.resolve()}/global_test.csv\" on the nodes that score the global test set)")
    return 0


def resumable(out: Path, prep, methods: list[str]) -> dict[str, Path]:
    """Each method's checkpoint path; one clear line when an existing checkpoint is another run's."""
    from fedslip.federation import checkpoint

    paths = {name: checkpoint.path_for(out, name) for name in methods}
    for name, path in paths.items():
        if path.exists():
            checkpoint.check(path, prep, name)
    return paths


def kept_together(out: Path, methods: list[str]) -> None:
    """One clear line when `out` holds the checkpoint of a method this run leaves out: the folder's tables,
    rewritten without it, would lose its results."""
    from fedslip.federation import checkpoint

    left_out = [p.stem for p in checkpoint.existing(out) if p.stem not in methods]
    if left_out:
        raise UserError(f"{out} also holds the checkpoint of {', '.join(left_out)}, which this run leaves out: "
                        f"list every method of the folder's run (--methods {','.join([*methods, *left_out])}), "
                        "or choose another --out")


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
        if hasattr(args, "export_handler"):
            return args.export_handler(args)
        if args.command == "methods":
            from fedslip.methods import METHODS

            for name, cls in METHODS.items():
                doc = cls.__doc__ or sys.modules[cls.__module__].__doc__ or ""
                print(f"{name:18s} {' '.join(doc.strip().split(chr(10) * 2)[0].split())}")  # its first paragraph
            return 0
        if args.command == "split":
            return _split(args)
        if args.command == "status":
            from fedslip.run_status import report

            print(report(Path(args.run_dir)))
            return 0
        if args.command == "run":
            # --method, else the config's method.name (a --config file may set it), else fedslip
            methods = method_list(args.method or config_from_args(args, None).method.name)
            if len(methods) > 1:
                raise UserError(f"--method {args.method}: run trains one method; fedslip compare --methods "
                                f"{','.join(methods)} trains several")
            return _execute(args, methods, out_dir(args, f"runs/{methods[0]}"))
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
