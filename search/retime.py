"""Latency a user can trust: the finished trials' models re-timed one at a time, where they ran.

A trial times its pruned model while other trials train on the same cores, so its
``latency_ms`` measures the neighbours as much as the model (seen on the default search: a
0.5 MFLOPs model timed 14.4 ms while a 6.2 MFLOPs one timed 6.5 ms). After the trials end
nothing else runs, so every model is timed again, in rounds: each round times the
unpruned base and then every model in a fresh, seeded order, so slow drifts of the machine
(another process, clock changes) hit all models alike, and each model's latency is also
reported as a ratio to the base timed in the same round. The rounds are split in two halves
whose rankings must agree (Spearman's rho): the number that says whether the timing can be
trusted on this machine at this moment.

Where: a trial's model is timed on the node its trial ran on (trials.parquet's ``node_id``),
in one Ray task per node pinned there with the trial's resources (one CPU, and a GPU when
trials used one), all of a node's models in that one task, so nothing else of this search runs
there meanwhile. A driver on a CPU head would otherwise time models meant for GPU workers.
Always a task, even on a single machine: one code path, the one the tests run, for the price
of one worker start per node (bench/RESULTS.md, "Re-timing cost").

Which: at hundreds of trials, re-timing every model costs more than the search's front needs
(``search.retime.scope``); :func:`select_for_retiming` keeps the first non-dominated layers.
"""

from __future__ import annotations

import copy
import math
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from search.pareto import pareto_mask
from trainables.core.metrics import deployment_form, measure_latency

__all__ = ["SCOPES", "NodeTiming", "Retimed", "nondominated_layers", "retime_models", "retime_on_nodes",
           "select_for_retiming", "timing_device"]

SCOPES = ("auto", "all", "front")
"""``search.retime.scope``: auto (all up to ``all_up_to`` completed trials, else front), all, front."""


@dataclass
class Retimed:
    """Serial timings of a set of models against one base model."""

    latency_ms: dict[str, float]  # median over rounds of each round's median, per model
    latency_kept: dict[str, float]  # median over rounds of (model / base of the same round): share of base latency
    base_ms: float
    halves_spearman: float | None  # rank agreement of the two halves of the rounds (None: < 3 models)
    rounds: int


def retime_models(
    models: Mapping[str, nn.Module],
    base: nn.Module,
    *,
    input_shape: Sequence[int],
    batch_size: int = 64,
    threads: int | None = 1,
    rounds: int = 6,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    device: str = "cpu",
) -> Retimed:
    """Time ``models`` (name -> model) and ``base`` serially, ``rounds`` interleaved rounds.

    Each model is put in deployment form once on ``device`` (as ``measure_latency`` would),
    then timed ``repeats`` times per round after ``warmup`` passes. The models are not modified.
    """
    if rounds < 2:
        raise ValueError(f"search.retime.rounds must be an integer >= 2, but got {rounds!r}")

    def deployed(m: nn.Module) -> nn.Module:
        # built on the device it is timed on: deployment_form's fusions depend on it
        return deployment_form(m if device == "cpu" else copy.deepcopy(m).to(device))

    nets = {name: deployed(m) for name, m in models.items()}
    base_net = deployed(base)
    rng = random.Random(seed)
    per_round: dict[str, list[float]] = {name: [] for name in nets}
    ratios: dict[str, list[float]] = {name: [] for name in nets}
    base_times: list[float] = []

    def time_one(net: nn.Module) -> float:
        return measure_latency(net, batch_size, input_shape=input_shape, device=device, threads=threads,
                               warmup=warmup, repeats=repeats, deploy=False)["median_ms"]

    for _ in range(rounds):
        base_ms = time_one(base_net)
        base_times.append(base_ms)
        order = list(nets)
        rng.shuffle(order)
        for name in order:
            ms = time_one(nets[name])
            per_round[name].append(ms)
            ratios[name].append(ms / base_ms)
    return Retimed(
        latency_ms={n: statistics.median(t) for n, t in per_round.items()},
        latency_kept={n: statistics.median(r) for n, r in ratios.items()},
        base_ms=statistics.median(base_times),
        halves_spearman=_halves_agreement(per_round),
        rounds=rounds,
    )


def _halves_agreement(per_round: dict[str, list[float]]) -> float | None:
    """Spearman's rho between the models' medians over even rounds and over odd rounds."""
    if len(per_round) < 3:
        return None
    from scipy.stats import spearmanr

    names = sorted(per_round)
    even = [statistics.median(per_round[n][0::2]) for n in names]
    odd = [statistics.median(per_round[n][1::2]) for n in names]
    rho = spearmanr(even, odd).statistic
    return float(rho)


# ---- which models: the front and the layers nearest it ------------------------------------------


def nondominated_layers(score: Sequence[float], cost: Sequence[float]) -> list[int]:
    """Each point's non-dominated layer (0: the Pareto front of max ``score``, min ``cost``; 1:
    the front once layer 0 is removed; ...). Repeated ``pareto_mask`` sweeps: O(layers n log n)."""
    layer = [-1] * len(score)
    remaining, k = list(range(len(score))), 0
    while remaining:
        mask = pareto_mask([score[i] for i in remaining], [cost[i] for i in remaining])
        for i, on in zip(remaining, mask, strict=True):
            if on:
                layer[i] = k
        remaining, k = [i for i, on in zip(remaining, mask, strict=True) if not on], k + 1
    return layer


