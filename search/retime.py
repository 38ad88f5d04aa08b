"""Latency a user can trust: the driver re-times the finished trials' models one at a time.

A trial times its pruned model while other trials train on the same cores, so its
``latency_ms`` measures the neighbours as much as the model (seen on the default search: a
0.5 MFLOPs model timed 14.4 ms while a 6.2 MFLOPs one timed 6.5 ms). After the trials end
nothing else runs, so the driver times every model again, in rounds: each round times the
unpruned base and then every model in a fresh, seeded order, so slow drifts of the machine
(another process, clock changes) hit all models alike, and each model's latency is also
reported as a ratio to the base timed in the same round. The rounds are split in two halves
whose rankings must agree (Spearman's rho): the number that says whether the timing can be
trusted on this machine at this moment.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from trainables.metrics import deployment_form, measure_latency

__all__ = ["Retimed", "retime_models"]


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
) -> Retimed:
    """Time ``models`` (name -> model) and ``base`` serially, ``rounds`` interleaved rounds.

    Each model is put in deployment form once (as ``measure_latency`` would), then timed
    ``repeats`` times per round after ``warmup`` passes. The models are not modified.
    """
    if rounds < 2:
        raise ValueError(f"search.retime.rounds must be an integer >= 2, but got {rounds!r}")
    nets = {name: deployment_form(m) for name, m in models.items()}
    base_net = deployment_form(base)
    rng = random.Random(seed)
    per_round: dict[str, list[float]] = {name: [] for name in nets}
    ratios: dict[str, list[float]] = {name: [] for name in nets}
    base_times: list[float] = []

    def time_one(net: nn.Module) -> float:
        return measure_latency(net, batch_size, input_shape=input_shape, threads=threads, warmup=warmup,
                               repeats=repeats, deploy=False)["median_ms"]

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
