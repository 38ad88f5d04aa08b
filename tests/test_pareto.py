"""The front, the hypervolume, trials.parquet and pareto.png: properties on hand-made trials."""

from __future__ import annotations

import copy
import json
import math
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from search.pareto import (
    DEFAULT_REF,
    REQUIRED_COLUMNS,
    TRIAL_COLUMNS,
    format_front,
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
    assert DEFAULT_REF == (0.0, 1.0)


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
        "method": "layer_by_layer", "ratios": [0.1, 0.25, 0.5], "p": 0.2, "q": 1.0, "lr": 0.01,
        "val_acc": 0.91, "test_acc": 0.9, "flops": 12_345_678, "flops_ratio": 0.42, "params": 54_321,
        "latency_ms": 1.5, "pareto": True, "mlflow_run_id": "abc123", "wall_s": 12.5,
        "config_json": json.dumps({"criterion": "fpgm", "ratio_low": 0.1}),
        "proxy_trial_id": "p7", "proxy_val_acc": 0.85,
    }
    return {**row, **overrides}


def test_schema_has_required_columns_and_types():
    expected = {
        "trial_id": pa.string(), "status": pa.string(), "criterion": pa.string(),
        "ratios": pa.list_(pa.float64()), "p": pa.float64(), "q": pa.float64(), "lr": pa.float64(),
        "val_acc": pa.float64(), "test_acc": pa.float64(), "flops": pa.int64(), "params": pa.int64(),
        "latency_ms": pa.float64(), "pareto": pa.bool_(), "mlflow_run_id": pa.string(),
        "wall_s": pa.float64(), "schedule": pa.string(), "method": pa.string(),
        "flops_ratio": pa.float64(), "config_json": pa.string(),
    }
    for name, typ in expected.items():
        assert TRIAL_COLUMNS.field(name).type == typ, name
    for name in ("val_acc", "test_acc", "flops", "params", "latency_ms", "mlflow_run_id", "wall_s", "flops_ratio"):
        assert TRIAL_COLUMNS.field(name).nullable, name
    assert set(REQUIRED_COLUMNS) == {"trial_id", "status", "criterion", "pareto"}


def test_write_read_round_trip_with_nulls_and_lists(tmp_path):
    sparse = {"trial_id": "t1", "status": "STOPPED_EARLY", "criterion": "l1", "pareto": False,
              "ratios": np.array([0.3, 0.3])}
    rows = [full_row(), sparse, full_row(trial_id="t2", ratios=[], flops=np.int64(7), val_acc=np.float64(0.5))]
    path = tmp_path / "out" / "trials.parquet"
    write_trials(rows, path)
    back = read_trials(path)
    assert pq.read_schema(path).equals(TRIAL_COLUMNS)
    assert back[0] == full_row()
    assert back[1]["ratios"] == [0.3, 0.3]
    assert all(back[1][k] is None for k in TRIAL_COLUMNS.names if k not in sparse)
    assert back[2]["ratios"] == [] and back[2]["flops"] == 7 and back[2]["val_acc"] == 0.5
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
        flops_ratio = rng.uniform(0.1, 0.95)
        acc = 0.93 - 0.25 * (1 - flops_ratio) ** 2 - rng.uniform(0, 0.08)
        rows.append(trial(f"t{i:02d}", acc, int(3.1e8 * flops_ratio), status=rng.choice(statuses),
                          criterion=rng.choice(criteria), schedule="uniform", flops_ratio=flops_ratio))
    return mark_pareto(rows)


@pytest.mark.parametrize("rows", [search_rows(), [trial("only", 0.9, 2_000_000)], []], ids=["many", "one", "none"])
def test_plot_front_writes_a_png(tmp_path, rows):
    path = tmp_path / "pareto.png"
    plot_front(rows, path, base_flops=3.1e8, base_acc=0.94, title="small_cnn / fashion_mnist")
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000


def test_plot_front_without_base(tmp_path):
    path = tmp_path / "pareto.png"
    plot_front(search_rows(8, seed=3), path)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_format_front_lists_front_rows_cheapest_first():
    rows = search_rows()
    text = format_front(rows).splitlines()
    front = front_rows(rows)
    assert text[0].split()[:2] == ["trial_id", "criterion"]
    assert [line.split()[0] for line in text[2:]] == [r["trial_id"] for r in front]
    assert all(line.split()[6] == "-" for line in text[2:])  # no test_acc yet
    assert "no completed trial" in format_front([trial("x", 0.9, 1, status="FAILED")])
