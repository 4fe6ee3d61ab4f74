"""Files written whole or not at all: to a temporary name in the same folder, then renamed.

A temporary file is created private (0600); before the rename it gets the mode a plain `open()` would have
given it (0666 less the umask), so outputs stay readable like every other file the run writes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

from fedslip.errors import UserError


def usual_mode(path: Path | str, folder: bool = False) -> None:
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


def umask() -> int:
    """The process's umask, read from /proc where it is there: setting it to read it back would, for that
    instant, apply another mask to files other threads create."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def parent_folder(path: Path) -> None:
    """Create `path`'s folder; one clear line when it cannot be (a file in the way, no permission)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path}: its folder cannot be created ({e.strerror or e})") from None


def replace_durably(tmp: Path | str, path: Path | str) -> None:
    """`os.replace(tmp, path)` with the data on disk first and the rename itself made durable: without the
    two fsyncs a power cut can leave `path` empty on some file systems, the previous version already gone."""
    if Path(tmp).is_dir():  # a staged folder: its files, then its entries
        for f in Path(tmp).iterdir():
            if f.is_file():
                _sync(f)
        sync_folder(tmp)
    else:
        _sync(tmp)
    os.replace(tmp, path)
    sync_folder(Path(path).parent)


def _sync(path: Path | str) -> None:
    """fsync a file through a read-only descriptor (a file without write permission syncs too); file systems
    that cannot fsync are left to their own guarantees."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sync_folder(folder: Path | str) -> None:
    """fsync a folder (its entries: a rename into it); a no-op where folders cannot be opened (Windows)."""
    try:
        _sync(folder)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_file(path: Path | str, binary: bool = False, **open_args) -> Iterator[IO]:
    """An open file that appears at `path`, complete, only when the block ends without an exception."""
    path = Path(path)
    parent_folder(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **open_args) as f:
            yield f
        usual_mode(tmp)
        replace_durably(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
