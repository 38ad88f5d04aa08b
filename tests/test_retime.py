"""Re-timing where the trials ran, and only the models that matter at scale (search.retime).

Grouping and pinning run on the local Ray (one node): each group's task must run on the node
its trials name, and fill the device column. The scope selection is checked as a property
against an independent definition of the non-dominated layers.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import assert_refused
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from search import launch
from search.pareto import front_rows, mark_pareto
from search.results import _retime
from search.retime import nondominated_layers, select_for_retiming
from trainables.core.models import build_model
from trainables.core.surgery import describe_units, prune_layer
from trainables.ray_trainable import TrialContext

# ---- scope: which models are re-timed ----------------------------------------------------------


def _layers_by_definition(score: list[float], cost: list[float]) -> list[int]:
    """Layer 0 if nothing dominates a point, else 1 + the deepest layer of its dominators. An
    exact copy of an earlier point counts as dominating it (pareto_mask keeps the first copy)."""
    def dominates(j: int, i: int) -> bool:
        better = score[j] >= score[i] and cost[j] <= cost[i] and (score[j], cost[j]) != (score[i], cost[i])
        return better or ((score[j], cost[j]) == (score[i], cost[i]) and j < i)

    memo: dict[int, int] = {}

    def layer(i: int) -> int:
        if i not in memo:
            memo[i] = 1 + max((layer(j) for j in range(len(score)) if dominates(j, i)), default=-1)
        return memo[i]

    return [layer(i) for i in range(len(score))]


_value = st.integers(0, 6).map(lambda v: v / 6)  # few distinct values: ties and duplicates are common
_row = st.fixed_dictionaries({
    "status": st.sampled_from(["COMPLETED", "COMPLETED", "COMPLETED", "STOPPED_EARLY", "FAILED"]),
    "val_acc": _value, "flops": _value, "params": _value, "latency_ms_trial": st.one_of(st.none(), _value),
})


@settings(max_examples=150, deadline=None)
@given(st.lists(_row, max_size=30), st.integers(1, 3), st.sampled_from(["flops", "params", "latency_ms"]))
def test_scope_front_retimes_the_first_layers_and_every_front_member(raw, layers, cost):
    rows = [{"trial_id": f"t{i}", **r} for i, r in enumerate(raw)]
    chosen = set(select_for_retiming(rows, cost, scope="front", layers=layers))
    done = [r for r in rows if r["status"] == "COMPLETED"]
    expected = set()
    for column in {"flops", "latency_ms_trial", cost if cost != "latency_ms" else "flops"}:
        ranked = [r for r in done if r[column] is not None]
        depth = _layers_by_definition([r["val_acc"] for r in ranked], [r[column] for r in ranked])
        expected |= {r["trial_id"] for r, d in zip(ranked, depth, strict=True) if d < layers}
    assert chosen == expected
    # the search's front is always among the re-timed: for flops / params directly; for latency,
    # only re-timed trials get latency_ms, so the front is computed among them
    rng = random.Random(len(rows))
    timed = [{**r, "latency_ms": rng.random() if r["trial_id"] in chosen else None} for r in rows]
    assert {r["trial_id"] for r in front_rows(timed, cost)} <= chosen
    assert all(r["trial_id"] in chosen for r in mark_pareto(timed, cost) if r["pareto"])


@given(st.lists(_row, max_size=12))
def test_scope_all_and_auto_up_to_the_limit_retime_every_completed_trial(raw):
    rows = [{"trial_id": f"t{i}", **r} for i, r in enumerate(raw)]
    every = [r["trial_id"] for r in rows if r["status"] == "COMPLETED"]
    assert select_for_retiming(rows, "flops", scope="all", layers=1) == every
    assert select_for_retiming(rows, "flops", scope="auto", layers=1, all_up_to=len(every)) == every


def test_scope_auto_above_the_limit_is_the_front_scope():
    rng = random.Random(0)
    rows = [{"trial_id": f"t{i}", "status": "COMPLETED", "val_acc": rng.random(), "flops": rng.random(),
             "latency_ms_trial": rng.random()} for i in range(200)]
    front = select_for_retiming(rows, "flops", scope="front", layers=1)
    assert select_for_retiming(rows, "flops", scope="auto", layers=1, all_up_to=199) == front
    assert 0 < len(front) < 60  # random points: a few non-dominated per ranking, not all 200


def test_nondominated_layers_peel_fronts():
    # (score, cost): a is the front, b and c the next layer (b dominated by a only), d is last
    assert nondominated_layers([0.9, 0.8, 0.5, 0.4], [1.0, 2.0, 1.5, 3.0]) == [0, 1, 1, 2]
    assert nondominated_layers([], []) == []


# ---- where: a pinned task per node ---------------------------------------------------------------


def _trial_checkpoint(tmp, name: str, base, keep: int):
    """A trial checkpoint as the trainable writes it: the prune log and the pruned weights."""
    from ray.train import Checkpoint

    model = build_model("small_cnn")
    model.load_state_dict(base.state_dict())
    log = []
    for unit in describe_units(model)[:2]:
        idxs = list(range(min(keep, unit.n_filters)))
        prune_layer(model, unit.name, idxs)
        log.append({"unit": unit.name, "keep_idxs": idxs})
    folder = tmp / name
    folder.mkdir()
    torch.save({"prune_log": log, "model_state": model.state_dict()}, folder / "state.pt")
    return Checkpoint.from_directory(str(folder))


def _cfg(**retime):
    return OmegaConf.create({
        "measure": {"latency": True, "batch_size": 4, "threads": 1, "repeats": 1, "warmup": 0},
        "trial_threads": 1, "search": {"seed": 0, "retime": {"rounds": 2, **retime}},
    })


class _Session:
    def __init__(self, ctx):
        self.ctx = ctx
        self.splits = type("Splits", (), {"input_shape": (1, 28, 28)})()


def test_models_are_timed_on_their_trials_node_and_the_device_recorded(tmp_path, ray_session):
    import ray

    torch.manual_seed(0)
    base = build_model("small_cnn")
    ctx = TrialContext(model_name="small_cnn", model_kwargs={}, num_classes=10,
                       base_state={k: v.clone() for k, v in base.state_dict().items()}, data_args={}, prune={},
                       finetune={}, measure={}, input_shape=(1, 28, 28))
    here = ray.get_runtime_context().get_node_id()
    gone = "f" * len(here)  # a node id Ray does not know: the cluster scaled it down
    rows = [{"trial_id": f"t{k}", "status": "COMPLETED", "val_acc": 0.5 + k / 10, "flops": 10 - k,
             "latency_ms_trial": 1.0, "node_id": node, "_checkpoint": _trial_checkpoint(tmp_path, f"t{k}", base, k + 2)}
             for k, node in enumerate([here, here, None, gone])]
    printed: list[str] = []
    summary, devices = _retime(_cfg(scope="all"), rows, _Session(ctx), printed.append)
    text = "\n".join(printed)
    assert "re-timing 4 models serially where their trials ran (2 node(s)" in text
    assert f"node {gone} of 1 trial(s) is gone" in text
    for row in rows:
        assert row["latency_ms"] > 0 and row["latency_kept"] > 0
        assert row["latency_device"].startswith("cpu: ") and row["latency_device"].endswith(", 1 threads")
    assert devices == [rows[0]["latency_device"]]
    # the task of the trials' node ran there (its node id is in the line it printed), and a
    # group with no node id joined the driver's node
    assert f"(node {here[:12]})" in text and summary["base_latency_ms"] > 0
    assert sum(f"base_latency_ms/{n[:12]}" in summary for n in (here, gone)) == 2
    assert f"latency_halves_spearman/{here[:12]}" in summary  # 3 models on this node


def test_scope_front_says_which_were_retimed(tmp_path, ray_session):
    torch.manual_seed(0)
    base = build_model("small_cnn")
    ctx = TrialContext(model_name="small_cnn", model_kwargs={}, num_classes=10,
                       base_state={k: v.clone() for k, v in base.state_dict().items()}, data_args={}, prune={},
                       finetune={}, measure={}, input_shape=(1, 28, 28))
    # t0 dominates t1 in every ranking; t2 is cheaper: with one layer, t1 keeps only its own timing
    specs = [(0.9, 5, 1.0), (0.8, 6, 2.0), (0.5, 2, 0.5)]
    rows = [{"trial_id": f"t{k}", "status": "COMPLETED", "val_acc": acc, "flops": flops, "latency_ms_trial": ms,
             "node_id": None, "_checkpoint": _trial_checkpoint(tmp_path, f"t{k}", base, k + 2)}
            for k, (acc, flops, ms) in enumerate(specs)]
    printed: list[str] = []
    _retime(_cfg(scope="front", layers=1), rows, _Session(ctx), printed.append)
    text = "\n".join(printed)
    assert "re-timing 2 models serially" in text and "re-timed (the first 1 non-dominated layers" in text
    assert "1 other completed trial(s) keep only latency_ms_trial (latency_ms empty): t1" in text
    assert rows[1].get("latency_ms") is None and rows[0]["latency_ms"] > 0 and rows[2]["latency_ms"] > 0


# ---- bad values, refused before the search starts -----------------------------------------------

RETIME_ROWS = [
    (["search.retime.scope=some"], ["search.retime.scope must be one of auto, all, front, but got 'some'"]),
    (["search.retime.layers=0"], ["search.retime.layers must be an integer >= 1, but got 0"]),
    (["search.retime.all_up_to=-1"], ["search.retime.all_up_to must be an integer >= 0, but got -1"]),
    (["search.retime.all_up_to=many"], ["search.retime.all_up_to must be an integer >= 0, but got 'many'"]),
    (["search.retime.scope=all", "search.retime.layers=3"],
     ["search.retime.layers is read only with search.retime.scope=front|auto, but got search.retime.scope=all"]),
    (["search.retime.scope=front", "search.retime.all_up_to=10"],
     ["search.retime.all_up_to is read only with search.retime.scope=auto, but got search.retime.scope=front"]),
    (["measure.latency=false", "search.retime.scope=front"],
     ["search.retime.scope is read only with measure.latency=true, but got measure.latency=false"]),
    (["search.retime.depth=2"], ["unknown key 'search.retime.depth'"]),
]


@pytest.mark.parametrize("args, musts", RETIME_ROWS, ids=[" ".join(a) for a, _ in RETIME_ROWS])
def test_bad_retime_settings_are_refused_before_any_work(args, musts, capsys, tmp_path):
    code = launch.main([*args, f"cache_dir={tmp_path}/cache", f"output_root={tmp_path}/search"])
    assert_refused(capsys, code, musts)
    assert list(tmp_path.iterdir()) == []  # no output folder, no MLflow store, no base model
