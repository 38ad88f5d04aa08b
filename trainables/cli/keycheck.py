"""What a command line may set: declared keys only, and only settings the run will read.

Three checks, run by ``trainables.cli.compose.compose`` before any data is read or model built:

- ``check_keys``: every ``key=value`` (also ``+key`` and ``++key``) names a key that ``conf/``
  declares for the chosen groups, or one under a free-form map (``model.kwargs.*``, ...). A
  misspelt key is refused with its close matches, never added and ignored. Runs on the YAML
  files alone (``trainables.cli.confdoc``), before Hydra or torch is imported.
- ``check_unread``: a setting the user changed that the chosen schedule, method or search does
  not read (``prune.ratios`` without ``prune.schedule=per_layer``, ``prune.steps`` without
  ``prune.method=iterative``, ...) is refused in one line naming the setting it goes with.
  ``UNREAD_RULES`` is the table (the docs' "refused pairs" are generated from it).
- ``check_data``: the data settings every data set shares (fraction, val_size, batch sizes).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

from trainables.cli.confdoc import (
    CONF_DIR,
    FREE_FORM,
    compose_light,
    flatten,
    group_options,
    split_override,
)

__all__ = ["UNREAD_RULES", "Keys", "Rule", "check_data", "check_keys", "check_unread", "suggest"]

DIFFERENTIAL = ("differential", "differential_depth", "differential_inverted", "differential_depth_inverted")
# The protocol's methods by what they read (trainables.protocol.stages): one_shot has no per-unit
# fine-tuning (prune.p), control prunes nothing (so plans nothing), only iterative has steps.
WITH_P = ("layer_by_layer", "iterative", "control", "scratch", "greedy_car")
PLANNING = ("layer_by_layer", "one_shot", "iterative", "scratch", "greedy_car")
SCORING = ("layer_by_layer", "one_shot", "iterative")  # the methods whose filters the criterion chooses


@dataclass
class Keys:
    """The command line's overrides, checked: what Hydra is given, and the keys the user typed
    with the values they would have had (the composition of ``conf/`` with the user's groups)."""

    hydra_overrides: list[str]
    typed: list[str] = field(default_factory=list)
    defaults: dict[str, Any] = field(default_factory=dict)  # flat: key -> composed default
    groups_changed: list[str] = field(default_factory=list)  # groups chosen away from their default

    def changed(self, values: Mapping) -> set[str]:
        """The typed keys whose composed value differs from the default (``prune.ratio=0.5``
        restates the default and is not a change), plus the groups chosen otherwise."""
        flat = flatten(values, keep_maps=True)
        return {k for k in self.typed if flat.get(k) != self.defaults.get(k)} | set(self.groups_changed)


def suggest(key: str, declared: Iterable[str]) -> list[str]:
    """Up to three declared keys close to ``key``: the same last part first (``ratio`` ->
    ``prune.ratio``), then close spellings of the whole key or of its last part."""
    declared = sorted(set(declared))
    last = key.rsplit(".", 1)[-1]
    same_last = [d for d in declared if d.rsplit(".", 1)[-1] == last and d != key]
    whole = difflib.get_close_matches(key, declared, n=3, cutoff=0.75)
    by_last: dict[str, list[str]] = {}
    for d in declared:
        by_last.setdefault(d.rsplit(".", 1)[-1], []).append(d)
    parts = [d for name in difflib.get_close_matches(last, list(by_last), n=3, cutoff=0.75) for d in by_last[name]]
    # Among equal last parts, the ones sharing the typed prefix first (prune.ratoi -> prune.ratio).
    head = key.rsplit(".", 1)[0] if "." in key else ""
    ranked = sorted(dict.fromkeys(same_last + whole), key=lambda d: not d.startswith(head)) or parts
    return list(dict.fromkeys([*[d for d in ranked if d in whole], *ranked]))[:3]


def _elsewhere(config_name: str, key: str, choices: Mapping[str, str]) -> str | None:
    """``"data=coloured_fashion_mnist"`` when ``key`` is declared by another option of a group."""
    for group, chosen in choices.items():
        if not (CONF_DIR / group).is_dir():
            continue
        for option in group_options(group):
            if option == chosen:
                continue
            try:
                other = compose_light(config_name, {**choices, group: option})
            except ValueError:
                continue
            if key in flatten(other.values, keep_maps=True):
                return f"{group}={option}"
    return None


def _free_form(key: str, declared: Mapping, config_name: str) -> bool:
    """Under a free-form map the chosen groups declare (criterion.weights is blended's alone);
    a search reads search.prune_overrides whether its search config declares it or not."""
    return any((key == f or key.startswith(f"{f}.")) and (f in declared or (
        f == "search.prune_overrides" and config_name == "launch")) for f in FREE_FORM)


def check_keys(config_name: str, overrides: Iterable[str]) -> Keys:
    """Refuse an override whose key ``conf/<config_name>.yaml`` (with the chosen groups) does not
    declare; return the overrides as Hydra should get them (``+``/``++`` dropped for declared
    keys, ``++`` for free-form ones, so either spelling sets the value)."""
    parsed = [(text, *split_override(text)) for text in overrides]
    for text, prefix, key, value in parsed:
        if not key or (value is None and prefix != "~"):
            raise ValueError(f"arguments must be key=value overrides (the keys are listed by --help), but got {text!r}")
    defaults_light = compose_light(config_name)
    groups = {key: value for _, prefix, key, value in parsed
              if prefix in ("", "+") and (CONF_DIR / key).is_dir() and key in defaults_light.choices}
    light = compose_light(config_name, groups)  # an unknown option of a group fails here
    flat = flatten(light.values, keep_maps=True)
    out = Keys(hydra_overrides=[], defaults=flat,
               groups_changed=[g for g, o in groups.items() if defaults_light.choices.get(g) != o])
    for text, prefix, key, value in parsed:
        if key in groups:
            out.hydra_overrides.append(f"{key}={value}")
        elif _free_form(key, flat, config_name):
            out.hydra_overrides.append(text if prefix == "~" else f"++{key}={value}")
        elif key in flat:
            if prefix == "~":
                raise ValueError(f"{key} must be set, not removed (~{key}): every declared key is read; "
                                 f"give {key}=<value> instead")
            out.hydra_overrides.append(f"{key}={value}")
            out.typed.append(key)
        else:
            raise ValueError(_unknown(config_name, key, flat, light.choices))
    return out


def _unknown(config_name: str, key: str, declared: Iterable[str], choices: Mapping[str, str]) -> str:
    close = suggest(key, [*declared, *[g for g in choices if (CONF_DIR / g).is_dir()]])
    where = _elsewhere(config_name, key, choices)
    text = f"unknown key '{key}'"
    if where:
        text += f" (it is a key of {where}, not of the chosen {where.split('=')[0]}={choices[where.split('=')[0]]})"
    if close:
        text += f"; did you mean {' or '.join(close)}?"
    else:
        text += "; the keys are listed by --help"
    return text


# ---------------------------------------------------------------- settings that would not be read

@dataclass(frozen=True)
class Rule:
    """``key`` is read only when ``reads(context)``; ``goes_with`` says with what, for the error
    and the docs' table. ``context`` maps ``method``, ``schedule``, ``criterion`` to the sets the
    run (or every trial of a search) uses, and ``get`` reads any other key."""

    key: str
    goes_with: str
    reads: Callable[[dict], bool]
    got: Callable[[dict], str]  # what the run has instead, for the error


def _any(name: str, allowed: Iterable[str]) -> Callable[[dict], bool]:
    allowed = tuple(allowed)
    return lambda ctx: bool(ctx[name] & set(allowed))


def _shown(name: str) -> Callable[[dict], str]:
    label = {"method": "prune.method", "schedule": "prune.schedule", "criterion": "criterion"}[name]
    return lambda ctx: f"{label}={'|'.join(sorted(ctx[name]))}"


def _key_is(key: str) -> Callable[[dict], str]:
    return lambda ctx: f"{key}={_yaml(ctx['get'](key))}"


def _yaml(value: Any) -> str:
    """A value as it is typed on the command line: null, true, [a, b], {low: 0.1, high: 0.8}."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip().removesuffix("\n...").strip()


UNREAD_RULES: tuple[Rule, ...] = (
    Rule("prune.ratios", "prune.schedule=per_layer", _any("schedule", ["per_layer"]), _shown("schedule")),
    Rule("prune.ratio_low", f"prune.schedule={'|'.join(DIFFERENTIAL)}", _any("schedule", DIFFERENTIAL),
         _shown("schedule")),
    Rule("prune.ratio_high", f"prune.schedule={'|'.join(DIFFERENTIAL)}", _any("schedule", DIFFERENTIAL),
         _shown("schedule")),
    Rule("prune.ratio", "prune.schedule=uniform|global", _any("schedule", ["uniform", "global"]), _shown("schedule")),
    Rule("prune.global_min_keep", "prune.schedule=global", _any("schedule", ["global"]), _shown("schedule")),
    # A FLOPs target scales the schedule's shape; uniform's single ratio is then the plan's.
    Rule("prune.ratio", "prune.target_flops_reduction=null (a FLOPs target sets the ratio)",
         lambda ctx: ctx["get"]("prune.target_flops_reduction") is None, _key_is("prune.target_flops_reduction")),
    Rule("prune.steps", "prune.method=iterative", _any("method", ["iterative"]), _shown("method")),
    # p=0 states what one_shot does anyway (no fine-tuning between cuts), so it is not refused.
    Rule("prune.p", f"prune.method={'|'.join(WITH_P)} (one_shot fine-tunes only at the end: prune.q)",
         lambda ctx: _any("method", WITH_P)(ctx) or ctx["get"]("prune.p") == 0, _shown("method")),
    Rule("prune.target_flops_reduction", f"prune.method={'|'.join(PLANNING)} (control prunes nothing)",
         _any("method", PLANNING), _shown("method")),
    Rule("prune.rescore_every", "prune.method=greedy_car", _any("method", ["greedy_car"]), _shown("method")),
    Rule("prune.greedy_retrain_steps", "prune.method=greedy_car", _any("method", ["greedy_car"]), _shown("method")),
    Rule("prune.target_classes", "criterion=class_specific", _any("criterion", ["class_specific"]),
         _shown("criterion")),
    Rule("prune.adapt_bn_batch_size", "prune.adapt_bn_batches >= 1",
         lambda ctx: (ctx["get"]("prune.adapt_bn_batches") or 0) >= 1, _key_is("prune.adapt_bn_batches")),
    # greedy_car chooses filters by CAR itself: criterion=car states that (a search records it so).
    Rule("criterion", f"prune.method={'|'.join(SCORING)} (control and scratch choose no filters by a criterion; "
         "greedy_car by CAR: criterion=car)",
         lambda ctx: _any("method", SCORING)(ctx) or ("greedy_car" in ctx["method"] and ctx["criterion"] == {"car"}),
         _shown("method")),
    Rule("search.asha", "search.scheduler=asha", lambda ctx: ctx["get"]("search.scheduler") == "asha",
         _key_is("search.scheduler")),
    Rule("search.population_size", "search.sampler=nsga2|cmaes",
         lambda ctx: ctx["get"]("search.sampler") in ("nsga2", "cmaes"), _key_is("search.sampler")),
    Rule("search.proxy", "search.fidelity=proxy", lambda ctx: ctx["get"]("search.fidelity") == "proxy",
         _key_is("search.fidelity")),
    Rule("search.finetune_front", "search.fidelity=proxy", lambda ctx: ctx["get"]("search.fidelity") == "proxy",
         _key_is("search.fidelity")),
    # A proxy front is one-shot pruned with a few proxy steps: not a model to deploy.
    Rule("search.export", "search.fidelity=full, or search.finetune_front >= 1 (a proxy search exports the "
         "fine-tuned candidates)",
         lambda ctx: ctx["get"]("search.fidelity") in (None, "full") or (ctx["get"]("search.finetune_front") or 0) >= 1,
         lambda ctx: f"search.fidelity={ctx['get']('search.fidelity')} and "
                     f"search.finetune_front={_yaml(ctx['get']('search.finetune_front'))}"),
    Rule("search.blend.stages", "search.blend.layerwise=stage",
         lambda ctx: ctx["get"]("search.blend.layerwise") == "stage", _key_is("search.blend.layerwise")),
    Rule("search.retime", "measure.latency=true", lambda ctx: ctx["get"]("measure.latency") is True,
         _key_is("measure.latency")),
    Rule("search.retime.layers", "search.retime.scope=front|auto",
         lambda ctx: ctx["get"]("search.retime.scope") in ("front", "auto"), _key_is("search.retime.scope")),
    Rule("search.retime.all_up_to", "search.retime.scope=auto",
         lambda ctx: ctx["get"]("search.retime.scope") == "auto", _key_is("search.retime.scope")),
)

# What a search chooses per trial (search.space), so the run config's value is not read:
# (key, the search key that samples it)
SEARCHED = (("prune.schedule", "search.ratio"), ("prune.ratio", "search.ratio"), ("prune.ratio_low", "search.ratio"),
            ("prune.ratio_high", "search.ratio"), ("prune.ratios", "search.ratio"), ("prune.p", "search.p"),
            ("prune.q", "search.q"), ("finetune.lr", "search.lr"))


def _context(config_name: str, values: Mapping) -> dict:
    flat = flatten(values, keep_maps=True)
    get = flat.get
    prune = {**(values.get("prune") or {}), **((values.get("search") or {}).get("prune_overrides") or {})}
    methods = {prune.get("method")}
    criteria = {(values.get("criterion") or {}).get("name")}
    schedules = {prune.get("schedule")}
    if config_name == "launch":
        search = values.get("search") or {}
        listed = search.get("criteria") or []
        if "greedy_car" in listed:  # a trial that draws it runs prune.method=greedy_car
            methods.add("greedy_car")
        criteria = set(listed) or criteria
        if search.get("ratio") is not None:  # each trial draws its schedule from search.schedules
            schedules = set(search.get("schedules") or []) or schedules
    return {"method": methods, "schedule": schedules, "criterion": criteria, "get": get}


def check_unread(config_name: str, values: Mapping, changed: Iterable[str]) -> None:
    """Refuse a changed setting that the run would not read (one line: which key goes with
    which setting). ``values`` is the composed config as plain containers."""
    changed = set(changed)
    ctx = _context(config_name, values)
    search = values.get("search") or {}
    if config_name == "launch":
        if "criterion" in changed:
            raise ValueError(f"criterion is chosen per trial by the search (search.criteria={_yaml(search.get('criteria'))}); "
                             "set search.criteria instead of criterion=")
        for key, sampler in SEARCHED:
            if key in changed and ctx["get"](sampler) is not None:
                raise ValueError(f"{key} is chosen per trial by the search ({sampler}="
                                 f"{_yaml(ctx['get'](sampler))}); set {sampler} (or {sampler}=null to keep {key})")
    # A study sets criterion, method, ratio and FLOPs target per cell (study.*): only the
    # schedule's own keys are checked there.
    study_skips = ("criterion", "prune.method", "prune.ratio", "prune.target_flops_reduction", "prune.steps",
                   "prune.p", "prune.rescore_every", "prune.greedy_retrain_steps")
    for rule in UNREAD_RULES:
        hit = [k for k in changed if k == rule.key or k.startswith(f"{rule.key}.")]
        if not hit or (config_name == "study" and rule.key in study_skips):
            continue
        if config_name == "launch" and any(rule.key == k for k, _ in SEARCHED):
            continue  # checked above: the search chooses it, or it is fixed and read as such
        if not rule.reads(ctx):
            raise ValueError(f"{hit[0]} is read only with {rule.goes_with}, but got {rule.got(ctx)}; "
                             f"drop {hit[0]} or change that setting")


# ---------------------------------------------------------------- data settings

def _number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_data(values: Mapping) -> None:
    """The data settings every data set shares, checked before any data is read (the same
    rules ``data.get_data`` applies, here so that a bad one fails before the base model trains)."""
    data = values.get("data") or {}
    fraction = data.get("fraction", 1.0)
    if not (_number(fraction) and 0 < fraction <= 1):
        raise ValueError(f"data.fraction must be a number in (0, 1], but got {fraction!r}")
    val_size = data.get("val_size", 0)
    if not ((_int(val_size) and val_size >= 0) or (_number(val_size) and not _int(val_size) and 0 < val_size < 1)):
        raise ValueError(f"data.val_size must be an image count >= 0 or a share in (0, 1), but got {val_size!r}")
    for key in ("batch_size", "eval_batch_size"):
        if key in data and not (_int(data[key]) and data[key] >= 1):
            raise ValueError(f"data.{key} must be an integer >= 1, but got {data[key]!r}")
    if "num_workers" in data and not (_int(data["num_workers"]) and data["num_workers"] >= 0):
        raise ValueError(f"data.num_workers must be an integer >= 0, but got {data['num_workers']!r}")
    if "seed" in data and not (_int(data["seed"]) and data["seed"] >= 0):
        raise ValueError(f"data.seed must be an integer >= 0, but got {data['seed']!r}")
    for key in ("download", "remap_labels"):
        if key in data and not isinstance(data[key], bool):
            raise ValueError(f"data.{key} must be true or false, but got {data[key]!r}")
    root = data.get("root")
    if root is not None and not isinstance(root, str):
        raise ValueError(f"data.root must be a folder path or null, but got {root!r}")
