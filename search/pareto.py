"""The accuracy-vs-FLOPs answer of a search: Pareto front, hypervolume, trials.parquet, pareto.png.

Pure functions on plain data (lists of dicts, one per trial): no Ray, Optuna or MLflow here, so
reports, benchmarks and notebooks can use them on a finished ``trials.parquet``.

Conventions (docs/guides/reading-results.md has the table of every name and its unit):
    * Stored numbers are fractions; tables and figures show them as percentages with a ``%``.
    * ``val_acc`` and ``test_acc`` are the task's headline score (top-1 accuracy, mAP@0.5 or mIoU;
      :data:`SCORE_LABELS`), fractions in [0, 1].
    * ``prune_ratio`` is the share of filters *removed*; ``flops_kept``, ``params_kept`` and
      ``latency_kept`` are the shares of the unpruned model's cost *kept* (pruned / unpruned).
    * ``flops`` counts one multiply or one add as a FLOP (FLOPs = 2 x MACs, as
      ``trainables.core.metrics.count_flops``).
    * The front maximizes ``val_acc`` and minimizes a cost: ``flops`` by default, or ``params``
      or ``latency_ms`` (``search.objectives``; see :data:`OBJECTIVES`). Only trials that finished the protocol
      (``status == "COMPLETED"``) are eligible: a trial stopped early by the scheduler never had
      its final fine-tuning, so its accuracy is not comparable.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "COMPLETED",
    "DEFAULT_REF",
    "OBJECTIVES",
    "FINETUNED_COLUMNS",
    "REQUIRED_COLUMNS",
    "SCORE_LABELS",
    "TRIAL_COLUMNS",
    "check_objective",
    "describe_hypervolume",
    "format_front",
    "format_front_details",
    "format_report",
    "front_rows",
    "hypervolume",
    "mark_pareto",
    "pareto_mask",
    "plot_front",
    "read_trials",
    "table_from_rows",
    "write_table_atomic",
    "write_trials",
]

COMPLETED = "COMPLETED"
"""The one trial status eligible for the front (others: STOPPED_EARLY, FAILED, RUNNING, ...)."""

DEFAULT_REF: tuple[float, float] = (0.0, 1.0)
"""Hypervolume reference point (val_acc, cost kept): a score of 0 at the unpruned model's cost.

