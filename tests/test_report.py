"""Report tables and figure built from synthetic run results (no model, no training)."""

from __future__ import annotations

import csv

import pytest

from fedslip.evaluation.figures import build_figure, plot_results
from fedslip.evaluation.records import ClientRecord, MethodResult, RoundRecord
from fedslip.evaluation.tables import COLUMNS, OPTIONAL, ZERO_HIDDEN, comparison_rows, final_table_markdown, to_csv, to_markdown

N_CLIENTS = 4
N_ROUNDS = 4
ACC_KEYS = {"global_acc", "client_acc_mean", "personal_acc_mean", "personal_acc_weighted", "personal_acc_worst",
            "persistent_acc_mean", "kstep_acc_mean"}


def _accs(base: float, r: int) -> list[float]:
    return [min(1.0, base + 0.05 * r + 0.03 * c) for c in range(N_CLIENTS)]


def _method(name: str, *, mib: float, global_model: bool, personal: bool, kstep: bool, base: float) -> MethodResult:
    rounds, cum = [], 0.0
    for r in range(1, N_ROUNDS + 1):
        cum += mib
        evaluated = r % 2 == 0
        rounds.append(RoundRecord(
            round=r, train_loss=2.0 / r + base, mib_round=mib, mib_cumulative=cum, evaluated=evaluated,
            global_acc=(base + 0.04 * r) if evaluated and global_model else None,
            client_acc=_accs(base, r) if evaluated and global_model else None,
            personal_acc=_accs(base + 0.1, r) if evaluated and personal else None,
        ))
    clients = [ClientRecord(client=c, n_train=100 + 10 * c, n_test=20, dominant_label=c % 2,
                            client_acc=(base + 0.03 * c) if global_model else None,
                            personal_acc=(base + 0.1 + 0.03 * c) if personal else None,
                            kstep_acc=(base + 0.07 + 0.02 * c) if kstep else None)
               for c in range(N_CLIENTS)]
    final = {
        "global_acc": base + 0.16 if global_model else None,
        "client_acc_mean": base + 0.045 if global_model else None,
        "personal_acc_mean": base + 0.145 if personal else None,
        "personal_acc_weighted": base + 0.15 if personal else None,
        "personal_acc_worst": base + 0.1 if personal else None,
        "kstep_acc_mean": base + 0.1 if kstep else None,
        "train_loss": 0.5 + base,
        "mib_per_round": mib,
        "mib_total": mib * N_ROUNDS,
        "up_params": 12345.0 if mib else 0.0,
        "eval_mib_per_round": mib / 4,
        "failed_uploads": 2 if name == "fedslip" else 0,
        "rejected_uploads": 0,
    }
    return MethodResult(method=name, rounds=rounds, clients=clients, final=final, wall_time_s=12.34 + base)


def _local() -> MethodResult:
    """Local-only training: one round, no global model, no communication."""
    rounds = [RoundRecord(round=1, train_loss=0.9, mib_round=0.0, mib_cumulative=0.0, evaluated=True,
                          personal_acc=[0.5, 0.55, 0.6, 0.65])]
    clients = [ClientRecord(client=c, n_train=100, n_test=20, dominant_label=c % 2, client_acc=None,
                            personal_acc=0.5 + 0.05 * c) for c in range(N_CLIENTS)]
    final = {"global_acc": None, "client_acc_mean": None, "personal_acc_mean": 0.575,
             "persistent_acc_mean": 0.575, "personal_acc_weighted": 0.57, "personal_acc_worst": 0.5, "kstep_acc_mean": None,
             "train_loss": 0.9, "mib_per_round": 0.0, "mib_total": 0.0, "up_params": 0.0,
             "eval_mib_per_round": 0.0, "failed_uploads": 0, "rejected_uploads": 0}
    return MethodResult(method="local", rounds=rounds, clients=clients, final=final, wall_time_s=3.0)


@pytest.fixture(scope="module")
def results() -> list[MethodResult]:
    return [
        _local(),
        _method("fedavg", mib=3.2, global_model=True, personal=False, kstep=True, base=0.3),
        _method("dualtrack-naive", mib=3.2, global_model=True, personal=True, kstep=False, base=0.35),
        _method("fedslip", mib=0.0123, global_model=True, personal=True, kstep=False, base=0.4),
    ]


def _md_cells(md: str) -> list[list[str]]:
    lines = md.strip().splitlines()
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[2:]]


def test_markdown_has_one_row_per_method_with_formatted_numbers(results):
    rows = comparison_rows(results)
    md = to_markdown(rows)
    body = _md_cells(md)
    assert [r[0] for r in body] == [r.method for r in results]
    header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    for res, cells in zip(results, body):
        by_col = dict(zip(header, cells))
        for key, title, _ in COLUMNS:
            if key in OPTIONAL and not any(key in r.final for r in results):
                assert title not in header, key  # measured by no run: no column
                continue
            if key in ZERO_HIDDEN and not any(r.final.get(key) for r in results):
                assert title not in header, key  # nothing failed or was rejected: no column
                continue
            value = res.wall_time_s if key == "wall_time_s" else res.final.get(key)
            if value is None:
                expected = "—"
            elif key in ACC_KEYS:
                expected = f"{100 * value:.1f}"
            elif "mib" in key:
                expected = f"{value:.3f}"
            elif key in ("up_params", "failed_uploads", "rejected_uploads"):
                expected = f"{int(value):,}"
            else:
                expected = f"{value:.1f}"
            assert by_col[title] == expected, (res.method, key)


