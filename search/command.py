"""The ``python -m trainables.run ...`` command that rebuilds one trial of a search.

A front row is only an answer if a reader can run it again. The search's trial config holds
sampled values under Optuna's names (``ratio_0``, ``lr``, ``weight_l1``); the run command line
reads Hydra keys (``prune.ratios``, ``finetune.lr``, ``criterion.weights``). This module maps
one to the other:

* :func:`searched_keys`: a trial config under command-line key names (MLflow params,
  ``trials.parquet``'s ``config_json``), from the config alone.
* :class:`RunCommand`: built once per search from its resolved config; ``command(...)`` gives
  a trial's full command: the group choices (``task=``, ``data=``, ``model=``, ``criterion=``)
  and every key whose value differs from what ``trainables.run`` composes by default for those
  choices (the search's own settings such as ``prune.score_batches=2``, the data root, the base
  model's pretraining, and the trial's sampled values). Keys equal to the default are left out,
  so a command shows only what matters and never sets a key the chosen schedule does not read.

No Ray, Optuna or MLflow here: the tracker, the results and the tests all use it.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from typing import Any

__all__ = ["RUN_MODULE", "RunCommand", "hydra_value", "searched_keys"]

RUN_MODULE = "trainables.run"

# Trial config key (search/space.py, a study cell) -> the run command's key.
_KEY_OF = {
    "criterion": "criterion", "method": "prune.method", "schedule": "prune.schedule", "ratio": "prune.ratio",
    "ratio_low": "prune.ratio_low", "ratio_high": "prune.ratio_high", "p": "prune.p", "q": "prune.q",
    "target_flops_reduction": "prune.target_flops_reduction", "lr": "finetune.lr", "seed": "seed",
    "fraction": "data.fraction",
}
_PER_UNIT = re.compile(r"ratio_(\d+)$")
_FACTOR = re.compile(r"weight_g(\d+)_(.+)$")  # a layerwise blend's factor: group i, candidate
# Top-level keys of the run config that change where output goes or what is printed, never a number.
_NOT_SETTINGS = frozenset({"progress", "output_dir"})
# Sub-trees of the run config that a trial sets itself (from its effective prune/fine-tune/measure
# configs); the others (data, model, seed, ...) come from the search's config.
_TRIAL_TREES = frozenset({"prune", "finetune", "measure", "criterion"})
# FinetuneConfig fields that the run command reads from the data group.
_FINETUNE_FROM_DATA = {"batch_size": "data.batch_size", "eval_batch_size": "data.eval_batch_size"}


def searched_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial config (flat, as the search samples it) under the run command's key names.

    ``ratio_<i>`` become one list ``prune.ratios`` (with ``prune.schedule=per_layer``, which
    those keys imply); a blend's factors ``weight_<candidate>`` become one map
    ``criterion.weights`` (a layerwise blend's ``weight_g<i>_<candidate>``: the map
    ``criterion.options.groups.<i>.weights`` of group ``i``); keys the run command does not know
    (a study's ``cell`` index) keep their name. A front fine-tuning trial's ``front_config`` is
    unwrapped: it re-runs that config.
    """
    config = config.get("front_config", config)
    out: dict[str, Any] = {}
    per_unit: dict[int, float] = {}
    for key, value in config.items():
        unit = _PER_UNIT.match(key)
        if unit:
            per_unit[int(unit[1])] = value
        elif key.startswith("weight_"):
            group = _FACTOR.match(key)
            weights, candidate = ((f"criterion.options.groups.{group[1]}.weights", group[2]) if group
                                  else ("criterion.weights", key[len("weight_"):]))
            out.setdefault(weights, {})[candidate] = value
        else:
            out[_KEY_OF.get(key, key)] = value
    if per_unit:
        out["prune.schedule"] = "per_layer"
        out["prune.ratios"] = [per_unit[i] for i in sorted(per_unit)]
    return out


def hydra_value(value: Any) -> str:
    """``value`` in Hydra's override grammar, read back as the same value (and type)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # the shortest text that reads back as the same float
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{_hydra_str(str(k))}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    return _hydra_str(str(value))


# Unquoted, Hydra reads these as strings; anything else (spaces, commas, brackets, a text that
# would parse as a number, bool or null) is quoted.
_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./:+-]*")
_NOT_STRINGS = re.compile(r"(?i)(true|false|null|nan|inf|[-+]?\d.*)")


def _hydra_str(text: str) -> str:
    if _PLAIN.fullmatch(text) and not _NOT_STRINGS.fullmatch(text):
        return text
    # Hydra reads a backslash literally unless it precedes a quote (or ends the string).
    escaped = re.sub(r"(\\*)(?='|$)", lambda m: m[1] * 2, text).replace("'", "\\'")
    return "'" + escaped + "'"


def _leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf; a list or an empty mapping is one leaf."""
    if isinstance(tree, Mapping) and tree:
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], tree


