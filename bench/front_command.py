"""What writing each trial's rebuilding command costs a search's end (search.command.RunCommand).

    python bench/front_command.py [--trials 1000] [--repeats 5]

Times, on the default search config: building the RunCommand once (it composes trainables.run's
config for the search's groups), then the command of ``--trials`` sampled trial configs (a third
each uniform, differential and per_layer, drawn with a seeded RNG), and checks that each command
composes back to the trial's settings for the first 20 of them. Prints medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import random
import shlex
import statistics
import time
from dataclasses import asdict


def _trials(n: int, n_units: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        trial = {"criterion": rng.choice(["l1", "fpgm", "taylor", "apoz"]), "p": rng.uniform(0, 0.05),
                 "q": rng.uniform(0.1, 0.4), "lr": 10 ** rng.uniform(-3, -1.5)}
        kind = ("uniform", "differential", "per_layer")[i % 3]
        if kind == "uniform":
            trial.update(schedule="uniform", ratio=rng.uniform(0.1, 0.8))
        elif kind == "differential":
            low = rng.uniform(0.1, 0.8)
            trial.update(schedule="differential", ratio_low=low, ratio_high=rng.uniform(low, 0.8))
        else:
            trial.update(schedule="per_layer", **{f"ratio_{u}": rng.uniform(0.1, 0.8) for u in range(n_units)})
        out.append(trial)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from search._session import trial_prune
    from search.command import RunCommand
    from trainables.cli.compose import compose, configs_of, load_run_config
    from trainables.ray_trainable import TrialContext, trial_configs

    cfg = compose("launch", [])
    prune, finetune, measure, _ = configs_of(cfg)
    ctx = TrialContext("small_cnn", {}, 10, {}, {}, prune=trial_prune(cfg, prune)[0], finetune=asdict(finetune),
                       measure=asdict(measure), seed=0)
    trials = _trials(args.trials, 5, seed=0)
    settings = [trial_configs(ctx, t) for t in trials]
    init_s, per_trial_ms = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        builder = RunCommand(cfg)
        t1 = time.perf_counter()
        commands = [builder.command(*s, seed=0, trial=t) for s, t in zip(settings, trials, strict=True)]
        t2 = time.perf_counter()
        init_s.append(t1 - t0)
        per_trial_ms.append(1e3 * (t2 - t1) / len(trials))
    for command, (p, f, m) in list(zip(commands, settings, strict=True))[:20]:
        back = configs_of(load_run_config(shlex.split(command)[3:]))[:3]
        assert back == (p, f, m), command
    print(f"RunCommand(cfg): median {statistics.median(init_s):.3f} s over {args.repeats} builds")
    print(f"command per trial: median {statistics.median(per_trial_ms):.3f} ms over {args.repeats} x {args.trials} trials")
    print(f"commands composed back to their trial's settings: 20 of 20; longest {max(map(len, commands))} characters")


if __name__ == "__main__":
    main()