def test_flower_wire_column_appears_when_a_run_measured_it(results):
    results[1].final["wire_mib_per_round"] = 1.25
    try:
        test_markdown_has_one_row_per_method_with_formatted_numbers(results)
        body = _md_cells(to_markdown(comparison_rows(results)))
        header = [c.strip() for c in to_markdown(comparison_rows(results)).splitlines()[0].strip("|").split("|")]
        col = header.index("Flower MiB/round")
        assert body[1][col] == "1.250" and body[0][col] == "—"
    finally:
        del results[1].final["wire_mib_per_round"]


def test_none_shows_as_dash(results):
    body = _md_cells(to_markdown(comparison_rows(results)))
    local = body[0]
    assert local.count("—") == 3  # global acc, client acc, K-step acc
    assert "—" not in body[1][1:3]  # fedavg has a global model


def test_csv_round_trips_numbers(results, tmp_path):
    rows = comparison_rows(results)
    path = tmp_path / "out" / "comparison.csv"
    to_csv(rows, path)
    with path.open(newline="", encoding="utf-8") as f:
        back = list(csv.DictReader(f))
    assert [b["method"] for b in back] == [r["method"] for r in rows]
    for row, got in zip(rows, back):
        for key, _, _ in COLUMNS:
            if row[key] is None:
                assert got[key] == ""
            else:
                assert float(got[key]) == row[key]
    assert not [p for p in path.parent.iterdir() if p.name != "comparison.csv"]  # no temp file left


def test_final_table_for_one_method(results):
    fedslip = results[-1]
    md = final_table_markdown(fedslip)
    cells = dict((r[0], r[1]) for r in _md_cells(md))
    assert cells["Personalized accuracy, synced, mean (%)"] == f"{100 * fedslip.final['personal_acc_mean']:.1f}"
    assert cells["K-step accuracy, mean (%)"] == "—"
    assert cells["MiB total"] == f"{fedslip.final['mib_total']:.3f}"


def _has_data(ax) -> bool:
    return bool(ax.lines or ax.patches or ax.collections)


def test_figure_has_six_panels_with_data(results):
    fig = build_figure(results, title="synthetic")
    axes = fig.get_axes()
    assert len(axes) == 6
    assert all(_has_data(ax) for ax in axes)
    # per-client panel: 4 methods x 4 clients is too many lines, so only the headline method is drawn
    assert len(axes[3].lines) == N_CLIENTS and "fedslip only" in axes[3].get_title()


def test_per_client_panel_passes_over_a_one_round_method_listed_last(results):
    panel = build_figure([*results[1:], results[0]]).get_axes()[3]  # local (one round) last
    assert "fedslip only" in panel.get_title()
    assert all(len(line.get_xdata()) == N_ROUNDS // 2 for line in panel.lines)  # fedslip's evaluated rounds


def test_figure_shows_held_out_newcomers_in_the_client_bars(results):
    import dataclasses

    joined = dataclasses.replace(results[-1], clients=results[-1].clients + [
        ClientRecord(client=N_CLIENTS, n_train=100, n_test=20, dominant_label=1, client_acc=None, personal_acc=None,
                     held_out=True,
                     newcomer_acc=0.93, newcomer_global_acc=0.81)])
    bars = build_figure([results[1], joined]).get_axes()[4]
    labels = [t.get_text() for t in bars.get_legend().get_texts()]
    assert "fedslip (newcomer, after joining)" in labels and "fedslip (newcomer, global model)" in labels
    heights = sorted(round(p.get_height(), 2) for p in bars.patches if p.get_height() in (0.93, 0.81))
    assert heights == [0.81, 0.93]
    assert any(t.get_text().startswith(f"newcomer {N_CLIENTS}") for t in bars.get_xticklabels())


def test_figure_single_method(results):
    fig = build_figure(results[-1:])
    assert all(_has_data(ax) for ax in fig.get_axes())


def test_plot_results_writes_png(results, tmp_path):
    path = tmp_path / "report.png"
    plot_results(results, path, title="synthetic")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]


def test_empty_results_rejected(tmp_path):
    with pytest.raises(ValueError, match="no results to plot"):
        plot_results([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_a_metric_measured_in_some_seeds_only_says_over_how_many():
    from fedslip.evaluation.seeds import summary_rows, to_markdown as seeds_markdown

    per_seed = {0: [{"method": "fedavg", "global_acc": 0.8, "kstep_acc_mean": 0.9}],
                1: [{"method": "fedavg", "global_acc": 0.9, "kstep_acc_mean": None}],
                2: [{"method": "fedavg", "global_acc": 0.7, "kstep_acc_mean": 0.8}]}
    (row,) = summary_rows(per_seed)
    assert row["n_seeds"] == 3 and row["kstep_acc_mean_n"] == 2 and "global_acc_n" not in row
    text = seeds_markdown([row])
    assert "| 85.0 ± 7.1 (2 of 3 seeds) |" in text and "| 80.0 ± 10.0 |" in text


def test_percentages_round_halves_up_as_the_counts_are():
    from fractions import Fraction

    from fedslip.evaluation.tables import percent

    for right, total in ((1861, 2000), (1863, 2000), (1761, 2000), (1803, 2000), (1, 8), (1389, 1600)):
        exact = Fraction(right, total) * 100  # the accuracy in %, exactly
        tenths = (exact * 10 + Fraction(1, 2)).__floor__()  # half up, in exact arithmetic
        assert percent(right / total) == f"{tenths // 10}.{tenths % 10}", (right, total)
    assert percent(0.9305) == "93.1" and percent(0.9315) == "93.2" and percent(0.9305, 2) == "93.05"
    assert percent(0.0) == "0.0" and percent(1.0) == "100.0"
