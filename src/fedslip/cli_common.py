"""What every `fedslip` subcommand shares: the one-line-error parser, the common options, config loading."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedslip.errors import UserError


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own default prints usage too)
        raise UserError(message)


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.toml", help="TOML file with [data] [partition] [model] [train] [method]")
    p.add_argument("--preset", choices=None, metavar="{quick,paper,reference}", help="start from a preset (default: paper)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set train.rounds=3 (repeatable)")
    p.add_argument("--data-dir", help="AG News folder with train.csv and test.csv (else $FEDSLIP_DATA_DIR, then the hub)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args, method: str | None):
    from fedslip.config import load_config

    sets = list(args.sets)
    if args.data_dir:
        sets.append(f"data.data_dir={toml_str(args.data_dir)}")
    return load_config(args.config, args.preset, method, sets)


def toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def method_list(spec: str) -> list[str]:
    from fedslip.methods import METHODS

    names = list(METHODS) if spec.strip() == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise UserError(f"unknown method {', '.join(unknown) or spec!r} (known: {', '.join(METHODS)})")
    return names


def out_dir(args, default: str) -> Path:
    out = Path(args.out or default)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    return out


def check_out(args, out: Path, folders: list[Path] | None = None) -> None:
    """Refuse (one line) to overwrite an earlier run's checkpoint, or to resume without one (`folders`: where
    the run keeps checkpoints, default `out`; a multi-seed run has one folder per seed)."""
    from fedslip.federation import checkpoint

    found = [p for folder in (folders or [out]) for p in checkpoint.existing(folder)]
    if found and not args.resume:
        raise UserError(f"{out} holds the checkpoint of an earlier run ({', '.join(p.stem for p in found)}): "
                        "add --resume to go on with it, or choose another --out")
    if args.resume and not found:
        raise UserError(f"--resume: {out} holds no checkpoint ({out}/{checkpoint.STATE_DIR}/ is missing); "
                        "leave out --resume to start it")
