"""The six-panel report figure of one or more finished runs.

Panels (2 x 3): training loss per round; global accuracy per round; personalized (synced) accuracy vs
cumulative MiB; per-client accuracy per round; per-client accuracy bars (every accuracy each method has, held-out
newcomers' included); mean MiB per round per method.

The figure is built with `matplotlib.figure.Figure` directly, not pyplot: nothing is registered globally,
no GUI backend is ever touched (PNG output always goes through the Agg renderer), and the caller's own
matplotlib backend is left alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, PercentFormatter

from fedslip.atomic import atomic_file
from fedslip.evaluation.records import MethodResult, RoundRecord

_LINESTYLES = ["-", "--", ":", "-."]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
_HATCH = {"personal": "", "persistent": "xx", "global": "//", "kstep": "..", "newcomer": "oo",
          "newcomer_global": "\\\\"}
_KIND_LABEL = {"personal": "personal, synced", "persistent": "personal, persistent", "global": "global model",
               "kstep": "K-step", "newcomer": "newcomer, after joining", "newcomer_global": "newcomer, global model"}
_MAX_PER_CLIENT_METHODS = 2  # panel 4: above this many methods or lines, only one method is drawn (`_headline`)
_MAX_PER_CLIENT_LINES = 16
_MAX_BAR_SERIES = 8  # panel 5: above this, methods with personalized bars lose their global-model bars
_LEGEND = dict(fontsize=8, framealpha=0.85)


def _colors(results: Sequence[MethodResult]) -> dict[str, str]:
    """One fixed color per method, shared by all panels."""
    return {r.method: f"C{i % 10}" for i, r in enumerate(results)}


def _mean(values: list[float] | None) -> float | None:
    return None if not values else float(np.mean(values))


def _round_personal(rec: RoundRecord) -> tuple[list[float] | None, bool]:
    """Per-client accuracy of a round: personalized if measured, else the global model's (flag True)."""
    if rec.personal_acc:
        return rec.personal_acc, False
    return rec.client_acc, True


def _uses_global_fallback(result: MethodResult) -> bool:
    evaluated = [r for r in result.rounds if r.evaluated]
    return bool(evaluated) and all(not r.personal_acc for r in evaluated)


def _pct_axis(ax: Axes, axis: str = "y") -> None:
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(PercentFormatter(xmax=1.0, decimals=None))


