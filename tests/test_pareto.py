"""The front, the hypervolume, trials.parquet and pareto.png: properties on hand-made trials."""

from __future__ import annotations

import copy
import json
import math
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from search.pareto import (
    DEFAULT_REF,
    FINETUNED_COLUMNS,
    REQUIRED_COLUMNS,
    TRIAL_COLUMNS,
    describe_hypervolume,
    format_front,
    format_report,
    front_rows,
    hypervolume,
    mark_pareto,
    pareto_mask,
    plot_front,
    read_trials,
    write_trials,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(acc, flops): a is at least as accurate and at most as costly, strictly better in one."""
    return a[0] >= b[0] and a[1] <= b[1] and a != b


def trial(tid: str, acc: float | None, flops: int | None, status: str = "COMPLETED", **extra) -> dict:
    row = {"trial_id": tid, "status": status, "criterion": "l1", "val_acc": acc, "flops": flops}
    return {**row, **extra}


# ---- pareto_mask -------------------------------------------------------------------------------


def test_pareto_mask_hand_made():
    acc = [0.90, 0.80, 0.95, 0.70, 0.85]
    flops = [100, 50, 200, 60, 100]
    # (0.70, 60) is dominated by (0.80, 50); (0.85, 100) by (0.90, 100): equal cost, less accurate.
    assert pareto_mask(acc, flops) == [True, True, True, False, False]


def test_pareto_mask_duplicates_keep_first_occurrence():
    assert pareto_mask([0.9, 0.9, 0.8, 0.9], [10, 10, 5, 10]) == [True, False, True, False]
    assert pareto_mask([0.5, 0.5], [1, 1]) == [True, False]


def test_pareto_mask_ties_in_one_objective():
    # Same accuracy: only the cheapest; same cost: only the most accurate.
    assert pareto_mask([0.8, 0.8, 0.8], [30, 10, 20]) == [False, True, False]
    assert pareto_mask([0.7, 0.9, 0.8], [10, 10, 10]) == [False, True, False]


def test_pareto_mask_edge_cases_and_errors():
    assert pareto_mask([], []) == []
    assert pareto_mask([0.1], [1e9]) == [True]
    with pytest.raises(ValueError, match="same length"):
        pareto_mask([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="NaN"):
        pareto_mask([0.1, math.nan], [1, 2])


points_2d = st.lists(
    st.tuples(st.integers(0, 6), st.integers(0, 6)) | st.tuples(st.floats(0, 1), st.floats(1, 1e9)),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(points_2d)
def test_pareto_mask_properties(points):
    mask = pareto_mask([a for a, _ in points], [f for _, f in points])
    front = [p for p, on in zip(points, mask, strict=True) if on]
    # No front point is dominated by any point, and the front has no repeats.
    assert not any(dominates(q, p) for p in front for q in points)
    assert len(set(front)) == len(front)
    # Every other point is dominated by a front point, or is a later copy of one.
    for p, on in zip(points, mask, strict=True):
        if not on:
            assert any(dominates(f, p) or f == p for f in front)
    assert bool(points) == bool(front)


@settings(max_examples=200, deadline=None)
@given(points_2d, st.integers(0, 39), st.floats(0.001, 0.5), st.floats(0, 10))
def test_a_dominated_point_is_never_on_the_front_and_moves_nothing(points, k, d_acc, d_cost):
    if not points:
        return
    acc, cost = points[k % len(points)]
    worse = (acc - d_acc, cost + d_cost)  # strictly less accurate, at least as costly
    mask = pareto_mask([a for a, _ in points], [f for _, f in points])
    for at in (0, len(points)):  # first or last: its position does not matter either
        grown = [*points[:at], worse, *points[at:]]
        grown_mask = pareto_mask([a for a, _ in grown], [f for _, f in grown])
        assert grown_mask[at] is False
        assert grown_mask[:at] + grown_mask[at + 1 :] == mask


# ---- hypervolume -------------------------------------------------------------------------------


def test_hypervolume_single_point_is_a_rectangle():
    assert hypervolume([(0.8, 0.4)], (0.0, 1.0)) == pytest.approx(0.8 * 0.6)
    assert hypervolume([(0.8, 0.4)], (0.5, 0.9)) == pytest.approx(0.3 * 0.5)


def test_hypervolume_two_points_is_an_l_shape():
    # Rectangles 0.9 x 0.5 and 0.6 x 0.8 overlap in 0.6 x 0.5.
    expected = 0.9 * 0.5 + 0.6 * 0.8 - 0.6 * 0.5
    assert hypervolume([(0.9, 0.5), (0.6, 0.2)], (0.0, 1.0)) == pytest.approx(expected)


def test_hypervolume_points_not_beating_ref_add_nothing():
    base = hypervolume([(0.8, 0.4)], DEFAULT_REF)
    worse = [(0.8, 1.2), (0.8, 1.0), (-0.1, 0.1), (0.0, 0.1)]  # costlier than ref or not more accurate
    assert hypervolume([(0.8, 0.4), *worse], DEFAULT_REF) == pytest.approx(base)
    assert hypervolume(worse, DEFAULT_REF) == 0.0
    assert hypervolume([], DEFAULT_REF) == 0.0
    # The default reference spans the unit square: a free, perfect model owns all of it, and an
    # unpruned model (flops_kept 1) or one that is never right owns none.
    assert hypervolume([(1.0, 0.0)]) == pytest.approx(1.0)
    assert hypervolume([(0.95, 1.0), (0.0, 0.2)]) == 0.0


def test_hypervolume_of_a_hand_computed_staircase():
    # Front (acc, cost): (0.5, 0.1), (0.7, 0.3), (0.9, 0.6); (0.6, 0.5) is dominated by (0.7, 0.3).
    # Sweeping the cost axis from 0.1 to the reference 1.0, the height is the best accuracy so far:
    #   [0.1, 0.3) x 0.5 + [0.3, 0.6) x 0.7 + [0.6, 1.0) x 0.9 = 0.10 + 0.21 + 0.36
    points = [(0.9, 0.6), (0.6, 0.5), (0.5, 0.1), (0.7, 0.3)]
    assert hypervolume(points, (0.0, 1.0)) == pytest.approx(0.67)
    # Against (0.4, 0.8) the same steps are 0.1, 0.3 and 0.5 high and the last one ends at 0.8.
    assert hypervolume(points, (0.4, 0.8)) == pytest.approx(0.2 * 0.1 + 0.3 * 0.3 + 0.2 * 0.5)
    # Each front point adds its own step: dropping the middle one loses [0.3, 0.6) x (0.7 - 0.5).
    assert hypervolume([points[0], points[2]], (0.0, 1.0)) == pytest.approx(0.67 - 0.3 * 0.2)


def test_hypervolume_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        hypervolume([(math.nan, 0.5)], DEFAULT_REF)


hv_points = st.lists(st.tuples(st.floats(-0.2, 1.0), st.floats(0.0, 1.3)), max_size=30)


@settings(max_examples=200, deadline=None)
@given(hv_points, st.randoms(use_true_random=False))
def test_hypervolume_order_and_dominated_points_do_not_matter(points, rnd):
    hv = hypervolume(points, DEFAULT_REF)
    assert 0.0 <= hv <= 1.0
    shuffled = list(points)
    rnd.shuffle(shuffled)
    assert hypervolume(shuffled, DEFAULT_REF) == pytest.approx(hv, abs=1e-12)
    mask = pareto_mask([a for a, _ in points], [f for _, f in points])
    front = [p for p, on in zip(points, mask, strict=True) if on]
    assert hypervolume(front, DEFAULT_REF) == pytest.approx(hv, abs=1e-12)
    # Adding points dominated by a front point (or duplicates of it) changes nothing.
    extra = [(a - 0.1 * rnd.random(), f + 0.1 * rnd.random()) for a, f in front]
    assert hypervolume(front + extra + front, DEFAULT_REF) == pytest.approx(hv, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(hv_points)
def test_hypervolume_matches_optuna(points):
    # Optuna 5's hypervolume is private (minimizes, and rejects points not dominating the
    # reference), so the module has its own sweep; this pins it to Optuna's while Optuna has one.
    hv_mod = pytest.importorskip("optuna._hypervolume")
    ref_acc, ref_cost = DEFAULT_REF
    losses = np.array([(-a, f) for a, f in points if a > ref_acc and f < ref_cost]).reshape(-1, 2)
    expected = hv_mod.compute_hypervolume(losses, np.array([-ref_acc, ref_cost]))
    assert hypervolume(points, DEFAULT_REF) == pytest.approx(expected, abs=1e-12)


# ---- front_rows / mark_pareto ------------------------------------------------------------------


def mixed_rows() -> list[dict]:
    return [
        trial("a", 0.90, 400),
        trial("b", 0.85, 200),
        trial("c", 0.95, 100, status="STOPPED_EARLY"),  # would dominate everything
        trial("d", 0.99, 50, status="FAILED"),
        trial("e", 0.80, 300),  # dominated by b
        trial("f", None, 10),  # not evaluated
        trial("g", 0.70, None, status="RUNNING"),
        trial("h", math.nan, 5),
        trial("i", 0.60, 100),
    ]


def test_front_rows_only_completed_trials_sorted_by_flops():
    rows = mixed_rows()
    before = copy.deepcopy(rows)
    front = front_rows(rows)
    assert rows == before
    assert [r["trial_id"] for r in front] == ["i", "b", "a"]
    assert all(r["status"] == "COMPLETED" for r in front)
    assert front_rows(front) == front  # idempotent
    assert front_rows([]) == []


def test_mark_pareto_returns_new_dicts_and_leaves_input_alone():
    rows = mixed_rows()
    before = copy.deepcopy(rows)
    marked = mark_pareto(rows)
    assert rows == before  # deepcopy keeps the same NaN object, and == checks identity first
    assert all("pareto" not in r for r in rows)
    assert all(m is not r for m, r in zip(marked, rows, strict=True))
    assert {m["trial_id"] for m in marked if m["pareto"]} == {"a", "b", "i"}
    assert [m["trial_id"] for m in marked] == [r["trial_id"] for r in rows]


# ---- trials.parquet ----------------------------------------------------------------------------


def full_row(**overrides) -> dict:
    row = {
        "trial_id": "t0", "status": "COMPLETED", "criterion": "fpgm", "schedule": "differential",
        "method": "layer_by_layer", "prune_ratio": 0.31, "prune_ratios": [0.1, 0.25, 0.5], "p": 0.2, "q": 1.0,
        "lr": 0.01, "val_acc": 0.91, "test_acc": 0.9, "flops": 12_345_678, "flops_kept": 0.42, "params": 54_321,
        "params_kept": 0.3, "latency_ms": 1.5, "latency_kept": 0.6, "latency_ms_trial": 2.5,
        "latency_device": "cpu: Intel(R) Xeon(R), 1 threads", "pareto": True,
        "mlflow_run_id": "abc123", "wall_s": 12.5, "node_id": "9f2c", "node_ip": "10.0.0.7",
        "config_json": json.dumps({"criterion": "fpgm", "prune.ratio_low": 0.1}),
        "command": "python -m trainables.run criterion=fpgm prune.schedule=differential prune.ratio_low=0.1",
    }
    return {**row, **overrides}


def test_full_row_covers_the_schema():
    # The round trip below is only a check of every column if full_row sets every column.
    assert list(full_row()) == TRIAL_COLUMNS.names


def test_proxy_columns_only_in_finetuned_parquet(tmp_path):
    # A plain search has no proxy trial: trials.parquet has no columns that would always be empty.
    assert not {"proxy_trial_id", "proxy_val_acc"} & set(TRIAL_COLUMNS.names)
    with pytest.raises(ValueError, match=r"unknown keys \['proxy_trial_id', 'proxy_val_acc'\]"):
        write_trials([full_row(proxy_trial_id="p7", proxy_val_acc=0.85)], tmp_path / "trials.parquet")
    path = tmp_path / "finetuned.parquet"
    write_trials([full_row(proxy_trial_id="p7", proxy_val_acc=0.85)], path, FINETUNED_COLUMNS)
    assert read_trials(path)[0]["proxy_trial_id"] == "p7" and pq.read_schema(path).equals(FINETUNED_COLUMNS)


@pytest.mark.parametrize("column", TRIAL_COLUMNS.names)
def test_only_required_columns_may_not_be_left_out(tmp_path, column):
    path = tmp_path / "trials.parquet"
    row = {k: v for k, v in full_row().items() if k != column}
    if column in REQUIRED_COLUMNS:
        with pytest.raises(ValueError, match=f"missing required keys \\['{column}'\\]"):
            write_trials([row], path)
        assert not path.exists()
    else:
        write_trials([row], path)
        assert read_trials(path) == [{**row, column: None}]


@pytest.mark.parametrize(
    "column, value",
    [("trial_id", 3), ("val_acc", "high"), ("flops", "many"), ("params", [1, 2]), ("pareto", "yes")],
)
def test_a_value_the_column_cannot_hold_is_refused(tmp_path, column, value):
    with pytest.raises(ValueError, match=f"trials column '{column}' cannot be stored"):
        write_trials([full_row(**{column: value})], tmp_path / "trials.parquet")


def test_write_read_round_trip_with_nulls_and_lists(tmp_path):
    sparse = {"trial_id": "t1", "status": "STOPPED_EARLY", "criterion": "l1", "pareto": False,
              "prune_ratios": np.array([0.3, 0.3])}
    rows = [full_row(), sparse, full_row(trial_id="t2", prune_ratios=[], flops=np.int64(7), val_acc=np.float64(0.5))]
    path = tmp_path / "out" / "trials.parquet"
    write_trials(rows, path)
    back = read_trials(path)
    assert pq.read_schema(path).equals(TRIAL_COLUMNS)
    assert back[0] == full_row()
    # == alone would take 7.0 for 7: the stored types are the written ones (flops stays an int).
    assert {k: type(v) for k, v in back[0].items()} == {k: type(v) for k, v in full_row().items()}
    assert back[1]["prune_ratios"] == [0.3, 0.3]
    assert all(back[1][k] is None for k in TRIAL_COLUMNS.names if k not in sparse)
    assert back[2]["prune_ratios"] == [] and back[2]["flops"] == 7 and back[2]["val_acc"] == 0.5
    assert [p.name for p in path.parent.iterdir()] == ["trials.parquet"]  # no temporary left behind
    write_trials([], path)  # overwrite atomically with an empty table
    assert read_trials(path) == []


def test_write_trials_fails_loudly_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "trials.parquet"
    write_trials([full_row()], path)
    with pytest.raises(ValueError, match="mark_pareto"):
        write_trials([{k: v for k, v in full_row().items() if k != "pareto"}], path)
    with pytest.raises(ValueError, match="unknown keys \\['top5'\\]"):
        write_trials([full_row(top5=0.99)], path)
    with pytest.raises(ValueError, match="'flops'"):
        write_trials([full_row(flops="many")], path)
    assert read_trials(path) == [full_row()]
    assert [p.name for p in tmp_path.iterdir()] == ["trials.parquet"]


# ---- pareto.png and the table ------------------------------------------------------------------


def search_rows(n: int = 40, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    criteria = ["l1", "fpgm", "taylor", "apoz"]
    statuses = ["COMPLETED"] * 3 + ["STOPPED_EARLY"]
    rows = []
    for i in range(n):
        flops_kept = rng.uniform(0.1, 0.95)
        acc = 0.93 - 0.25 * (1 - flops_kept) ** 2 - rng.uniform(0, 0.08)
        rows.append(trial(f"t{i:02d}", acc, int(3.1e8 * flops_kept), status=rng.choice(statuses),
                          criterion=rng.choice(criteria), schedule="uniform", flops_kept=flops_kept,
                          prune_ratio=1 - flops_kept ** 0.5))
    return mark_pareto(rows)


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The figures plot_front saves, kept so a test can read what was drawn, not only the pixels."""
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def _scatter(ax, size: float) -> tuple[list[tuple[float, float]], int]:
    """Points of the scatters drawn with marker area ``size``, and how many of them are hollow."""
    points, hollow = [], 0
    for c in ax.collections:
        if list(c.get_sizes()) == [size]:
            offsets = [tuple(map(float, o)) for o in c.get_offsets()]
            points += offsets
            hollow += len(offsets) if len(c.get_facecolors()) == 0 else 0
    return sorted(points), hollow


@pytest.mark.parametrize(
    "rows", [search_rows(), mixed_rows(), [trial("only", 0.9, 2_000_000)], []], ids=["many", "mixed", "one", "none"]
)
def test_plot_front_draws_every_trial_and_the_front(tmp_path, drawn, rows):
    import matplotlib.pyplot as plt

    figures_before = plt.get_fignums()
    path = tmp_path / "pareto.png"
    plot_front(rows, path, base_flops=3.1e8, base_acc=0.94, title="small_cnn / fashion_mnist")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert plt.get_fignums() == figures_before, "plot_front must not leave pyplot figures behind"
    [ax] = drawn[0].axes
    plotted = [r for r in rows if r["val_acc"] is not None and r["flops"] is not None and not math.isnan(r["val_acc"])]
    # Every trial with an accuracy and a cost is a dot (MFLOPs, percent); unfinished ones hollow.
    dots, hollow = _scatter(ax, 28)
    assert dots == pytest.approx(sorted((r["flops"] / 1e6, 100 * r["val_acc"]) for r in plotted))
    assert hollow == sum(r["status"] != "COMPLETED" for r in plotted)
    # The front is ringed and joined by a post-step line, cheapest first.
    front = [(r["flops"] / 1e6, 100 * r["val_acc"]) for r in front_rows(rows)]
    assert _scatter(ax, 70)[0] == pytest.approx(sorted(front))
    if front:
        [line] = ax.lines
        assert line.get_drawstyle() == "steps-post"
        assert list(zip(line.get_xdata(), line.get_ydata(), strict=True)) == pytest.approx(front)
    else:
        assert not ax.lines
    assert _scatter(ax, 220)[0] == pytest.approx([(310.0, 94.0)])  # the unpruned base, a star
    assert "MFLOPs" in ax.get_xlabel() and ax.get_title() == "small_cnn / fashion_mnist"
    assert ax.get_ylabel() == "validation accuracy (%)"


def test_plot_front_names_the_task_score(tmp_path, drawn):
    plot_front(mark_pareto([trial("a", 0.6, 2_000_000)]), tmp_path / "pareto.png", score="mAP@0.5")
    assert drawn[0].axes[0].get_ylabel() == "validation mAP@0.5 (%)"


def test_plot_front_without_base_draws_no_star_and_switches_to_gflops(tmp_path, drawn):
    rows = mark_pareto([trial("a", 0.9, 2_000_000_000), trial("b", 0.8, 500_000_000)])
    plot_front(rows, tmp_path / "pareto.png")
    [ax] = drawn[0].axes
    assert _scatter(ax, 220)[0] == []
    assert "GFLOPs" in ax.get_xlabel()
    assert _scatter(ax, 28)[0] == pytest.approx([(0.5, 80.0), (2.0, 90.0)])


def test_format_front_lists_front_rows_cheapest_first():
    rows = search_rows()
    text = format_front(rows).splitlines()
    front = front_rows(rows)
    assert text[0].split()[:2] == ["trial_id", "criterion"]
    # every column names its unit; shares removed and kept are told apart and shown in %
    assert "pruned %" in text[0] and "FLOPs kept %" in text[0] and "val accuracy %" in text[0]
    assert [line.split()[0] for line in text[2:]] == [r["trial_id"] for r in front]
    assert all(line.split()[7] == "-" for line in text[2:])  # no test_acc yet
    cells = [line.split() for line in text[2:]]
    assert [c[3] for c in cells] == [f"{100 * r['prune_ratio']:.1f}" for r in front]  # filters removed, %
    assert [c[4] for c in cells] == [f"{r['flops'] / 1e6:.2f}" for r in front]  # MFLOPs
    assert [c[5] for c in cells] == [f"{100 * r['flops_kept']:.1f}" for r in front]  # FLOPs kept, %
    assert [c[6] for c in cells] == [f"{100 * r['val_acc']:.2f}" for r in front]  # percent
    tested = [{**r, "test_acc": 0.5} if r["trial_id"] == front[0]["trial_id"] else r for r in rows]
    assert format_front(tested).splitlines()[2].split()[7] == "50.00"
    assert "no completed trial" in format_front([trial("x", 0.9, 1, status="FAILED")])
    assert "val mIoU %" in format_front(rows, score="mIoU").splitlines()[0]


def test_pareto_report_says_what_the_hypervolume_measures_and_how_to_rebuild_each_front_row():
    rows = search_rows()
    front = front_rows(rows)
    rows = [{**r, "command": f"python -m trainables.run prune.ratio={r['prune_ratio']!r}", "method": "one_shot",
             "prune_ratios": [r["prune_ratio"]] * 2, "p": 0.01, "q": 0.25, "lr": 0.003} for r in rows]
    hv = hypervolume([(r["val_acc"], r["flops_kept"]) for r in front])
    text = format_report(rows, hv, "flops", (0.0, 1.0), "mAP@0.5")
    assert describe_hypervolume(hv, "flops", (0.0, 1.0), "mAP@0.5") in text
    assert f"hypervolume {hv:.4f}" in text and "val mAP@0.5" in text and "flops_kept=1" in text
    assert f"{len(front)} of {sum(r['status'] == 'COMPLETED' for r in rows)} completed trials" in text
    by_id = {r["trial_id"]: r for r in rows}
    commands = [line.split("command:", 1)[1].strip() for line in text.splitlines() if "command:" in line]
    assert commands == [by_id[r["trial_id"]]["command"] for r in front]  # one per front row, cheapest first
    settings = [line for line in text.splitlines() if line.strip().startswith("settings:")]
    assert len(settings) == len(front)
    first = by_id[front[0]["trial_id"]]
    assert f"filters removed {100 * first['prune_ratio']:.1f}%" in settings[0]
    assert "method=one_shot" in settings[0] and "q=0.25 (final epochs)" in settings[0] and "lr=0.003" in settings[0]
    # with a reference point other than the default, a perfect model's area changes with it
    assert "0.4 would be a perfect model" in describe_hypervolume(0.1, "params", (0.5, 0.8))