def _known(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def select_for_retiming(rows: Sequence[Mapping[str, Any]], cost: str, *, scope: str = "auto", layers: int = 2,
                        all_up_to: int = 100) -> list[str]:
    """Trial ids (in row order) of the completed ``rows`` whose models are re-timed.

    ``scope=all`` (or ``auto`` with at most ``all_up_to`` completed trials): every one.
    ``front``: the union of the first ``layers`` non-dominated layers of val_acc against each
    of: the search's ``cost`` column (so its front is always re-timed), FLOPs (the noise-free
    proxy of latency) and ``latency_ms_trial`` (the trial's own timing, noisy because other
    trials shared its cores). A trial outside all three is dominated by at least ``layers``
    trials in each; it keeps only ``latency_ms_trial`` and, with the latency objective, is not
    eligible for the front (its ``latency_ms`` is empty), so the latency front is the front of
    the re-timed trials.
    """
    if scope not in SCOPES:
        raise ValueError(f"search.retime.scope must be one of {', '.join(SCOPES)}, but got {scope!r}")
    done = [r for r in rows if r["status"] == "COMPLETED" and _known(r.get("val_acc"))]
    if scope == "all" or (scope == "auto" and len(done) <= all_up_to):
        return [r["trial_id"] for r in done]
    chosen: set[str] = set()
    # latency_ms is what re-timing fills: before it, the trial's own timing stands in for it
    for column in dict.fromkeys((cost if cost != "latency_ms" else "latency_ms_trial", "flops", "latency_ms_trial")):
        ranked = [r for r in done if _known(r.get(column))]
        depth = nondominated_layers([r["val_acc"] for r in ranked], [r[column] for r in ranked])
        chosen |= {r["trial_id"] for r, d in zip(ranked, depth, strict=True) if d < layers}
    return [r["trial_id"] for r in done if r["trial_id"] in chosen]


# ---- where: one pinned Ray task per node --------------------------------------------------------


def timing_device(device: str, threads: int | None) -> str:
    """What the timings describe: ``cuda: <GPU name>`` or ``cpu: <CPU model>, <n> threads``."""
    import torch

    if device.startswith("cuda"):
        return f"cuda: {torch.cuda.get_device_name(torch.device(device))}"
    name = platform.processor() or platform.machine()
    try:  # Linux names the CPU model only in /proc/cpuinfo (platform.processor() is often empty or x86_64)
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"cpu: {name}, {threads or torch.get_num_threads()} threads"


@dataclass
class NodeTiming:
    """One node's re-timing: on which node it ran, on what device, and the timings."""

    node_id: str  # where the task ran (the trials' node, unless that node was gone)
    device: str  # timing_device(): e.g. "cpu: Intel(R) Xeon(R) ..., 1 threads"
    timed: Retimed
    seconds: float  # wall time of the rounds (model loading excluded)


def _time_group(ctx: Any, items: Sequence[tuple[str, Any]], timing: dict[str, Any]) -> NodeTiming:
    """Runs in the node's Ray task: rebuild the group's models from their checkpoints, time them."""
    import ray
    import torch

    from trainables.ray_trainable import load_trial_model, trial_base_model

    device = "cuda" if ctx.use_gpu and torch.cuda.is_available() else "cpu"
    models = {}
    for trial_id, checkpoint in items:
        with checkpoint.as_directory() as d:
            models[trial_id] = load_trial_model(ctx, d)[0]
    start = time.perf_counter()
    timed = retime_models(models, trial_base_model(ctx), device=device, **timing)
    return NodeTiming(node_id=ray.get_runtime_context().get_node_id(), device=timing_device(device, timing["threads"]),
                      timed=timed, seconds=time.perf_counter() - start)


def retime_on_nodes(groups: Mapping[str, Sequence[tuple[str, Any]]], ctx: Any, *, log: Callable[[str], None] = print,
                    **timing: Any) -> dict[str, NodeTiming]:
    """Time each node's ``(trial id, Tune checkpoint)`` group in one Ray task pinned to that
    node (``NodeAffinitySchedulingStrategy``, not soft), holding what a trial held there: one
    CPU, and one GPU when ``ctx.use_gpu``. Nodes run their groups at the same time; within a
    node the models are timed serially. A node that is gone (a cluster scaled down after the
    trials) has its group timed wherever Ray finds those resources, said in one line; the
    returned ``node_id`` is where each task really ran. ``timing``: :func:`retime_models`'s
    keyword arguments."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    shared = ray.put(ctx)  # the base weights travel once, not once per node
    task = ray.remote(_time_group)
    pending = {}
    for node, items in groups.items():
        options: dict[str, Any] = {"num_cpus": 1, "num_gpus": 1 if ctx.use_gpu else 0, "max_retries": 0}
        if node in alive:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
        else:
            log(f"warning: node {node} of {len(items)} trial(s) is gone; their models are timed on another node")
        pending[node] = task.options(**options).remote(shared, list(items), timing)
    timed = {}
    for node, ref in pending.items():
        try:
            timed[node] = ray.get(ref)
        except ray.exceptions.TaskUnschedulableError:
            # The node died so recently that Ray still listed it alive (seen right after a worker
            # was lost mid-search): time its group wherever the resources are, as for a gone node.
            log(f"warning: node {node} of {len(groups[node])} trial(s) is gone; their models are timed on another node")
            options = {"num_cpus": 1, "num_gpus": 1 if ctx.use_gpu else 0, "max_retries": 0}
            timed[node] = ray.get(task.options(**options).remote(shared, list(groups[node]), timing))
    return timed