def _round_axis(ax: Axes) -> None:
    """Integer round ticks; call after plotting. A one-round run gets a +-1 window, not fractional ticks."""
    lo, hi = ax.get_xlim()
    if hi - lo < 2:
        mid = round((lo + hi) / 2)
        ax.set_xlim(mid - 1, mid + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Round")


def _no_data(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _marker(n_points: int) -> str | None:
    return "o" if n_points <= 25 else None


def _panel_loss(ax: Axes, results: Sequence[MethodResult], colors: dict[str, str]) -> None:
    for r in results:
        xs = [rec.round for rec in r.rounds if rec.train_loss is not None and math.isfinite(rec.train_loss)]
        ys = [rec.train_loss for rec in r.rounds if rec.train_loss is not None and math.isfinite(rec.train_loss)]
        if xs:
            ax.plot(xs, ys, color=colors[r.method], marker=_marker(len(xs)), ms=4, label=r.method)
    ax.set_title("Training loss per round")
    _round_axis(ax)
    ax.set_ylabel("Mean training loss (cross-entropy)")
    if ax.lines:
        ax.legend(**_LEGEND)
    else:
        _no_data(ax, "no training loss recorded")


def _panel_global(ax: Axes, results: Sequence[MethodResult], colors: dict[str, str]) -> None:
    for r in results:
        pts = [(rec.round, rec.global_acc) for rec in r.rounds if rec.evaluated and rec.global_acc is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, color=colors[r.method], marker=_marker(len(xs)), ms=4, label=r.method)
    ax.set_title("Global accuracy (balanced test set, global model)")
    _round_axis(ax)
    ax.set_ylabel("Accuracy")
    _pct_axis(ax)
    if ax.lines:
        ax.legend(**_LEGEND)
    else:
        _no_data(ax, "no method has a global model")


def _panel_acc_vs_mib(ax: Axes, results: Sequence[MethodResult], colors: dict[str, str]) -> None:
    """Methods that never communicate have no curve: their final accuracy is one labelled marker at x=0."""
    for r in results:
        pts = []
        for rec in r.rounds:
            accs, _ = _round_personal(rec) if rec.evaluated else (None, False)
            if accs:
                pts.append((rec.mib_cumulative, _mean(accs)))
        if not pts:
            continue
        label = r.method + (" (global model)" if _uses_global_fallback(r) else "")
        if max(x for x, _ in pts) <= 0:
            y = pts[-1][1]
            ax.plot([0.0], [y], color=colors[r.method], marker="*", ms=13, ls="none", label=f"{label}: 0 MiB")
            ax.annotate(f"{r.method} (0 MiB)", (0.0, y), xytext=(8, -4), textcoords="offset points", fontsize=8,
                        color=colors[r.method])
        else:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, color=colors[r.method], marker=_marker(len(xs)), ms=4, label=label)
    ax.set_title("Mean per-client accuracy vs communication")
    ax.set_xlabel("Cumulative communication (MiB, up + down)")
    ax.set_ylabel("Mean personal accuracy, synced")
    _pct_axis(ax)
    if not ax.lines:
        _no_data(ax, "no per-client accuracy recorded")
        return
    ax.legend(**_LEGEND)
    positive = [x for line in ax.lines for x in line.get_xdata() if x > 0]
    if positive and max(positive) / min(positive) > 50:
        # Sparse and dense uploads differ by orders of magnitude: symlog keeps x=0 while the log part
        # keeps the cheap method's curve from collapsing onto the y axis.
        ax.set_xscale("symlog", linthresh=min(positive), linscale=0.5)
        ax.set_xlim(-0.3 * min(positive), max(positive) * 2)
        ax.set_xlabel("Cumulative communication (MiB, up + down; symlog scale)")
    else:
        right = ax.get_xlim()[1] if ax.get_xlim()[1] > 0 else 1.0
        ax.set_xlim(-0.03 * right, right)  # x=0 markers sit just inside the frame


def _client_series(result: MethodResult) -> dict[int, list[tuple[int, float]]]:
    """client index -> [(round, accuracy)] over evaluated rounds (client ids are list positions in a round)."""
    series: dict[int, list[tuple[int, float]]] = {}
    for rec in result.rounds:
        accs, _ = _round_personal(rec) if rec.evaluated else (None, False)
        for i, acc in enumerate(accs or []):
            if acc is not None:
                series.setdefault(i, []).append((rec.round, acc))
    return series


def _client_ids(result: MethodResult) -> list[int]:
    return [c.client for c in result.clients]


def _headline(with_data: list[tuple[MethodResult, dict]]) -> tuple[MethodResult, dict]:
    """The method whose per-round curves say the most: the most evaluated rounds, the last listed among equals
    (a one-round method such as local, listed last, would draw single points)."""
    rounds = [max(len(pts) for pts in series.values()) for _, series in with_data]
    most = max(rounds)
    return with_data[max(i for i, n in enumerate(rounds) if n == most)]


def _panel_per_client(ax: Axes, results: Sequence[MethodResult], colors: dict[str, str]) -> None:
    with_data = [(r, _client_series(r)) for r in results]
    with_data = [(r, s) for r, s in with_data if s]
    if not with_data:
        _no_data(ax, "no per-client accuracy recorded")
        ax.set_title("Per-client accuracy per round")
        return
    n_lines = sum(len(s) for _, s in with_data)
    fits = len(with_data) <= _MAX_PER_CLIENT_METHODS and n_lines <= _MAX_PER_CLIENT_LINES
    shown = with_data if fits else [_headline(with_data)]
    single = len(shown) == 1
    client_style: dict[int, tuple[str, str]] = {}  # client id -> (line style, marker), shared by methods
    for r, series in shown:
        ids = _client_ids(r)
        for i, pts in sorted(series.items()):
            xs, ys = zip(*pts)
            cid = ids[i] if i < len(ids) else i
            style = client_style.setdefault(cid, (_LINESTYLES[i % len(_LINESTYLES)], _MARKERS[i % len(_MARKERS)]))
            ax.plot(xs, ys, color=f"C{i % 10}" if single else colors[r.method], ls=style[0], marker=style[1], ms=4)
    kind = "global model" if all(_uses_global_fallback(r) for r, _ in shown) else "personal, synced"
    if single and len(results) > 1:
        ax.set_title(f"Per-client accuracy per round: {shown[0][0].method} only ({kind})")
    else:
        ax.set_title(f"Per-client accuracy per round ({kind})")
    _round_axis(ax)
    ax.set_ylabel("Accuracy on the client's test set")
    _pct_axis(ax)
    # Compact legend: with one method, one entry per client (its color); with several, methods by color
    # and clients by line style, so entries grow as methods + clients, not methods x clients.
    if single:
        handles = [Line2D([], [], color=f"C{i % 10}", ls=ls, marker=mk, ms=4, label=f"client {cid}")
                   for i, (cid, (ls, mk)) in enumerate(client_style.items())]
    else:
        handles = [Line2D([], [], color=colors[r.method], lw=2, label=r.method) for r, _ in shown]
        handles += [Line2D([], [], color="0.3", ls=ls, marker=mk, ms=4, label=f"client {cid}")
                    for cid, (ls, mk) in client_style.items()]
    ncol = min(4, len(handles))
    _legend_on_top(ax, handles, ncol)


def _legend_on_top(ax: Axes, handles: list, ncol: int) -> None:
    """Legend in a band added above the data, so it never covers a line or a bar."""
    rows = math.ceil(len(handles) / ncol)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + (hi - lo) * (0.08 + 0.09 * rows))
    ax.legend(handles=handles, loc="upper center", ncol=ncol, **{**_LEGEND, "fontsize": 7})