def _select(tree: Mapping, dotted: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _group_choice(group: str, wanted: Mapping, conf_dir) -> str:
    """The option of config group ``group`` (a file ``conf/<group>/<option>.yaml``) that
    ``wanted`` (the search's composed ``cfg.<group>``) was built from: among the options holding
    every key of ``wanted``, one with the same ``name`` (the registry entry it selects) first,
    then the fewest differing values, then the option file named like ``wanted``."""
    from omegaconf import OmegaConf

    best: tuple[tuple[bool, int, bool], str] | None = None
    for path in sorted((conf_dir / group).glob("*.yaml")):
        option = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        option = {k: v for k, v in option.items() if k != "defaults"}
        differing = 0
        for key, value in _leaves(wanted):
            present, there = _select(option, key)
            if not present and not _under_empty_map(option, key):
                differing = -1
                break
            differing += there != value
        if differing < 0:
            continue
        rank = (option.get("name") != wanted.get("name"), differing, path.stem != wanted.get("name"))
        if best is None or rank < best[0]:
            best = (rank, path.stem)
    if best is None:
        raise ValueError(f"no option of conf/{group} holds the keys of the search's {group} config "
                         f"(name={wanted.get('name')!r}); cannot write the run command")
    return best[1]


def _under_empty_map(tree: Mapping, dotted: str) -> bool:
    """Whether ``dotted`` lies inside a map the option leaves empty (``model.kwargs: {}``)."""
    parts = dotted.split(".")
    for i in range(1, len(parts)):
        present, node = _select(tree, ".".join(parts[:i]))
        if present and isinstance(node, Mapping) and not node:
            return True
    return False


class RunCommand:
    """Writes the ``python -m trainables.run`` command of each trial of one search.

    ``cfg`` is the search's composed config (``conf/launch.yaml``: the run config plus
    ``search.*`` and the launch keys). What every trial shares is worked out once here: the
    group choices and the run-level keys (data, model, seed, cache, threads per trial) that
    differ from ``trainables.run``'s composition of those choices.
    """

    def __init__(self, cfg: Any) -> None:
        from omegaconf import OmegaConf

        from trainables.cli.compose import CONF_DIR

        self._conf_dir = CONF_DIR
        resolved = OmegaConf.to_container(cfg, resolve=True)
        self._task = _task_of(resolved)
        self._groups: dict[str, str] = {}
        task_defaults = self._compose([] if self._task == "classification" else [f"task={self._task}"])
        for group in ("data", "model"):
            choice = _group_choice(group, resolved[group], CONF_DIR)
            if choice != _group_choice(group, task_defaults[group], CONF_DIR):
                self._groups[group] = choice
        self._defaults: dict[str, dict] = {}  # criterion -> trainables.run's composed config
        shared = self._defaults_for(str(resolved["criterion"]["name"]))
        self._shared: dict[str, Any] = {}
        for key, value in _leaves({k: v for k, v in resolved.items() if k in shared and k not in _TRIAL_TREES
                                   and k not in _NOT_SETTINGS}):
            present, default = _select(shared, key)
            if not present or default != value:
                self._shared[key] = value
        # A trial runs with cfg.trial_threads torch threads, not the run config's `threads`.
        if "trial_threads" in resolved and resolved["trial_threads"] != shared.get("threads"):
            self._shared["threads"] = resolved["trial_threads"]
        self._shared.pop("seed", None)  # the trial's own seed (a study cell's, or cfg.seed) is set per trial

    def _compose(self, overrides: list[str]) -> dict:
        from omegaconf import OmegaConf

        from trainables.cli.compose import compose

        return OmegaConf.to_container(compose("config", overrides), resolve=True)

    def _choices(self, criterion: str) -> list[str]:
        task = [] if self._task == "classification" else [f"task={self._task}"]
        return [*task, *(f"{g}={c}" for g, c in self._groups.items()), f"criterion={criterion}"]

    def _defaults_for(self, criterion: str) -> dict:
        if criterion not in self._defaults:
            self._defaults[criterion] = self._compose(self._choices(criterion))
        return self._defaults[criterion]

    def overrides(self, prune: Any, finetune: Any, measure: Any, seed: int,
                  trial: Mapping[str, Any] | None = None) -> list[str]:
        """The command-line arguments (``key=value``, unquoted for the shell) of one trial.

        ``prune``, ``finetune`` and ``measure`` are the trial's effective configs
        (``trainables.ray_trainable.trial_configs``), ``seed`` its seed, ``trial`` its config
        (a study cell's ``fraction`` sets ``data.fraction``).
        """
        defaults = self._defaults_for(prune.criterion)
        values: dict[str, Any] = {}  # the trial's own settings first, then what the search shares
        prune_values = asdict(prune)
        options = prune_values.pop("criterion_options")
        prune_values.pop("criterion")
        values.update({f"prune.{k}": v for k, v in prune_values.items()})
        declared = {k for k in defaults["criterion"] if k not in ("name", "options")}
        loose = {k: v for k, v in options.items() if k not in declared}
        values.update({f"criterion.{k}": v for k, v in options.items() if k in declared})
        values.update({f"criterion.options.{k}": v for k, v in loose.items()})
        for key, value in asdict(finetune).items():
            values[_FINETUNE_FROM_DATA.get(key, f"finetune.{key}")] = value
        values.update({f"measure.{k}": v for k, v in asdict(measure).items()})
        values["seed"] = seed
        values.update({k: v for k, v in self._shared.items() if k not in values})
        if trial and "fraction" in trial:
            values["data.fraction"] = trial["fraction"]
        args = self._choices(prune.criterion)
        for key, value in values.items():
            present, default = _select(defaults, key)
            if present and default == value:
                continue
            if not present and value is None:
                continue  # a field the run config does not declare, left at "not set"
            # A key inside a free-form map that the run config leaves empty is added with '+'.
            args.append(f"{'' if present else '+'}{key}={hydra_value(value)}")
        return args

    def command(self, prune: Any, finetune: Any, measure: Any, seed: int,
                trial: Mapping[str, Any] | None = None) -> str:
        """The shell command that rebuilds the trial (see :meth:`overrides`)."""
        args = self.overrides(prune, finetune, measure, seed, trial)
        return " ".join(["python", "-m", RUN_MODULE, *(shlex.quote(a) for a in args)])


def _task_of(resolved: Mapping) -> str:
    """The task the search's model solves (``task=`` of the run command)."""
    from trainables.core.models import MODELS

    try:
        return MODELS.get(resolved["model"]["name"]).task
    except (KeyError, ValueError):  # a model from outside the registry is a classifier
        return "classification"
