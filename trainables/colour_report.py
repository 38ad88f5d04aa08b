"""``python -m trainables.colour_report [--seeds 0 1 2] [--k 16] [--out DIR] [key=value ...]``:
are the filters greedy CAR prunes first colour filters? (Abbasi-Asl and Yu 2017, section 5.)

Per seed and per colour variant of the data (``--variants``; ``data.colour`` of
coloured_fashion_mnist: ``random``, where colour carries no label information, and the
control ``label``, where the hue names the class) it

1. trains the base model, or loads it from the base-model cache (``trainables.cli.base_model.prepare``);
2. computes greedy CAR's removal order of the first conv layer's filters on validation images
   (``trainables.protocol.greedy_car``; ``--order car`` ranks by one-shot CAR instead), the first ``--k``
   removals (``--k 0``: all but one filter, the whole order);
3. classifies every first-layer filter as colour or not from its weights
   (``trainables.experiments.colour.luminance_colour_index`` against the untrained-filter threshold), and
   gives each second-layer unit Rafegas and Vanrell's response index (``--second-layer``);
4. compares the share of colour filters among the first k greedy-CAR removals with the base
   rate, with the k lowest-l1 filters and with k random filters; p-values are permutation tests
   (random k-subsets of the same layer, seeded), per seed and pooled over seeds.

Writes ``colour_filters.parquet`` (one row per filter and run), ``colour_summary.json``,
``colour_report.md`` and ``colour_filters.png`` (the first-layer filters as RGB tiles in pruning
order, pruned ones framed, colour filters dotted) under ``--out``. Takes the run config's
overrides (``model=``, ``data=``, ``model.pretrain.epochs=``, ``model.weights=``, ``cache_dir=``,
``threads=``); the defaults are ``model=small_alexnet data=coloured_fashion_mnist``.

``--merge DIR [DIR ...] --out DIR`` joins reports run apart (say one seed per process) into one:
their tables concatenated, the statistics and the figure recomputed from the joined table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainables.experiments.colour import (
    NULL_QUANTILE,
    colour_threshold,
    greyscale,
    luminance_colour_index,
    response_colour_index,
    response_threshold,
)
from trainables.protocol.config import require, require_int

__all__ = ["ReportOptions", "figure", "main", "merge_reports", "run_report", "summarise"]

DEFAULTS = ["model=small_alexnet", "data=coloured_fashion_mnist"]
ORDERS = ("greedy_car", "car")


@dataclass(frozen=True)
class ReportOptions:
    seeds: tuple[int, ...] = (0, 1, 2)  # training seeds (``seed=``); the validation split stays data.seed's
    variants: tuple[str, ...] = ("random", "label")  # data.colour values; ignored for data without it
    k: int = 16  # first k removals compared; 0 = the whole order (n - 1 removals)
    score_images: int = 2000  # validation images greedy CAR scores on (and the colour responses use)
    order: str = "greedy_car"  # greedy_car (re-scored after each removal) or car (one-shot)
    rescore_every: int = 1
    permutations: int = 10_000
    second_layer: bool = False  # also the second conv layer: CAR order and response index
    top: int = 100  # images per unit for the response index (Rafegas and Vanrell use 100)
    out: str = "outputs/colour"

    def __post_init__(self) -> None:
        require(len(self.seeds) >= 1 and all(isinstance(s, int) and s >= 0 for s in self.seeds), "--seeds",
                "one or more integers >= 0", list(self.seeds))
        require(len(self.variants) >= 1 and len(set(self.variants)) == len(self.variants), "--variants",
                "one or more distinct data.colour values", list(self.variants))
        require_int("--k", self.k, 0)
        require_int("--score-images", self.score_images, 2)
        require(self.order in ORDERS, "--order", f"one of {', '.join(ORDERS)}", self.order)
        require_int("--rescore-every", self.rescore_every, 1)
        require_int("--permutations", self.permutations, 1)
        require_int("--top", self.top, 1)
        require(self.top <= self.score_images, "--top", f"at most --score-images ({self.score_images})", self.top)


def _parse(argv: list[str]) -> tuple[ReportOptions, list[str], list[str] | None]:
    p = argparse.ArgumentParser(prog="python -m trainables.colour_report", add_help=False,
                                exit_on_error=False)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["random", "label"])
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--score-images", type=int, default=2000)
    p.add_argument("--order", default="greedy_car")
    p.add_argument("--rescore-every", type=int, default=1)
    p.add_argument("--permutations", type=int, default=10_000)
    p.add_argument("--second-layer", action="store_true")
    p.add_argument("--top", type=int, default=100)
    p.add_argument("--out", default="outputs/colour")
    p.add_argument("--merge", nargs="+", default=None)
    known, rest = _parse_known(p, argv)
    bad = [a for a in rest if a.startswith("-") or "=" not in a]
    require(not bad, "arguments", "--options of the report or key=value overrides of the run config",
            " ".join(bad))
    opts = ReportOptions(seeds=tuple(known.seeds), variants=tuple(known.variants), k=known.k,
                         score_images=known.score_images, order=known.order, rescore_every=known.rescore_every,
                         permutations=known.permutations, second_layer=known.second_layer, top=known.top,
                         out=known.out)
    require(known.merge is None or not rest, "--merge", "given without run-config overrides", " ".join(rest))
    return opts, rest, known.merge


def _parse_known(p: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """argparse's parse_known_args with its exit-on-error turned into a one-line ValueError."""
    try:
        return p.parse_known_args(argv)
    except argparse.ArgumentError as err:  # exit_on_error=False: no usage text, the house answer is one line
        raise ValueError(f"arguments must be valid options of the report (see --help), but got {err}") from None