def _bar_series(results: Sequence[MethodResult]) -> list[tuple[str, str, dict[int, float]]]:
    """(method, kind, {client id: accuracy}) for every accuracy a method has on its clients.

    A global-model series identical to the method's personalized one (e.g. fedavg, where the personal
    model is the global one), or a persistent one identical to the synced one (local), is dropped.
    """
    out = []
    for r in results:
        got = {}
        for kind, attr in (("personal", "personal_acc"), ("persistent", "persistent_acc"), ("global", "client_acc"),
                           ("kstep", "kstep_acc"), ("newcomer", "newcomer_acc"),
                           ("newcomer_global", "newcomer_global_acc")):
            vals = {c.client: getattr(c, attr) for c in r.clients if getattr(c, attr) is not None}
            if vals:
                got[kind] = vals
        for twin in ("global", "persistent"):
            if "personal" in got and got.get(twin) == got["personal"]:
                del got[twin]
        if "newcomer" in got and got.get("newcomer_global") == got["newcomer"]:  # joined as the global model
            del got["newcomer_global"]
        out += [(r.method, kind, vals) for kind, vals in got.items()]
    if len(out) > _MAX_BAR_SERIES:
        has_personal = {m for m, k, _ in out if k == "personal"}
        out = [s for s in out if not (s[1] in ("global", "persistent") and s[0] in has_personal)]
    return out