A trial adds area only if its score is above 0 and it keeps less than all of the unpruned
model's cost; an unpruned trial (flops_kept 1) adds nothing.
"""

OBJECTIVES: dict[str, tuple[str, str, str]] = {
    # name in search.objectives: (cost column, its share of the unpruned model's, axis label)
    "flops": ("flops", "flops_kept", "FLOPs per image ({unit}, 1 FLOP = 1 multiply or add)"),
    "params": ("params", "params_kept", "parameters ({unit})"),
    "latency": ("latency_ms", "latency_kept", "latency per batch (ms, re-timed one model at a time on the node its trial ran on)"),
}
"""The costs a search can trade accuracy against; the front, hypervolume and plot follow the one chosen."""

SCORE_LABELS: dict[str, str] = {"top1": "accuracy", "map50": "mAP@0.5", "miou": "mIoU"}
"""What a task's headline score (``trainables.protocol.tasks.Task.score_name``) is called in tables and figures;
``val_acc``/``test_acc`` hold it for every task."""


def check_objective(name: object) -> tuple[str, str, str]:
    """``(cost column, cost-kept column, axis label)`` of a cost objective, or the house one-line error."""
    if name not in OBJECTIVES:
        raise ValueError(f"search.objectives[1] must be one of {', '.join(OBJECTIVES)}, but got {name!r}")
    return OBJECTIVES[name]


TRIAL_COLUMNS: pa.Schema = pa.schema(
    [
        pa.field("trial_id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # COMPLETED | STOPPED_EARLY | FAILED | RUNNING
        pa.field("criterion", pa.string(), nullable=False),  # criterion registry name
        pa.field("schedule", pa.string()),  # ratio schedule name (trainables.protocol.schedules): uniform | differential | differential_depth | per_layer | ..._inverted
        pa.field("method", pa.string()),  # prune.method (trainables.protocol.config.METHODS)
        # share of filters removed (fraction): over all pruned units, weighted by their filters
        pa.field("prune_ratio", pa.float64()),
        pa.field("prune_ratios", pa.list_(pa.float64())),  # share removed per prunable unit, network order
        pa.field("p", pa.float64()),  # fine-tuning epochs after each unit / step
        pa.field("q", pa.float64()),  # fine-tuning epochs at the end
        pa.field("lr", pa.float64()),  # peak fine-tuning learning rate
        pa.field("val_acc", pa.float64()),  # the task's score (SCORE_LABELS), fraction in [0, 1]; the search objective
        pa.field("test_acc", pa.float64()),  # fraction; evaluated only for Pareto-optimal trials
        pa.field("flops", pa.int64()),  # FLOPs of one forward pass on one image (2 x MACs)
        pa.field("flops_kept", pa.float64()),  # flops / unpruned flops: share of FLOPs kept
        pa.field("params", pa.int64()),
        pa.field("params_kept", pa.float64()),  # params / unpruned params
        # per batch (trainables.core.metrics.measure_latency): re-timed after the trials on each trial's
        # node, one model at a time, nothing else running (search.retime); the trial's own timing is
        # latency_ms_trial (taken while other trials trained on the same cores)
        pa.field("latency_ms", pa.float64()),
        pa.field("latency_kept", pa.float64()),  # latency_ms / the base's, timed in the same rounds
        pa.field("latency_ms_trial", pa.float64()),  # the trial's own timing, beside other trials
        # what latency_ms was timed on (search.retime.timing_device): "cpu: <model>, <n> threads" or
        # "cuda: <GPU>", on the node the trial ran on; empty for a trial not re-timed (search.retime.scope)
        pa.field("latency_device", pa.string()),
        pa.field("pareto", pa.bool_(), nullable=False),  # on the front (see mark_pareto)
        pa.field("mlflow_run_id", pa.string()),
        pa.field("wall_s", pa.float64()),  # wall-clock seconds of the trial
        pa.field("node_id", pa.string()),  # Ray node id of its last result (a retried trial: where it ended)
        pa.field("node_ip", pa.string()),  # that node's address (Tune's node_ip of the trial process)
        # the trial's sampled settings as JSON, keyed by the run command's keys (search.command.searched_keys)
        pa.field("config_json", pa.string()),
        pa.field("command", pa.string()),  # `python -m trainables.run ...` that rebuilds the trial
    ]
)
"""Schema of ``trials.parquet``: one row per trial. Nullable fields may be missing from a row."""

FINETUNED_COLUMNS: pa.Schema = TRIAL_COLUMNS.append(
    pa.field("proxy_trial_id", pa.string())  # the searched (proxy) trial this row fine-tunes
).append(pa.field("proxy_val_acc", pa.float64()))  # that trial's proxy val_acc (fraction)
"""Schema of ``finetuned.parquet`` (a proxy search's front, fine-tuned at full fidelity):
:data:`TRIAL_COLUMNS` plus where each row came from."""

REQUIRED_COLUMNS: tuple[str, ...] = tuple(f.name for f in TRIAL_COLUMNS if not f.nullable)
"""Keys every row given to :func:`write_trials` must carry."""

Row = dict[str, Any]


def _missing(value: Any) -> bool:
    """None or NaN: a value that cannot be placed on the front."""
    return value is None or (isinstance(value, numbers.Real) and math.isnan(value))


def pareto_mask(val_acc: Sequence[float], flops: Sequence[float]) -> list[bool]:
    """Which points are Pareto-optimal when maximizing ``val_acc`` and minimizing ``flops`` (any cost).

    A point is on the front iff no other point is at least as accurate and at most as costly,
    strictly better in one of the two. Exact duplicates do not dominate each other, so to keep the
    front free of repeats only the first occurrence (lowest index) of a duplicated point is marked
    on the front; later copies are False. O(n log n).
    """
    if len(val_acc) != len(flops):
        raise ValueError(f"val_acc and flops must have the same length, but got {len(val_acc)} and {len(flops)}")
    for name, values in (("val_acc", val_acc), ("flops", flops)):
        bad = [i for i, v in enumerate(values) if _missing(v)]
        if bad:
            raise ValueError(f"{name} has None/NaN at indices {bad[:10]}; drop those points first (front_rows does)")
    # Cheapest first; for equal cost the most accurate first; for exact duplicates the lowest index
    # first. A point is then on the front iff it beats every point swept before it.
    order = sorted(range(len(flops)), key=lambda i: (flops[i], -val_acc[i], i))
    mask = [False] * len(flops)
    best = -math.inf
    for i in order:
        if val_acc[i] > best:
            mask[i] = True
            best = val_acc[i]
    return mask


def _eligible(row: Row, cost: str = "flops") -> bool:
    return row.get("status") == COMPLETED and not _missing(row.get("val_acc")) and not _missing(row.get(cost))


def front_rows(rows: list[Row], cost: str = "flops") -> list[Row]:
    """Copies of the Pareto-optimal rows (max ``val_acc``, min ``cost``), sorted by ``cost`` ascending.

    Eligible rows have ``status == "COMPLETED"`` and non-null ``val_acc`` and ``cost``; rows
    stopped early, failed or still running are never on the front. Idempotent: the front of a
    front is itself.
    """
    eligible = [row for row in rows if _eligible(row, cost)]
    mask = pareto_mask([r["val_acc"] for r in eligible], [r[cost] for r in eligible])
    front = [dict(r) for r, on in zip(eligible, mask, strict=True) if on]
    return sorted(front, key=lambda r: r[cost])


def mark_pareto(rows: list[Row], cost: str = "flops") -> list[Row]:
    """New dicts, in input order, with ``"pareto"`` True exactly for the rows of :func:`front_rows`.

    The input rows are not modified.
    """
    eligible_idx = [i for i, row in enumerate(rows) if _eligible(row, cost)]
    mask = pareto_mask([rows[i]["val_acc"] for i in eligible_idx], [rows[i][cost] for i in eligible_idx])
    on_front = {i for i, on in zip(eligible_idx, mask, strict=True) if on}
    return [{**row, "pareto": i in on_front} for i, row in enumerate(rows)]


def hypervolume(points: Sequence[tuple[float, float]], ref: tuple[float, float] = DEFAULT_REF) -> float:
    """Area dominated by ``(val_acc, cost kept)`` points (e.g. ``flops_kept``) and bounded by ``ref``.

    Maximizes the score, minimizes the share of cost kept: each point dominates the rectangle
    [ref_acc, acc] x [kept, ref_kept], and the result is the area of their union
    (dominated points change nothing). Points that do not strictly beat ``ref`` in both
    objectives add nothing. With :data:`DEFAULT_REF` = (0.0, 1.0) and accuracy as a fraction, the
    result lies in [0, 1]; 1 would be a free, perfect model.
    """
    # Optuna 5 only has a private hypervolume (optuna._hypervolume.compute_hypervolume, which also
    # rejects points not dominating the reference), and this module must not import Optuna; the
    # 2-D case is a sweep over the FLOPs axis. tests/test_pareto.py cross-checks against Optuna's.
    ref_acc, ref_cost = ref
    for acc, cost in points:
        if math.isnan(acc) or math.isnan(cost):
            raise ValueError(f"hypervolume got a NaN point ({acc}, {cost}); drop it first")
    useful = sorted((cost, acc) for acc, cost in points if acc > ref_acc and cost < ref_cost)
    area, best_acc = 0.0, ref_acc
    # Between two consecutive costs, the dominated height is the best accuracy seen so far.
    for k, (cost, acc) in enumerate(useful):
        best_acc = max(best_acc, acc)
        next_cost = useful[k + 1][0] if k + 1 < len(useful) else ref_cost
        area += (next_cost - cost) * (best_acc - ref_acc)
    return float(area)


def table_from_rows(rows: list[Row], schema: pa.Schema, what: str = "trials") -> pa.Table:
    """A pyarrow table of plain rows under ``schema``; a value a column cannot hold is a one-line
    ``ValueError`` naming the column (``what`` names the file's kind in the message)."""
    return pa.Table.from_arrays([_column(f, rows, what) for f in schema], schema=schema)


def _column(field: pa.Field, rows: list[Row], what: str) -> pa.Array:
    values = [row.get(field.name) for row in rows]
    try:
        if field.type == pa.list_(pa.float64()):
            values = [None if v is None else [float(x) for x in v] for v in values]
        if pa.types.is_integer(field.type):
            # pyarrow truncates 0.5 to 0 in an int64 column; a count with a fraction is a bug upstream.
            fractional = [v for v in values if isinstance(v, float) and not float(v).is_integer()]
            if fractional:
                raise ValueError(f"{fractional[0]!r} is not a whole number")
        return pa.array(values, type=field.type)
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"{what} column {field.name!r} cannot be stored as {field.type}: {exc}") from exc


def write_table_atomic(table: pa.Table, path: str | os.PathLike[str]) -> None:
    """Write ``table`` as Parquet via a temporary file in the same folder and ``os.replace``:
    readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_trials(rows: list[Row], path: str | os.PathLike[str], schema: pa.Schema = TRIAL_COLUMNS) -> None:
    """Write ``rows`` to a Parquet file with ``schema`` (:data:`TRIAL_COLUMNS`, or
    :data:`FINETUNED_COLUMNS` for a proxy search's ``finetuned.parquet``).

    Missing nullable keys become nulls; a missing required key (:data:`REQUIRED_COLUMNS`, e.g.
    ``pareto``: call :func:`mark_pareto` first) or a key outside the schema is an error, so the
    file never silently loses or invents data. The write is atomic (temporary file in the same
    folder, then ``os.replace``): readers see the old file or the new one, never half of one.
    """
    known = set(schema.names)
    for i, row in enumerate(rows):
        missing = [c for c in REQUIRED_COLUMNS if _missing(row.get(c))]
        unknown = sorted(set(row) - known)
        if missing or unknown:
            raise ValueError(
                f"trial row {i} (trial_id={row.get('trial_id')!r}) has missing required keys {missing} "
                f"and unknown keys {unknown}; required: {list(REQUIRED_COLUMNS)} (set 'pareto' with "
                "mark_pareto); put extra hyperparameters in 'config_json' or add a field to TRIAL_COLUMNS"
            )
    write_table_atomic(table_from_rows(rows, schema), path)


def read_trials(path: str | os.PathLike[str]) -> list[Row]:
    """Rows of a ``trials.parquet`` written by :func:`write_trials` (nulls read back as None)."""
    return pq.read_table(path).to_pylist()


def _flops_unit(max_flops: float) -> tuple[float, str]:
    return (1e9, "GFLOPs") if max_flops >= 1e9 else (1e6, "MFLOPs")


def _axis(objective: str, largest: float) -> tuple[float, str]:
    """(divisor, x-axis label) for the cost of ``objective``."""
    _, _, label = check_objective(objective)
    if objective == "flops":
        scale, unit = _flops_unit(largest)
    elif objective == "params":
        scale, unit = (1e6, "millions") if largest >= 1e6 else (1e3, "thousands")
    else:
        scale, unit = 1.0, "ms"
    return scale, label.format(unit=unit)


def plot_front(
    rows: list[Row],
    path: str | os.PathLike[str],
    *,
    base_flops: float | None = None,
    base_acc: float | None = None,
    title: str = "",
    objective: str = "flops",
    base_cost: float | None = None,
    score: str = "accuracy",
) -> None:
    """Save the accuracy-vs-cost scatter of all trials with the Pareto front as a PNG (dpi 150).

    The cost is ``objective``'s column (:data:`OBJECTIVES`; FLOPs by default, with the unpruned
    model at ``base_flops``; for another cost the unpruned model sits at ``base_cost``).
    Every row with ``val_acc`` and that cost is a point coloured by criterion; trials that did not
    complete (stopped early, ...) are hollow. The front (:func:`front_rows`) is ringed and joined by
    a step line: at a given budget, the best accuracy reached at or below it. ``base_flops``/``base_acc`` (fraction)
    draw the unpruned model as a star. The x unit (MFLOPs or GFLOPs) follows the largest value;
    the y axis names the task's ``score`` (:data:`SCORE_LABELS`: accuracy, mAP@0.5, mIoU) in %.
    """
    # The object-oriented API with an Agg canvas: no pyplot global state, no display, and the
    # caller's matplotlib backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    cost = check_objective(objective)[0]
    base_cost = base_flops if objective == "flops" and base_cost is None else base_cost
    points = [r for r in rows if not _missing(r.get("val_acc")) and not _missing(r.get(cost))]
    scale, xlabel = _axis(objective, max([float(r[cost]) for r in points] + [base_cost or 0.0]))
    criteria = sorted({str(r.get("criterion")) for r in points})
    cmap = _colormap(len(criteria))
    colour = {c: cmap(i % cmap.N) for i, c in enumerate(criteria)}

    fig = Figure(figsize=(8, 5), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for crit in criteria:
        for done in (True, False):
            sel = [r for r in points if str(r.get("criterion")) == crit and (r.get("status") == COMPLETED) == done]
            if sel:
                ax.scatter(
                    [r[cost] / scale for r in sel], [100 * r["val_acc"] for r in sel], s=28,
                    facecolors=colour[crit] if done else "none", edgecolors=colour[crit], linewidths=1.2,
                    alpha=0.85, zorder=3,
                )
    handles = [Line2D([], [], ls="", marker="o", color=colour[c], label=c) for c in criteria]
    if any(r.get("status") != COMPLETED for r in points):
        handles.append(Line2D([], [], ls="", marker="o", mfc="none", mec="grey", label="not completed"))
    front = front_rows(points, cost)
    if front:
        xs, ys = [r[cost] / scale for r in front], [100 * r["val_acc"] for r in front]
        ax.step(xs, ys, where="post", color="black", lw=1.3, zorder=2)
        ax.scatter(xs, ys, s=70, facecolors="none", edgecolors="black", linewidths=1.0, zorder=4)
        handles.append(Line2D([], [], color="black", lw=1.3, marker="o", mfc="none", ms=8,
                              label=f"Pareto front ({len(front)})"))
    if base_cost is not None and base_acc is not None:
        ax.scatter([base_cost / scale], [100 * base_acc], marker="*", s=220, color="gold",
                   edgecolors="black", linewidths=0.8, zorder=4)
        handles.append(Line2D([], [], ls="", marker="*", ms=13, mfc="gold", mec="black", label="unpruned base"))
    if not points:
        ax.text(0.5, 0.5, f"no trial with val_acc and {cost} yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"validation {score} (%)")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if handles:
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.savefig(path, dpi=150, bbox_inches="tight")


def _colormap(n: int) -> Any:
    from matplotlib import colormaps

    return colormaps["tab10" if n <= 10 else "tab20"]


def _cell(value: Any, fmt: str, scale: float = 1.0) -> str:
    return "-" if _missing(value) else format(value * scale, fmt)


def _table_line(cells: list[str], widths: list[int]) -> str:
    # The three name columns left-aligned, the numbers right-aligned.
    return "  ".join(c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()


def format_front(rows: list[Row], objective: str = "flops", score: str = "accuracy") -> str:
    """The Pareto-optimal rows of ``rows`` (:func:`front_rows` on ``objective``'s cost) as a
    plain-text table, cheapest first; every header carries its unit, shares show in %.

    ``score`` names the task's headline score (:data:`SCORE_LABELS`). Missing values show as
    '-'; ``test_acc`` is evaluated only for front trials, so it is present here once the search
    has finished.
    """
    header = ["trial_id", "criterion", "schedule", "pruned %", "FLOPs (M)", "FLOPs kept %", f"val {score} %",
              f"test {score} %", "params (k)", "latency (ms)"]
    body = [
        [
            str(r["trial_id"]), str(r.get("criterion") or "-"), str(r.get("schedule") or "-"),
            _cell(r.get("prune_ratio"), ".1f", 100), _cell(r["flops"], ".2f", 1e-6), _cell(r.get("flops_kept"), ".1f", 100),
            _cell(r["val_acc"], ".2f", 100), _cell(r.get("test_acc"), ".2f", 100), _cell(r.get("params"), ".1f", 1e-3),
            _cell(r.get("latency_ms"), ".2f"),
        ]
        for r in front_rows(rows, check_objective(objective)[0])
    ]
    widths = [max(len(row[j]) for row in [header, *body]) for j in range(len(header))]
    lines = [_table_line(header, widths), "  ".join("-" * w for w in widths)]
    lines += [_table_line(b, widths) for b in body]
    if not body:
        lines.append(f"(no completed trial with val_acc and {check_objective(objective)[0]})")
    return "\n".join(lines)


def describe_hypervolume(hv: float, objective: str = "flops", ref: tuple[float, float] = DEFAULT_REF,
                         score: str = "accuracy") -> str:
    """One sentence saying what the hypervolume ``hv`` measures: which objectives, which reference."""
    cost, kept, _ = check_objective(objective)
    return (f"hypervolume {hv:.4f}: the area the front dominates in the plane of val {score} (fraction, higher is "
            f"better) against {kept} ({cost} / the unpruned model's, lower is better), bounded by the reference "
            f"point val_acc={ref[0]:g}, {kept}={ref[1]:g}; {(1 - ref[0]) * ref[1]:g} would be a perfect model at no cost")


def _settings(row: Row) -> str:
    ratios = row.get("prune_ratios") or []
    parts = [f"criterion={row.get('criterion')}", f"method={row.get('method')}", f"schedule={row.get('schedule')}"]
    if not _missing(row.get("prune_ratio")):
        per_unit = ", ".join(f"{100 * r:.1f}" for r in ratios)
        parts.append(f"filters removed {100 * row['prune_ratio']:.1f}% (per unit, %: {per_unit})")
    for key, what in (("p", "epochs after each unit"), ("q", "final epochs"), ("lr", "peak learning rate")):
        if not _missing(row.get(key)):
            parts.append(f"{key}={row[key]:.4g} ({what})")
    return ", ".join(parts)


def format_front_details(rows: list[Row], objective: str = "flops", score: str = "accuracy") -> str:
    """Per front row (cheapest first): its settings and the ``python -m trainables.run`` command
    that rebuilds it (the row's ``command``)."""
    lines = []
    for r in front_rows(rows, check_objective(objective)[0]):
        lines.append(f"trial {r['trial_id']} (val {score} {_cell(r['val_acc'], '.2f', 100)}%, "
                     f"FLOPs kept {_cell(r.get('flops_kept'), '.1f', 100)}%):")
        lines.append(f"  settings: {_settings(r)}")
        lines.append(f"  command:  {r.get('command') or '- (not recorded)'}")
    return "\n".join(lines)


def format_report(rows: list[Row], hv: float, objective: str = "flops", ref: tuple[float, float] = DEFAULT_REF,
                  score: str = "accuracy") -> str:
    """``pareto.txt``: what the front trades, its hypervolume (and of what), the front table,
    and each front trial's settings and rebuilding command."""
    n_done = sum(r.get("status") == COMPLETED for r in rows)
    head = (f"Pareto front: val {score} (higher is better) against {check_objective(objective)[0]} (lower is better); "
            f"{len(front_rows(rows, check_objective(objective)[0]))} of {n_done} completed trials on the front "
            f"({len(rows)} trials in all)")
    parts = [head, describe_hypervolume(hv, objective, ref, score), "", format_front(rows, objective, score)]
    details = format_front_details(rows, objective, score)
    if details:
        parts += ["", details]
    return "\n".join(parts)
