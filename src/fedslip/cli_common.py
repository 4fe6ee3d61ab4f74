"""What every `fedslip` subcommand shares: the one-line-error parser, the common options, config loading."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from fedslip.errors import UserError, warn


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

    from fedslip.methods import METHODS

    sets = list(args.sets)
    if args.data_dir:
        sets.append(f"data.data_dir={toml_str(args.data_dir)}")
    cfg = load_config(args.config, args.preset, method, sets)
    unknown = sorted(set(cfg.by_method) - set(METHODS))
    if unknown:
        raise UserError(f"by_method.{unknown[0]}: no method of that name (known: {', '.join(METHODS)})")
    return cfg


def toml_str(s: str) -> str:
    """`s` as a TOML basic string: backslashes, quotes and control characters escaped."""
    return '"' + "".join(ESCAPES.get(c, c if c >= " " and c != "\x7f" else f"\\u{ord(c):04x}") for c in s) + '"'


ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def method_list(spec: str) -> list[str]:
    from fedslip.methods import METHODS

    names = list(METHODS) if spec.strip() == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise UserError(f"unknown method {', '.join(unknown) or spec!r} (known: {', '.join(METHODS)})")
    twice = sorted({m for m in names if names.count(m) > 1})
    if twice:
        raise UserError(f"method {', '.join(twice)} listed more than once")
    return names


def out_dir(args, default: str) -> Path:
    if args.out is not None and not args.out.strip():
        raise UserError("--out: empty; give a folder")
    out = Path(args.out or default)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    return out


def check_out(args, out: Path, folders: list[Path] | None = None) -> None:
    """Refuse (one line) to overwrite an earlier run's checkpoint, or to resume without one (`folders`: where
    the run keeps checkpoints, default `out`; a multi-seed run has one folder per seed)."""
    from fedslip.federation import checkpoint

    folders = folders or [out]
    found = [p for folder in folders for p in checkpoint.existing(folder)]
    # a run of the other kind in the same folder: single-seed checkpoints in out/, multi-seed ones in seed-*/
    others = [p for folder in [out, *sorted(out.glob("seed-*"))] if folder not in folders
              for p in checkpoint.existing(folder)]
    if (found or others) and not args.resume:
        raise UserError(f"{out} holds the checkpoint of an earlier run ({', '.join(p.stem for p in found + others)}): "
                        "add --resume to go on with it, or choose another --out")
    if args.resume and not found:
        if others:
            kind = "a multi-seed run (seed-*/)" if others[0].parent.parent != out else "a single-seed run"
            raise UserError(f"--resume: {out} holds {kind}; resume it with the --seeds it was started with "
                            "(none for a single-seed run)")
        raise UserError(f"--resume: {out} holds no checkpoint yet; leave out --resume to start it")


LOCK = ".fedslip.lock"


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold `out` for this process: a second fedslip run into the same folder, started before the first
    wrote anything, would otherwise overwrite it unseen. The lock goes with the process (a killed run
    leaves none); where the system has no such locks (no fcntl, some network file systems) the run goes on
    without one, saying so. A folder this run created and locked that holds only its bookkeeping at the end
    (a run that stopped before its first checkpoint) is removed again."""
    created = False
    for attempt in range(3):  # the holder we waited for may have removed the folder, lock file and all, meanwhile
        created = created or not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
            handle = open(out / LOCK, "a+", encoding="utf-8")
        except OSError as e:
            raise UserError(f"--out {out}: cannot be written ({e.strerror or e})") from None
        try:
            owned = _lock(handle, out)
        except BaseException:
            handle.close()
            raise
        if not owned or _same_file(handle, out / LOCK):
            break
        handle.close()  # we locked a file that is no longer the folder's lock: take the one there now
        if attempt == 2:
            raise UserError(f"{out}: its lock file keeps being replaced by another run; try again")
    try:
        yield
    finally:
        if owned and created and _only_bookkeeping(out):
            shutil.rmtree(out, ignore_errors=True)
        handle.close()


def _same_file(handle, path: Path) -> bool:
    try:
        here, there = os.fstat(handle.fileno()), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _lock(handle, out: Path) -> bool:
    """Lock `handle` (the folder's lock file) and write our pid into it; False where locks are unavailable."""
    try:
        import fcntl
    except ImportError:
        warn(f"{out}: no file locks on this system; do not start a second run into it")
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        raise UserError(f"{out} is in use by another fedslip run (pid {holder}): wait for it to end, or "
                        "choose another --out") from None
    except OSError as e:
        warn(f"{out}: no lock on this file system ({e.strerror or e}); do not start a second run into it")
        return False
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return True


def _only_bookkeeping(out: Path) -> bool:
    """Whether `out` holds nothing but the lock and comparison plans (its own, its seed folders')."""
    from fedslip.federation.checkpoint import PLAN, STATE_DIR

    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    return all(f == LOCK or f.endswith(f"{STATE_DIR}/{PLAN}") for f in files)