# ---------------------------------------------------------------- one run: a seed and a variant


def _configs(opts: ReportOptions, overrides: list[str]) -> list[tuple[int, str, Any]]:
    """Every (seed, variant, checked run config), all composed before any work starts."""
    from omegaconf import OmegaConf

    from data import dataset_options
    from trainables.cli.compose import check_config, load_run_config

    first = load_run_config([*DEFAULTS, *overrides])
    colours = dataset_options(first.data.name).get("colour")
    variants = opts.variants if colours else ("-",)  # a data set without colours has one variant
    for v in variants:
        require(v == "-" or v in colours, "--variants", f"data.colour values ({', '.join(colours or ())})", v)
    out = []
    for seed in opts.seeds:
        for v in variants:
            # What `seed=<s> data.colour=<v>` overrides would compose, without composing again (Hydra is slow).
            cfg = OmegaConf.create(OmegaConf.to_container(first))
            cfg.seed = seed
            if v != "-":
                cfg.data.colour = v
            check_config(cfg)
            out.append((seed, v, cfg))
    return out


def _pixel_stats(cfg: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """How the data set normalised its pixels, for greyscale versions of its images."""
    from data import coloured_channel_stats

    if cfg.data.name == "coloured_fashion_mnist":
        return coloured_channel_stats(cfg.data.root, cfg.data.colour)
    if cfg.data.name == "imagenet":  # torchvision's ImageNet normalisation (data/_folder.py uses the same)
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return None


def _order(model, unit_name: str, batches, n_remove: int, opts: ReportOptions) -> list[int]:
    if opts.order == "car":
        from trainables import ScoringContext, get_criterion

        scores = get_criterion("car")(model, unit_name, ScoringContext(batches=batches))
        return torch.argsort(scores, stable=True)[:n_remove].tolist()  # lowest (least important) first
    from trainables.protocol.greedy_car import greedy_car_order

    return greedy_car_order(model, unit_name, batches, n_remove=n_remove, rescore_every=opts.rescore_every)


def _layer_index(model, unit, layer: int, images: torch.Tensor, cfg: Any, num_classes: int,
                 stats: tuple | None, opts: ReportOptions) -> tuple[list[float], float, str]:
    """Each filter's colour index, the layer's threshold and the kind of index: from the
    weights for a first layer reading RGB, else from responses (greyscale versions need ``stats``)."""
    from trainables.core.models import build_model

    conv = model.get_submodule(unit.convs[0])
    if layer == 1 and conv.in_channels == 3:
        return luminance_colour_index(conv.weight).tolist(), colour_threshold(tuple(conv.kernel_size)), "luminance"
    if stats is None:
        raise ValueError(f"data.name must be an RGB data set with known pixel statistics (coloured_fashion_mnist "
                         f"or imagenet) for a response colour index, but got {cfg.data.name!r}")
    mean, std = stats

    def to_grey(x: torch.Tensor) -> torch.Tensor:
        return greyscale(x, mean, std)

    def untrained(s: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(10_000 + s)
            return build_model(cfg.model.name, num_classes=num_classes, **dict(cfg.model.kwargs or {})).eval()

    index = response_colour_index(model, unit.act_points[0], images, to_grey, top=opts.top).tolist()
    threshold = response_threshold(untrained, unit.act_points[0], images, to_grey, top=opts.top)
    return index, threshold, "response"


def _one_run(seed: int, variant: str, cfg: Any, opts: ReportOptions, log) -> tuple[list[dict], dict]:
    """Per-filter rows of one (seed, variant) and the run's metadata."""
    from data import iterate_batches
    from trainables import ScoringContext, get_criterion
    from trainables.cli.base_model import prepare
    from trainables.core.surgery import describe_units

    model, splits, base_path, meta = prepare(cfg, log=log)
    model.eval()
    n_score = min(opts.score_images, len(splits.val))
    xs, ys, seen = [], [], 0
    for x, y in iterate_batches(splits.val, 500, shuffle=False, num_workers=splits.num_workers):  # never test
        xs.append(x)
        ys.append(y)
        seen += len(y)
        if seen >= n_score:  # ImageNet's val split is 10,000 images: read only what is scored
            break
    images, labels = torch.cat(xs)[:n_score], torch.cat(ys)[:n_score]
    batches = [(images[s : s + 500], labels[s : s + 500]) for s in range(0, n_score, 500)]
    units = describe_units(model)
    layers = units[:2] if opts.second_layer else units[:1]
    stats = _pixel_stats(cfg)
    rows: list[dict] = []
    timing = {}
    for layer, unit in enumerate(layers, start=1):
        n = unit.n_filters
        n_remove = n - 1 if opts.k == 0 else min(opts.k, n - 1)
        t0 = time.perf_counter()
        order = _order(model, unit.name, batches, n_remove, opts)
        timing[unit.name] = time.perf_counter() - t0
        log(f"seed {seed} colour {variant}: {opts.order} order of {unit.name} ({n_remove} of {n}) "
            f"in {timing[unit.name]:.0f}s: {order}")
        l1 = get_criterion("l1")(model, unit.name, ScoringContext(seed=seed))
        l1_rank = torch.argsort(l1, stable=True).argsort().tolist()  # 0 = smallest l1, pruned first
        index, threshold, kind = _layer_index(model, unit, layer, images, cfg, splits.num_classes, stats, opts)
        rank = {f: i for i, f in enumerate(order)}
        weight = model.get_submodule(unit.convs[0]).weight.detach().cpu()  # (F, C, kh, kw)
        for f in range(n):
            rows.append({
                "seed": seed, "variant": variant, "layer": layer, "unit": unit.name, "filter": f,
                "colour_index": float(index[f]), "index_kind": kind, "threshold": float(threshold),
                "is_colour": bool(index[f] > threshold), "car_rank": rank.get(f), "l1": float(l1[f]),
                "l1_rank": int(l1_rank[f]), "n_filters": n, "k": n_remove if opts.k == 0 else min(opts.k, n_remove),
                # the first layer's weights, for the figure (drawn from this table alone)
                "weight": weight[f].flatten().tolist() if layer == 1 else None,
                "kernel": list(weight.shape[1:]) if layer == 1 else None,
            })
    info = {"seed": seed, "variant": variant, "base_model": str(base_path), "base_val_acc": meta.get("val_acc"),
            "score_images": n_score, "order": opts.order, "rescore_every": opts.rescore_every,
            "order_seconds": timing, "model": cfg.model.name, "data": cfg.data.name}
    return rows, info


# ---------------------------------------------------------------- statistics from the table


def _random_picks(n: int, k: int, permutations: int, rng: np.random.Generator) -> np.ndarray:
    """(permutations, k): a uniform k-subset of the layer's n filters per row."""
    return np.argpartition(rng.random((permutations, n)), k - 1, axis=1)[:, :k]


def _p(null: np.ndarray, observed: float) -> float:
    """One-sided permutation p-value, at least as large as observed (+1 for the observed itself)."""
    return float((1 + (null >= observed - 1e-12).sum()) / (1 + len(null)))


def summarise(rows: list[dict], permutations: int = 10_000, seed: int = 0) -> list[dict]:
    """Per (layer, variant): colour filters among the first k by CAR, by lowest l1 and by
    random, the base rate, and one-sided permutation p-values (at least that many colour
    filters among k random ones of the same layer), per seed and pooled over seeds (the
    pooled statistic is the total over seeds; each seed's layer is permuted on its own).

    Threshold-free companions: the mean colour index of the first k (CAR, l1) against the
    layer's mean, with the same permutation test on the mean index; and how many of CAR's
    first k are also among l1's first k (does CAR just follow weight magnitude?)."""
    rng = np.random.default_rng(seed)
    out = []
    for layer, variant in sorted({(r["layer"], r["variant"]) for r in rows}):
        mine = [r for r in rows if r["layer"] == layer and r["variant"] == variant]
        runs = sorted({r["seed"] for r in mine})
        per_seed = []
        null_count = np.zeros(permutations)
        null_index = np.zeros(permutations)
        tot = dict.fromkeys(("car", "l1", "random", "k", "colour", "n", "car_index", "l1_index", "index", "overlap"), 0.0)
        for s in runs:
            rs = sorted((r for r in mine if r["seed"] == s), key=lambda r: r["filter"])
            is_colour = np.array([r["is_colour"] for r in rs], dtype=bool)
            index = np.array([r["colour_index"] for r in rs], dtype=np.float64)
            k = rs[0]["k"]
            car_k = np.array([r["car_rank"] is not None and r["car_rank"] < k for r in rs])
            l1_k = np.array([r["l1_rank"] < k for r in rs])
            picks = _random_picks(len(rs), k, permutations, rng)
            null_count += is_colour[picks].sum(axis=1)
            null_index += index[picks].sum(axis=1)
            seen = {"car": int(is_colour[car_k].sum()), "l1": int(is_colour[l1_k].sum()),
                    "random": int(is_colour[rng.permutation(len(rs))[:k]].sum()), "k": k,
                    "colour": int(is_colour.sum()), "n": len(rs), "car_index": float(index[car_k].sum()),
                    "l1_index": float(index[l1_k].sum()), "index": float(index.sum()),
                    "overlap": int((car_k & l1_k).sum())}
            null_s = is_colour[picks].sum(axis=1)
            per_seed.append({
                "seed": s, "k": k, "n_filters": len(rs), "colour_filters": seen["colour"],
                "base_rate": float(is_colour.mean()), "car_colour": seen["car"], "l1_colour": seen["l1"],
                "random_colour": seen["random"], "p_car": _p(null_s, seen["car"]), "p_l1": _p(null_s, seen["l1"]),
                "car_mean_index": seen["car_index"] / k, "l1_mean_index": seen["l1_index"] / k,
                "mean_index": float(index.mean()), "car_l1_overlap": seen["overlap"],
            })
            for key, v in seen.items():
                tot[key] += v
        k_total = int(tot["k"])
        out.append({
            "layer": layer, "variant": variant, "seeds": runs, "per_seed": per_seed, "k_total": k_total,
            "car_colour": int(tot["car"]), "l1_colour": int(tot["l1"]), "random_colour": int(tot["random"]),
            "car_share": tot["car"] / k_total, "l1_share": tot["l1"] / k_total, "random_share": tot["random"] / k_total,
            "base_rate": tot["colour"] / tot["n"], "random_mean_share": float(null_count.mean() / k_total),
            "p_car": _p(null_count, tot["car"]), "p_l1": _p(null_count, tot["l1"]),
            "car_mean_index": tot["car_index"] / k_total, "l1_mean_index": tot["l1_index"] / k_total,
            "mean_index": tot["index"] / tot["n"],
            "p_car_index": _p(null_index, tot["car_index"]), "p_l1_index": _p(null_index, tot["l1_index"]),
            "car_l1_overlap": int(tot["overlap"]),
        })
    return out


def markdown(summary: list[dict], infos: list[dict], opts: ReportOptions) -> str:
    """The summary as a markdown table (what ``bench/RESULTS.md`` quotes)."""
    lines = [
        f"k = {opts.k or 'n-1'} first removals per layer and run, order = {opts.order} "
        f"(rescore_every={opts.rescore_every}) on {infos[0]['score_images'] if infos else '?'} validation images; "
        f"colour = index above the {NULL_QUANTILE:.2f} quantile of untrained filters; "
        f"p = one-sided permutation test ({opts.permutations} random k-subsets per run), pooled over seeds.",
        "",
        "| layer | data.colour | seeds | base rate | CAR first k | l1 first k | random first k (one draw) | p (CAR) | p (l1) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['layer']} | {s['variant']} | {len(s['seeds'])} | {s['base_rate']:.2f} | "
            f"{s['car_colour']}/{s['k_total']} ({s['car_share']:.2f}) | {s['l1_colour']}/{s['k_total']} "
            f"({s['l1_share']:.2f}) | {s['random_share']:.2f} | {s['p_car']:.3g} | {s['p_l1']:.3g} |")
    lines += ["", "Threshold-free: mean colour index of the first k against the layer's mean (permutation p on "
              "the mean), and how many of CAR's first k are also l1's first k:", "",
              "| layer | data.colour | layer mean | CAR first k | l1 first k | p (CAR) | p (l1) | CAR and l1 overlap |",
              "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['layer']} | {s['variant']} | {s['mean_index']:.3f} | {s['car_mean_index']:.3f} | "
                     f"{s['l1_mean_index']:.3f} | {s['p_car_index']:.3g} | {s['p_l1_index']:.3g} | "
                     f"{s['car_l1_overlap']}/{s['k_total']} |")
    lines += ["", "Per seed (colour filters among the first k: CAR / l1 / random; base rate; p CAR):", ""]
    for s in summary:
        cells = [f"seed {p['seed']}: {p['car_colour']}/{p['l1_colour']}/{p['random_colour']} of {p['k']}, "
                 f"base {p['base_rate']:.2f}, p={p['p_car']:.3g}" for p in s["per_seed"]]
        lines.append(f"- layer {s['layer']}, colour={s['variant']}: " + "; ".join(cells))
    accs = ", ".join(f"seed {i['seed']} {i['variant']}: {i['base_val_acc']:.3f}" for i in infos
                     if i.get("base_val_acc") is not None)
    lines += ["", f"Base models' validation top-1: {accs}."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the figure


def figure(rows: list[dict]):
    """First-layer filters as RGB tiles, one row per run, in pruning order (the first k
    framed red, in the order removed; then the rest by original index); colour filters
    carry a dot. Drawn from the table's rows alone. Returns a matplotlib Figure."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    firsts = [r for r in rows if r["layer"] == 1 and r.get("weight") is not None]
    model_weights = {}
    for run in sorted({(r["seed"], r["variant"]) for r in firsts}):
        rs = sorted((r for r in firsts if (r["seed"], r["variant"]) == run), key=lambda r: r["filter"])
        model_weights[run] = torch.tensor([r["weight"] for r in rs]).view(len(rs), *rs[0]["kernel"])
    runs = sorted(model_weights)
    n = max(w.shape[0] for w in model_weights.values())
    fig = Figure(figsize=(max(6.0, 0.22 * n + 1.5), 0.5 * len(runs) + 0.8))
    axes = fig.subplots(len(runs), 1, squeeze=False)[:, 0]
    for ax, run in zip(axes, runs, strict=True):
        w = model_weights[run]  # (F, 3, kh, kw)
        rs = {r["filter"]: r for r in rows if (r["seed"], r["variant"]) == run and r["layer"] == 1}
        pruned = sorted((f for f in rs if rs[f]["car_rank"] is not None), key=lambda f: rs[f]["car_rank"])
        k = rs[0]["k"]
        order = pruned + [f for f in range(len(w)) if f not in pruned]
        kh, kw = w.shape[2:]
        canvas = np.ones((kh + 2, len(order) * (kw + 1) + 1, 3))
        for pos, f in enumerate(order):
            tile = w[f].permute(1, 2, 0).double()  # (kh, kw, 3)
            tile = 0.5 + 0.5 * tile / tile.abs().max().clamp_min(1e-12)  # zero weight = mid grey
            canvas[1 : 1 + kh, 1 + pos * (kw + 1) : 1 + pos * (kw + 1) + kw] = tile.numpy()
        ax.imshow(canvas, interpolation="nearest")
        for pos, f in enumerate(order):
            x0 = 0.5 + pos * (kw + 1)
            if pos < k and rs[f]["car_rank"] is not None:
                ax.add_patch(Rectangle((x0 - 0.5, 0.5 - 0.5), kw + 1, kh + 1, fill=False, edgecolor="red", lw=1.2))
            if rs[f]["is_colour"]:
                ax.plot(x0 + kw / 2, kh + 1.6, marker="o", ms=2.5, color="black", clip_on=False)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"seed {run[0]}\n{run[1]}", rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle("first-layer filters in pruning order (red frame: first k removed; dot: colour filter)",
                 fontsize=8)
    return fig


# ---------------------------------------------------------------- driver


def run_report(opts: ReportOptions, overrides: list[str], log=print) -> dict:
    """Run every (seed, variant), write the table, the summary and the figure; return the summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    configs = _configs(opts, overrides)  # every check before any training
    out = Path(opts.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    rows, infos = [], []
    t0 = time.perf_counter()
    for seed, variant, cfg in configs:
        run_rows, info = _one_run(seed, variant, cfg, opts, log)
        rows += run_rows
        infos.append(info)
    pq.write_table(pa.Table.from_pylist(rows), out / "colour_filters.parquet")
    return _write_summary(out, opts, overrides, infos, time.perf_counter() - t0, log)


def _write_summary(out: Path, opts: ReportOptions, overrides: list[str], infos: list[dict], seconds: float,
                   log) -> dict:
    """Statistics, markdown and figure from ``out/colour_filters.parquet``, as written."""
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "colour_filters.parquet").to_pylist()
    summary = summarise(rows, opts.permutations)
    result = {"options": {**opts.__dict__, "seeds": list(opts.seeds), "variants": list(opts.variants)},
              "overrides": overrides, "runs": infos, "summary": summary, "seconds": seconds}
    (out / "colour_summary.json").write_text(json.dumps(result, indent=2, default=str))
    text = markdown(summary, infos, opts)
    (out / "colour_report.md").write_text(text)
    figure(rows).savefig(out / "colour_filters.png", dpi=160, bbox_inches="tight")
    log(text)
    log(f"wrote {out / 'colour_filters.parquet'}, {out / 'colour_summary.json'}, {out / 'colour_filters.png'}")
    return result


def merge_reports(folders: list[str], opts: ReportOptions, log=print) -> dict:
    """One report from several (e.g. one seed per process, run in parallel): their tables
    concatenated, the statistics and the figure recomputed from them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = [Path(f).expanduser() for f in folders]
    missing = [str(p) for p in paths if not (p / "colour_filters.parquet").is_file()]
    require(not missing, "--merge", "folders written by the report (with colour_filters.parquet)", " ".join(missing))
    tables = [pq.read_table(p / "colour_filters.parquet") for p in paths]
    infos = [i for p in paths for i in json.loads((p / "colour_summary.json").read_text())["runs"]]
    runs = [(i["seed"], i["variant"]) for i in infos]
    require(len(set(runs)) == len(runs), "--merge", "folders of distinct (seed, variant) runs", runs)
    out = Path(opts.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.concat_tables(tables, promote_options="default"), out / "colour_filters.parquet")
    seeds = tuple(sorted({s for s, _ in runs}))
    variants = tuple(dict.fromkeys(v for _, v in runs))
    opts = ReportOptions(**{**opts.__dict__, "seeds": seeds, "variants": variants})
    return _write_summary(out, opts, [], infos, sum(sum(i["order_seconds"].values()) for i in infos), log)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        opts, overrides, merge = _parse(argv)
        if merge is not None:
            merge_reports(merge, opts)
        else:
            run_report(opts, overrides)
    except ValueError as err:  # bad input, or data files missing (found only when loading)
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
