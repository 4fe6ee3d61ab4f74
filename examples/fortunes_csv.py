"""A second, harder text dataset for presets and methods: Debian's `fortunes` corpus, 10 categories.

    python examples/fortunes_csv.py --out data/fortunes.csv [--per-class 400] [--seed 0]

Each fortune is labelled by the file it comes from (people, politics, science, ...): 10 classes, chance is
10 %, and the classes overlap (a quip about a politician may sit in "people"). The package is fetched with
`apt-get download fortunes` (Debian's registry) unless `--from DIR` points at an unpacked
usr/share/games/fortunes folder. Writes a CSV with columns label,text (whitespace collapsed).
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

CATEGORIES = ["art", "computers", "definitions", "men-women", "people", "politics", "science", "songs-poems",
              "work", "zippy"]


def fetch(into: Path) -> Path:
    subprocess.run(["apt-get", "download", "fortunes"], cwd=into, check=True, capture_output=True)
    deb = next(into.glob("fortunes_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(into / "x")], check=True)
    return into / "x" / "usr" / "share" / "games" / "fortunes"


def read_fortunes(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    items = [re.sub(r"\s+", " ", part).strip() for part in text.split("\n%\n")]
    return [t for t in items if len(t) >= 20]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-class", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--from", dest="folder", help="an unpacked usr/share/games/fortunes folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder) if args.folder else fetch(Path(tmp))
        rng = random.Random(args.seed)
        rows = []
        for label in CATEGORIES:
            items = sorted(set(read_fortunes(folder / label)))
            if len(items) < args.per_class:
                print(f"{label}: only {len(items)} fortunes, fewer than --per-class {args.per_class}", file=sys.stderr)
                return 2
            rows += [(label, t) for t in rng.sample(items, args.per_class)]
    rng.shuffle(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        w.writerows(rows)
    print(f"wrote {out}: {len(rows)} rows, {len(CATEGORIES)} classes × {args.per_class}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