def _panel_client_bars(ax: Axes, results: Sequence[MethodResult], colors: dict[str, str]) -> None:
    series = _bar_series(results)
    ax.set_title("Final accuracy per client")
    if not series:
        _no_data(ax, "no per-client accuracy recorded")
        return
    dominant: dict[int, int | None] = {}
    for r in results:
        for c in r.clients:
            dominant.setdefault(c.client, c.dominant_label)
    clients = sorted({cid for _, _, vals in series for cid in vals})
    x = np.arange(len(clients))
    width = 0.85 / len(series)
    for j, (method, kind, vals) in enumerate(series):
        xs = [x[k] + (j - (len(series) - 1) / 2) * width for k, cid in enumerate(clients) if cid in vals]
        ys = [vals[cid] for cid in clients if cid in vals]
        ax.bar(xs, ys, width=width, color=colors[method], hatch=_HATCH[kind], edgecolor="white", linewidth=0.5,
               label=f"{method} ({_KIND_LABEL[kind]})")
    newcomers = {c.client for r in results for c in r.clients if c.held_out}
    ticks = [f"{'newcomer' if c in newcomers else 'client'} {c}"
             + (f"\n(label {dominant[c]})" if dominant.get(c) is not None else "") for c in clients]
    ax.set_xticks(x, ticks, fontsize=8)
    ax.set_xlabel("Client (dominant training label)")
    ax.set_ylabel("Accuracy on the client's test set")
    _pct_axis(ax)
    ax.set_ylim(0, 1.0)
    ax.set_yticks(np.linspace(0.0, 1.0, 6))  # no tick labels above 100% in the legend band
    handles = [Patch(facecolor=colors[m], hatch=_HATCH[k], edgecolor="white", label=f"{m} ({_KIND_LABEL[k]})")
               for m, k, _ in series]
    _legend_on_top(ax, handles, min(3, len(series)))


def _mib_per_round(r: MethodResult) -> float:
    v = r.final.get("mib_per_round")
    if v is not None:
        return float(v)
    return float(np.mean([rec.mib_round for rec in r.rounds])) if r.rounds else 0.0


def _panel_mib(ax: Axes, results: Sequence[MethodResult], colors: dict[str, str]) -> None:
    """Bars of mean MiB per round; log scale when methods differ by orders of magnitude (sparse uploads)."""
    names = [r.method for r in results]
    vals = [_mib_per_round(r) for r in results]
    x = np.arange(len(names))
    ax.bar(x, vals, color=[colors[n] for n in names], width=0.6)
    positive = [v for v in vals if v > 0]
    log = len(positive) >= 2 and max(positive) / min(positive) > 50
    if log:
        ax.set_yscale("log")
        ax.set_ylim(min(positive) / 3, max(positive) * 5)
    else:
        ax.set_ylim(0, (max(vals) if max(vals) > 0 else 1.0) * 1.18)
    for xi, v in zip(x, vals):
        text = "0 (no comm.)" if v == 0 else f"{v:.3g}"
        y = ax.get_ylim()[0] if (v == 0 and log) else v
        ax.annotate(text, (xi, y), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8)
    pad = max(0.0, (3 - len(names)) / 2)  # keep one or two bars from filling the whole panel
    ax.set_xlim(-0.5 - pad, len(names) - 0.5 + pad)
    ax.set_xticks(x, names, fontsize=8, rotation=20 if len(names) > 4 else 0)
    ax.set_title("Communication per round (mean, all participants)")
    ax.set_xlabel("Method")
    ax.set_ylabel("MiB per round (up + down)" + (", log scale" if log else ""))


def build_figure(results: Sequence[MethodResult], title: str | None = None) -> Figure:
    """The 2 x 3 report figure. The last result is taken as the headline method where space is short."""
    if not results:
        raise ValueError("no results to plot")
    colors = _colors(results)
    fig = Figure(figsize=(18, 10), dpi=110)
    axes = fig.subplots(2, 3).ravel()
    _panel_loss(axes[0], results, colors)
    _panel_global(axes[1], results, colors)
    _panel_acc_vs_mib(axes[2], results, colors)
    _panel_per_client(axes[3], results, colors)
    _panel_client_bars(axes[4], results, colors)
    _panel_mib(axes[5], results, colors)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_axisbelow(True)
    if title:
        fig.suptitle(title, fontsize=14)
    fig.tight_layout()
    return fig


def plot_results(results: Sequence[MethodResult], path: Path, title: str | None = None) -> None:
    """Write the report figure as one PNG."""
    save_figure(build_figure(results, title), path)


def save_figure(fig: Figure, path: Path) -> None:
    """Write `fig` as a PNG atomically (temp file in the same folder, then rename)."""
    with atomic_file(path, binary=True) as f:
        fig.savefig(f, format="png")
