"""The product's claim, checked on every comparison that can check it: a personalizing method's zero-shot
personalized accuracy (synced) at least FedAvg's after K-step fine-tuning, its global accuracy within half a
point of FedAvg's, its traffic no more than FedAvg's. Over several seeds the verdict is on the means, with how
many seeds met each part, so that a mean carried by one lucky seed shows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedslip.evaluation.tables import _md_table, percent

GLOBAL_SLACK = 0.005  # half a point of accuracy
EPS = 1e-9  # accuracies are ratios of counts: equal means equal, not "a rounding error below"
HEADING = ("Goal: personal (synced) ≥ fedavg's K-step, global ≥ fedavg's − 0.5 point, "
           "MiB/round ≤ fedavg's")

# the accuracies that are counts of client test examples (`comparison_rows`): (right, of how many)
CORRECT = {"personal_acc_mean": "personal_acc_correct", "kstep_acc_mean": "kstep_acc_correct"}
# the same, example by example ("0"/"1" per test example, per client): for the paired comparison
RIGHT = {"personal_acc_mean": "personal_acc_right", "kstep_acc_mean": "kstep_acc_right"}
RESAMPLES = 2000  # bootstrap resamples of the paired comparison
# (name, the candidate's key, fedavg's key, slack): met when candidate ≥ fedavg's − slack (bytes: ≤)
PARTS = [("personal vs K-step", "personal_acc_mean", "kstep_acc_mean", 0.0),
         ("global", "global_acc", "global_acc", GLOBAL_SLACK),
         ("MiB/round", "mib_per_round", "mib_per_round", 0.0)]


def _met(part: str, ours: float, theirs: float, slack: float) -> bool:
    if part == "MiB/round":
        return ours <= theirs + EPS
    return ours >= theirs - slack - EPS


def _candidates(rows: Sequence[Mapping]) -> list[Mapping]:
    from fedslip.methods import METHODS

    return [r for r in rows if r["method"] in METHODS and METHODS[r["method"]].personalizes
            and all(r.get(key) is not None for _, key, _, _ in PARTS)]


def _fmt(part: str, x: float, extra: int = 0) -> str:
    return f"{x:.{3 + extra}f}" if part == "MiB/round" else percent(x, 1 + extra)


def _pair(part: str, ours: float, theirs: float) -> tuple[str, str]:
    """Both values, with as many more decimals (up to 3) as it takes for unequal values to read unequal (values
    within EPS are equal: the same counts, summed in another order)."""
    extra = 0
    while extra < 3 and abs(ours - theirs) > EPS and _fmt(part, ours, extra) == _fmt(part, theirs, extra):
        extra += 1
    return _fmt(part, ours, extra), _fmt(part, theirs, extra)


def paired(ours: Sequence[str], theirs: Sequence[str]) -> dict | None:
    """Two views scored on the same clients' test examples: how many examples only ours got right (`won`),
    only theirs (`lost`), and the 95 % bootstrap interval of the difference in mean client accuracy
    (`low`, `high`), resampling each client's test examples. The models are held fixed: the interval is
    what the test sets' size leaves uncertain, not what another training seed would change. None when the
    two do not cover the same examples."""
    if not ours or len(ours) != len(theirs) or any(len(a) != len(b) or not a for a, b in zip(ours, theirs)):
        return None
    gen = np.random.default_rng(0)  # the same interval every time the same answers are compared
    diffs, won, lost = np.zeros(RESAMPLES), 0, 0
    for a, b in zip(ours, theirs):
        d = np.frombuffer(a.encode(), np.uint8).astype(int) - np.frombuffer(b.encode(), np.uint8)
        won, lost = won + int((d > 0).sum()), lost + int((d < 0).sum())
        for start in range(0, RESAMPLES, 250):  # bounded memory on large test sets
            n = min(250, RESAMPLES - start)
            diffs[start:start + n] += d[gen.integers(0, len(d), size=(n, len(d)))].mean(axis=1)
    low, high = np.quantile(diffs / len(ours), [0.025, 0.975])
    return {"won": won, "lost": lost, "low": float(low), "high": float(high)}


def _pooled(pairs: Sequence[tuple[Mapping, Mapping]], ours: str, theirs: str) -> dict | None:
    """`paired` over (candidate row, fedavg row) pairs, every client of every pair a stratum of its own (over
    seeds, their mean is the mean over seeds); None unless every row has the right answers."""
    if ours not in RIGHT or not all(a.get(RIGHT[ours]) and b.get(RIGHT[theirs]) for a, b in pairs):
        return None
    return paired([c for a, _ in pairs for c in a[RIGHT[ours]]], [c for _, b in pairs for c in b[RIGHT[theirs]]])


def goal_rows(rows: Sequence[Mapping], per_seed: Mapping[int, Sequence[Mapping]] | None = None) -> list[dict]:
    """Per candidate: each part's values, whether the mean meets it and (with `per_seed`) on how many seeds.
    Empty when `rows` lack fedavg with its K-step accuracy or a personalizing method with a global model."""
    fedavg = next((r for r in rows if r["method"] == "fedavg"), None)
    if fedavg is None or any(fedavg.get(theirs) is None for _, _, theirs, _ in PARTS):
        return []
    out = []
    for row in _candidates(rows):
        parts = []
        for part, ours, theirs, slack in PARTS:
            entry = {"part": part, "ours": row[ours], "fedavg": fedavg[theirs],
                     "met": _met(part, row[ours], fedavg[theirs], slack)}
            counts = row.get(CORRECT.get(ours, "")), fedavg.get(CORRECT.get(theirs, ""))
            if None not in counts and counts[0][1] == counts[1][1]:  # the same clients' test examples
                entry["net"], entry["examples"] = counts[0][0] - counts[1][0], counts[0][1]
            if not per_seed and (pair := _pooled([(row, fedavg)], ours, theirs)):
                entry["paired"] = pair
            if per_seed:
                pairs = [(next((r for r in rs if r["method"] == row["method"]), None),
                          next((r for r in rs if r["method"] == "fedavg"), None)) for rs in per_seed.values()]
                pairs = [(a, b) for a, b in pairs if a and b and a.get(ours) is not None and b.get(theirs) is not None]
                entry["seeds_met"] = sum(_met(part, a[ours], b[theirs], slack) for a, b in pairs)
                entry["seeds"] = len(pairs)
                if len(pairs) == len(per_seed) and (pair := _pooled(pairs, ours, theirs)):
                    entry["paired"] = pair
            parts.append(entry)
        out.append({"method": row["method"], "parts": parts, "met": all(p["met"] for p in parts)})
    return out


def to_markdown(goals: Sequence[dict]) -> str:
    """"" when there is nothing to check; else a heading line and one table row per candidate."""
    if not goals:
        return ""

    def cell(p: dict) -> str:
        ours, theirs = _pair(p["part"], p["ours"], p["fedavg"])
        text = f"{ours} vs {theirs}: {'met' if p['met'] else 'NOT met'}"
        q = p.get("paired")
        answers = (f"{q['won']} won, {q['lost']} lost; difference {100 * q['low']:+.1f} to {100 * q['high']:+.1f} "
                   "points, 95 % interval") if q else ""
        if "net" in p:  # how many test examples the difference is: one example may decide it
            text += f" (net {p['net']:+d} of {p['examples']:,} examples" + (f": {answers}" if q else "") + ")"
        if "seeds" in p:
            text += f" ({p['seeds_met']} of {p['seeds']} seeds" + (f"; pooled: {answers}" if q else "") + ")"
        return text

    seeds = "seeds" in goals[0]["parts"][0]
    header = ["Method"] + [p["part"] for p in goals[0]["parts"]] + ["all three" + (" (means)" if seeds else "")]
    body = [[g["method"]] + [cell(p) for p in g["parts"]] + ["met" if g["met"] else "NOT met"] for g in goals]
    table = HEADING + "\n\n" + _md_table(header, body, [":---"] + ["---:"] * (len(header) - 1))
    if any("paired" in p for g in goals for p in g["parts"]):
        table += "\n" + PAIRED_NOTE + "\n"
    return table


PAIRED_NOTE = ("won / lost: test examples only the method's personal view / only fedavg's K-step got right "
               "(pooled: over every seed's clients). The interval resamples each client's test examples with the "
               f"models fixed (bootstrap, {RESAMPLES:,} resamples): one that spans 0 means these test sets cannot "
               "tell the two apart. It does not include what another training seed would change.")
