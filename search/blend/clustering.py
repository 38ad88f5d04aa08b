"""Criteria clustering, the first stage of He et al. 2021's blended criterion.

For a base model, every pool criterion scores every prunable unit once (cached on disk per
criterion, keyed by the base model file, which already hashes model, data and training, and
by the scoring batches). Per unit, Spearman's rank correlation between every pair of
criteria says how alike they rank the filters; the per-unit matrices are averaged over units,
``1 - rho`` is the distance of an average-linkage hierarchical clustering (scipy), cut at a
number of clusters or a distance threshold, and each cluster is represented by the member
most correlated, on average, with the rest of its cluster. ``cluster_groups`` does the same
per group of units (a stage, or one unit as in He et al.): the mean is taken over the group's
units only, so each group gets its own clusters and representatives.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["Clustering", "check_pool", "pool_scores", "rank_correlations", "cluster_criteria", "cluster_pool",
           "cluster_groups", "plot_heatmap", "write_clustering", "write_groups", "format_clustering"]


@dataclass
class Clustering:
    pool: list[str]
    correlation: np.ndarray  # (len(pool), len(pool)) Spearman rho averaged over units
    per_unit: dict[str, np.ndarray]  # unit -> its (len(pool), len(pool)) matrix
    clusters: list[list[str]]  # each sorted by pool order; clusters ordered by their first member
    representatives: list[str]  # one per cluster, same order
    order: list[str] = field(default_factory=list)  # dendrogram leaf order (heatmap rows/columns)

    def to_json(self) -> dict:
        return {
            "pool": self.pool, "clusters": self.clusters, "representatives": self.representatives,
            "order": self.order, "correlation": self.correlation.round(6).tolist(),
            "per_unit": {u: m.round(6).tolist() for u, m in self.per_unit.items()},
        }


def check_pool(pool: Sequence[str], criteria: Sequence[str], *, n_clusters: int | None = None,
               distance_threshold: float | None = None, key: str = "search.blend.pool") -> None:
    """One-line errors for a bad pool or cut, before any scoring."""
    pool = list(pool or [])
    if len(pool) < 2:
        valid = ", ".join(c for c in criteria if c != "blended")
        raise ValueError(f"{key} must list at least 2 criteria (valid: {valid}), but got {pool}")
    for name in pool:
        if name not in criteria or name == "blended":
            raise ValueError(f"{key}: unknown criterion '{name}'; valid: {', '.join(c for c in criteria if c != 'blended')}")
    if len(set(pool)) != len(pool):
        raise ValueError(f"{key} must list each criterion once, but got {pool}")
    if (n_clusters is None) == (distance_threshold is None):
        raise ValueError("search.blend must set exactly one of n_clusters and distance_threshold, but got "
                         f"n_clusters={n_clusters!r}, distance_threshold={distance_threshold!r}")
    if n_clusters is not None and not (isinstance(n_clusters, int) and 1 <= n_clusters <= len(pool)):
        raise ValueError(f"search.blend.n_clusters must be an integer in [1, {len(pool)}] (the pool size), "
                         f"but got {n_clusters!r}")
    if distance_threshold is not None and not 0 <= distance_threshold <= 2:
        raise ValueError(f"search.blend.distance_threshold must be in [0, 2] (distance = 1 - rho), "
                         f"but got {distance_threshold!r}")


def _batches_key(batches) -> str:
    h = hashlib.sha256()
    for x, y in batches:
        h.update(x.numpy().tobytes())
        h.update(y.numpy().tobytes())
    return h.hexdigest()[:16]


def pool_scores(model: torch.nn.Module, pool: Sequence[str], batches, *, seed: int = 0,
                target_classes: Sequence[int] | None = None, cache_dir: str | Path | None = None,
                model_key: str | None = None, log: Callable[[str], None] = print) -> dict[str, dict[str, torch.Tensor]]:
    """``{criterion: {unit: scores}}`` of every pool criterion on every unit of the unpruned model.

    With ``cache_dir`` and ``model_key`` (e.g. the base model file's name) each criterion's
    scores are saved as ``<cache_dir>/criteria_scores/<model_key>/<criterion>-<batches hash>.pt``
    and read back next time, so growing the pool scores only the new criteria.
    """
    from trainables.core.surgery import describe_units
    from trainables.criteria import ScoringContext, get_criterion

    units = describe_units(model)
    ctx = ScoringContext(batches=list(batches), seed=seed, target_classes=target_classes)
    folder = None
    if cache_dir is not None and model_key is not None:
        folder = Path(cache_dir).expanduser() / "criteria_scores" / model_key
        folder.mkdir(parents=True, exist_ok=True)
    tag = f"{_batches_key(ctx.batches)}-s{seed}"
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name in pool:
        path = folder / f"{name}-{tag}.pt" if folder is not None else None
        if path is not None and path.exists():
            out[name] = torch.load(path, weights_only=True)
            continue
        log(f"scoring {name} on {len(units)} units")
        crit = get_criterion(name)
        out[name] = {u.name: crit(model, u, ctx) for u in units}
        if path is not None:
            torch.save(out[name], path)
    return out


def rank_correlations(scores: dict[str, dict[str, torch.Tensor]], pool: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-unit Spearman matrices and their mean over units.

    A criterion that gives a unit's filters all the same score has no ranking there; its
    correlations on that unit count as 0 (no agreement) rather than NaN.
    """
    from scipy.stats import spearmanr

    units = list(scores[pool[0]])
    per_unit = {}
    for u in units:
        table = np.stack([scores[c][u].double().numpy() for c in pool], axis=1)  # (filters, criteria)
        with np.errstate(invalid="ignore", divide="ignore"):
            rho = spearmanr(table).statistic
        rho = np.full((len(pool), len(pool)), rho) if np.ndim(rho) == 0 else np.asarray(rho, dtype=float)
        rho = np.nan_to_num(rho, nan=0.0)
        np.fill_diagonal(rho, 1.0)
        per_unit[u] = rho
    mean = np.mean(np.stack(list(per_unit.values())), axis=0)
    return mean, per_unit


def cluster_criteria(correlation: np.ndarray, pool: Sequence[str], *, n_clusters: int | None = None,
                     distance_threshold: float | None = None) -> tuple[list[list[str]], list[str], list[str]]:
    """``(clusters, representatives, leaf_order)`` by average-linkage clustering on 1 - rho."""
    from scipy.cluster.hierarchy import fcluster, leaves_list, linkage
    from scipy.spatial.distance import squareform

    pool = list(pool)
    dist = np.clip(1.0 - (correlation + correlation.T) / 2, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    tree = linkage(squareform(dist, checks=False), method="average")
    if n_clusters is not None:
        labels = fcluster(tree, t=n_clusters, criterion="maxclust")
    else:
        labels = fcluster(tree, t=distance_threshold, criterion="distance")
    groups: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(int(lab), []).append(i)
    members = sorted(groups.values(), key=lambda g: g[0])
    clusters = [[pool[i] for i in g] for g in members]
    reps = []
    for g in members:
        if len(g) == 1:
            reps.append(pool[g[0]])
            continue
        # Mean correlation with the other members; ties go to the earlier pool entry.
        mean_rho = [np.mean([correlation[i, j] for j in g if j != i]) for i in g]
        reps.append(pool[g[int(np.argmax(mean_rho))]])
    order = [pool[i] for i in leaves_list(tree)]
    return clusters, reps, order


def cluster_pool(scores: dict[str, dict[str, torch.Tensor]], pool: Sequence[str], *, n_clusters: int | None = None,
                 distance_threshold: float | None = None) -> Clustering:
    corr, per_unit = rank_correlations(scores, pool)
    clusters, reps, order = cluster_criteria(corr, pool, n_clusters=n_clusters, distance_threshold=distance_threshold)
    return Clustering(list(pool), corr, per_unit, clusters, reps, order)


def cluster_groups(scores: dict[str, dict[str, torch.Tensor]], pool: Sequence[str], groups: Sequence[Sequence[str]], *,
                   n_clusters: int | None = None, distance_threshold: float | None = None) -> list[Clustering]:
    """One clustering per group of units, on the Spearman matrices averaged over that group."""
    return [cluster_pool({c: {u: scores[c][u] for u in units} for c in pool}, pool, n_clusters=n_clusters,
                         distance_threshold=distance_threshold) for units in groups]


def plot_heatmap(result: Clustering, path: str | Path, title: str = "") -> Path:
    """The mean Spearman matrix in dendrogram order, clusters outlined, representatives starred.

    Drawn on its own ``Figure`` (no pyplot): the caller's matplotlib backend and figures stay
    as they were.
    """
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    idx = [result.pool.index(c) for c in result.order]
    mat = result.correlation[np.ix_(idx, idx)]
    n = len(idx)
    # Wide enough for the colour bar's label and a wrapped title even with few criteria.
    width = max(4.8, 1.6 + 0.6 * n)
    fig = Figure(figsize=(width, 1.2 + 0.55 * n))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(mat, cmap="RdBu_r", vmin=-1, vmax=1)
    labels = [f"{c} *" if c in result.representatives else c for c in result.order]
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if abs(mat[i, j]) > 0.6 else "black")
    cluster_of = {c: k for k, members in enumerate(result.clusters) for c in members}
    start = 0
    for pos in range(1, n + 1):  # outline runs of the same cluster along the leaf order
        if pos == n or cluster_of[result.order[pos]] != cluster_of[result.order[start]]:
            ax.add_patch(Rectangle((start - 0.5, start - 0.5), pos - start, pos - start, fill=False, lw=2, ec="black"))
            start = pos
    fig.colorbar(im, ax=ax, label="Spearman rho (mean over units)")
    text = title or f"criteria clustering: {len(result.clusters)} clusters (* = representative)"
    ax.set_title(textwrap.fill(text, width=int(9 * width)), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # nothing clipped at the edges
    return path


def write_clustering(result: Clustering, folder: str | Path, title: str = "", extra: dict | None = None) -> list[Path]:
    """``clustering.json`` (with ``extra`` keys), ``correlation.parquet`` (one row per criterion)
    and ``correlation.png``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    js = folder / "clustering.json"
    js.write_text(json.dumps({**result.to_json(), **(extra or {})}, indent=1))
    cols = {"criterion": result.pool, **{c: result.correlation[:, i].tolist() for i, c in enumerate(result.pool)}}
    cols["cluster"] = [next(k for k, m in enumerate(result.clusters) if c in m) for c in result.pool]
    cols["representative"] = [c in result.representatives for c in result.pool]
    table = folder / "correlation.parquet"
    pq.write_table(pa.table(cols), table)
    png = plot_heatmap(result, folder / "correlation.png", title)
    return [js, table, png]


def write_groups(overall: Clustering, per_group: Sequence[Clustering], groups: Sequence[Sequence[str]], mode: str,
                 folder: str | Path, title: str = "") -> list[Path]:
    """A layerwise clustering: the overall one (``clustering.json`` says ``layerwise`` and lists
    every group's units, clusters and representatives) plus ``group<i>/`` with each group's files."""
    folder = Path(folder)
    summary = {"layerwise": mode, "groups": [
        {"units": list(units), "clusters": c.clusters, "representatives": c.representatives}
        for units, c in zip(groups, per_group, strict=True)]}
    files = write_clustering(overall, folder, title, extra=summary)
    for i, (units, result) in enumerate(zip(groups, per_group, strict=True)):
        first, last = units[0], units[-1]
        label = first if first == last else f"{first} .. {last}"
        files += write_clustering(result, folder / f"group{i}", f"{title} [{mode} {i}: {label}]",
                                  extra={"layerwise": mode, "units": list(units)})
    return files


def format_clustering(result: Clustering) -> str:
    lines = ["cluster | representative | members", "--------+----------------+--------"]
    for k, (members, rep) in enumerate(zip(result.clusters, result.representatives, strict=True)):
        lines.append(f"{k:7d} | {rep:14s} | {', '.join(members)}")
    return "\n".join(lines)
