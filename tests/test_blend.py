"""The blended criterion, criteria clustering, adaptive BN and the blended search's inputs."""

from __future__ import annotations

import copy

import numpy as np
import optuna
import pytest
import torch
from torch import nn

from search.blend.clustering import (
    check_pool,
    cluster_criteria,
    cluster_pool,
    pool_scores,
    rank_correlations,
    write_clustering,
)
from search.launch import load_search_config, main
from search.space import define_space
from trainables import ScoringContext, build_model, describe_units, get_criterion
from trainables.criteria.blended import check_blend_options, normalize_scores, rank_normalize
from trainables.protocol.stages import recalibrate_bn, select_keep


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("small_cnn")
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def _batches(n=2, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 28, 28, generator=gen), torch.randint(0, 10, (size,), generator=gen)) for _ in range(n)]


def test_rank_normalize_is_invariant_to_scaling_and_monotone_maps():
    s = torch.tensor([0.3, -1.0, 2.5, 0.7, 0.1])
    r = rank_normalize(s)
    assert torch.allclose(r, torch.tensor([0.5, 0.0, 1.0, 0.75, 0.25], dtype=torch.float64))
    assert torch.equal(rank_normalize(s * 1e4), r)
    assert torch.equal(rank_normalize(torch.exp(s) + 3), r)
    ties = rank_normalize(torch.tensor([1.0, 2.0, 2.0, 3.0]))  # tied scores share their mean rank
    assert torch.allclose(ties, torch.tensor([0.0, 0.5, 0.5, 1.0], dtype=torch.float64))
    z = normalize_scores(s, "zscore")
    assert torch.allclose(normalize_scores(7 * s + 2, "zscore"), z)
    assert not torch.allclose(normalize_scores(torch.exp(s), "zscore"), z)  # z keeps margins, not only order


@pytest.mark.parametrize("candidate", ["l1", "apoz", "taylor"])
def test_single_candidate_with_factor_one_ranks_exactly_as_the_candidate(candidate):
    model, batches = _model(), _batches()
    for unit in describe_units(model):
        ctx = ScoringContext(batches=batches, options={"weights": {candidate: 1.0}})
        blended = get_criterion("blended")(model, unit, ctx)
        alone = get_criterion(candidate)(model, unit, ScoringContext(batches=batches))
        for k in range(1, unit.n_filters):
            assert select_keep(blended, k) == select_keep(alone, k)


def test_blend_is_a_weighted_sum_of_normalised_scores_and_skips_zero_factors():
    model, batches = _model(), _batches()
    unit = describe_units(model)[1]
    ctx = ScoringContext(batches=batches, options={"weights": {"l1": 0.25, "apoz": 2.0}, "normalize": "zscore"})
    got = get_criterion("blended")(model, unit, ctx)
    want = 0.25 * normalize_scores(get_criterion("l1")(model, unit), "zscore") + 2.0 * normalize_scores(
        get_criterion("apoz")(model, unit, ScoringContext(batches=batches)), "zscore")
    torch.testing.assert_close(got, want.float())
    # A zero factor is not even scored: taylor would need batches that this context does not have.
    data_free = ScoringContext(options={"weights": {"l1": 1.0, "taylor": 0.0}})
    assert torch.equal(get_criterion("blended")(model, unit, data_free).argsort(), get_criterion("l1")(model, unit).argsort())


@pytest.mark.parametrize(
    "options, match",
    [
        ({}, r"criterion.weights=None must map candidate criteria to factors"),
        ({"weights": {"l1": 1.0, "l3": 1.0}}, r"criterion.weights: unknown candidate 'l3'; valid: apoz, bn_gamma"),
        ({"weights": {"blended": 1.0}}, r"unknown candidate 'blended'"),
        ({"weights": {"l1": -0.5}}, r"criterion.weights.l1=-0.5 must be a finite number >= 0"),
        ({"weights": {"l1": 0.0, "apoz": 0}}, r"are all zero; at least one factor must be > 0"),
        ({"weights": {"l1": 1.0}, "normalize": "minmax"}, r"criterion.normalize='minmax' is not one of: rank, zscore"),
    ],
)
def test_bad_blend_options_are_one_line_errors(options, match):
    with pytest.raises(ValueError, match=match):
        check_blend_options(options)


def test_run_cli_rejects_bad_weights_before_any_work(capsys):
    from trainables.run import main as run_main

    assert run_main(["criterion=blended", "criterion.weights={l1:1.0,bogus:2.0}"]) == 2
    err = capsys.readouterr().err
    assert "unknown candidate 'bogus'" in err and err.count("\n") == 1


def test_clustering_puts_identical_criteria_together_and_picks_representatives():
    gen = torch.Generator().manual_seed(0)
    units = {f"u{i}": torch.randn(12, generator=gen) for i in range(3)}
    noise = {u: torch.randn(12, generator=gen) for u in units}
    scores = {
        "a": units,
        "a_scaled": {u: 5 * s + 1 for u, s in units.items()},  # the same ranking
        "a_noisy": {u: s + 0.3 * noise[u] for u, s in units.items()},
        "other": {u: torch.randn(12, generator=gen) for u in units},
    }
    pool = list(scores)
    result = cluster_pool(scores, pool, n_clusters=2)
    assert np.allclose(result.correlation[0, 1], 1.0)
    assert ["other"] in result.clusters
    big = next(c for c in result.clusters if "a" in c)
    assert set(big) == {"a", "a_scaled", "a_noisy"}
    assert result.representatives[result.clusters.index(big)] in ("a", "a_scaled")  # most correlated with the rest
    # Two identical criteria stay together at every cut with fewer clusters than criteria.
    for k in range(1, len(pool)):
        clusters, _, _ = cluster_criteria(result.correlation, pool, n_clusters=k)
        assert any({"a", "a_scaled"} <= set(c) for c in clusters)
    clusters, _, _ = cluster_criteria(result.correlation, pool, distance_threshold=1e-6)
    assert {"a", "a_scaled"} in [set(c) for c in clusters] and len(clusters) == 3


def test_pool_scores_are_cached_per_criterion_and_outputs_written(tmp_path):
    model, batches = _model(), _batches()
    logged: list[str] = []
    first = pool_scores(model, ["l1", "apoz"], batches, cache_dir=tmp_path, model_key="m", log=logged.append)
    assert len(logged) == 2
    logged.clear()
    again = pool_scores(model, ["l1", "apoz", "l2"], batches, cache_dir=tmp_path, model_key="m", log=logged.append)
    assert logged == ["scoring l2 on 5 units"]  # only the new criterion is scored
    assert all(torch.equal(first["apoz"][u], again["apoz"][u]) for u in first["apoz"])
    other = pool_scores(model, ["apoz"], _batches(seed=1), cache_dir=tmp_path, model_key="m", log=logged.append)
    assert logged[-1].startswith("scoring apoz")  # other batches, other key
    assert not torch.equal(other["apoz"]["features.0"], first["apoz"]["features.0"])
    # What the cache hands back is what the criterion computes.
    for unit in describe_units(model):
        assert torch.equal(again["l1"][unit.name], get_criterion("l1")(model, unit, ScoringContext(batches=batches)))
    pool = ["l1", "apoz", "l2"]
    result = cluster_pool(again, pool, n_clusters=2)
    files = write_clustering(result, tmp_path / "out")
    assert [f.name for f in files] == ["clustering.json", "correlation.parquet", "correlation.png"]
    assert files[2].read_bytes()[:4] == b"\x89PNG"
    import json

    import pyarrow.parquet as pq

    written = json.loads(files[0].read_text())
    assert (written["pool"], written["clusters"], written["representatives"]) == (pool, result.clusters, result.representatives)
    np.testing.assert_allclose(written["correlation"], result.correlation, atol=1e-6)
    table = pq.read_table(files[1]).to_pylist()
    assert [r["criterion"] for r in table] == pool
    np.testing.assert_allclose([[r[c] for c in pool] for r in table], result.correlation)
    assert [result.clusters[r["cluster"]] for r in table] == [next(c for c in result.clusters if r["criterion"] in c) for r in table]
    assert [r["criterion"] for r in table if r["representative"]] == [c for c in pool if c in result.representatives]


def test_rank_correlations_by_hand_and_a_constant_criterion_counts_as_no_agreement():
    up = torch.arange(6.0)
    scores = {
        "up": {"u0": up, "u1": up},
        "down": {"u0": -up, "u1": up ** 3},  # reversed on u0, the same order on u1
        "flat": {"u0": torch.ones(6), "u1": up},  # no ranking on u0
    }
    mean, per_unit = rank_correlations(scores, ["up", "down", "flat"])
    np.testing.assert_allclose(per_unit["u0"], [[1, -1, 0], [-1, 1, 0], [0, 0, 1]])
    np.testing.assert_allclose(per_unit["u1"], np.ones((3, 3)))
    np.testing.assert_allclose(mean, [[1, 0, 0.5], [0, 1, 0.5], [0.5, 0.5, 1]])
    assert np.isfinite(mean).all() and np.allclose(mean, mean.T)


def test_cluster_representative_is_the_member_most_correlated_with_the_rest():
    # a-b 0.9, a-c 0.5, b-c 0.8: b has the highest mean correlation (0.85) with the others.
    corr = np.array([[1.0, 0.9, 0.5, -0.5], [0.9, 1.0, 0.8, -0.4], [0.5, 0.8, 1.0, -0.3], [-0.5, -0.4, -0.3, 1.0]])
    clusters, reps, order = cluster_criteria(corr, ["a", "b", "c", "d"], n_clusters=2)
    assert clusters == [["a", "b", "c"], ["d"]] and reps == ["b", "d"]
    assert sorted(order) == ["a", "b", "c", "d"]
    # Cutting at distance 0.15 (1 - rho) keeps only a-b together (average linkage).
    clusters, reps, _ = cluster_criteria(corr, ["a", "b", "c", "d"], distance_threshold=0.15)
    assert clusters == [["a", "b"], ["c"], ["d"]] and reps == ["a", "c", "d"]  # a tie goes to the earlier entry


# Each message names the setting, the rule and the offending value (the parts listed).
@pytest.mark.parametrize(
    "pool, kwargs, parts",
    [
        (["l1", "l3"], {"n_clusters": 1}, ("search.blend.pool", "unknown criterion 'l3'", "valid: apoz")),
        (["l1"], {"n_clusters": 1}, ("search.blend.pool", "at least 2 criteria", "['l1']")),
        (["l1", "l1"], {"n_clusters": 1}, ("search.blend.pool", "['l1', 'l1']")),
        (["l1", "l2"], {"n_clusters": 3}, ("search.blend.n_clusters", "[1, 2]", "3")),
        (["l1", "l2"], {}, ("exactly one of n_clusters and distance_threshold",)),
        (["l1", "l2"], {"distance_threshold": 3.0}, ("search.blend.distance_threshold", "[0, 2]", "3.0")),
    ],
)
def test_bad_pools_are_refused(pool, kwargs, parts):
    from trainables.criteria import list_criteria

    with pytest.raises(ValueError) as err:
        check_pool(pool, list_criteria(), **kwargs)
    assert all(part in str(err.value) for part in parts), (parts, str(err.value))
    assert "\n" not in str(err.value)


def test_recalibrate_bn_estimates_the_batch_statistics_without_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Dropout(0.5), nn.BatchNorm2d(4), nn.ReLU()).eval()
    weights = copy.deepcopy(model[0].state_dict())
    batches = _batches(n=3)
    seen = recalibrate_bn(model, batches)
    assert seen == 48
    feats = torch.cat([model[0](x) for x, _ in batches])  # dropout off: BN saw the plain conv output
    torch.testing.assert_close(model[2].running_mean, feats.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[2].running_var, feats.var(dim=(0, 2, 3), unbiased=True), rtol=1e-3, atol=1e-5)
    assert not model.training and not model[2].training and model[2].momentum == 0.1
    assert all(torch.equal(weights[k], model[0].state_dict()[k]) for k in weights)


def test_blended_space_suggests_one_factor_per_candidate_and_skips_null_keys():
    cfg = load_search_config(["search=blended", "search.blend.candidates=[l1,apoz,taylor]"])
    from omegaconf import OmegaConf

    space = define_space(OmegaConf.to_container(cfg.search, resolve=True), 3, ["l1", "apoz", "taylor"], ["l1", "apoz", "taylor"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    space(trial)
    assert set(trial.params) == {"criterion", "weight_l1", "weight_apoz", "weight_taylor"}
    assert all(0.0 <= trial.params[f"weight_{c}"] <= 1.0 for c in ("l1", "apoz", "taylor"))
    from trainables.ray_trainable import TrialContext, trial_configs

    ctx = TrialContext("small_cnn", {}, 10, {}, {}, prune={"method": "one_shot", "criterion_options": {"normalize": "rank"}},
                       finetune={}, measure={})
    prune, _, _ = trial_configs(ctx, trial.params)
    assert prune.criterion == "blended" and prune.criterion_options["normalize"] == "rank"
    assert prune.criterion_options["weights"] == {c: trial.params[f"weight_{c}"] for c in ("l1", "apoz", "taylor")}


@pytest.mark.parametrize(
    "args, parts",
    [
        (["search.blend.n_clusters=12"], ("search.blend.n_clusters", "[1, 9] (the pool size)", "12")),
        (["search.blend.candidates=[l1,l3]"], ("search.blend.candidates: unknown criterion 'l3'",)),
        (["search.blend.pool=[l1,bogus]"], ("search.blend.pool: unknown criterion 'bogus'",)),
        (["search.blend.factor.low=-1"], ("search.blend.factor", "0 <= low <= high", "low=-1.0, high=1.0")),
        (["search.blend.factor.high=0", "search.blend.factor.low=0"], ("search.blend.factor", "high > 0")),
        (["search.fidelity=cheap"], ("search.fidelity", "full, proxy", "'cheap'")),
        (["search.finetune_front=-1"], ("search.finetune_front", "integer >= 0", "-1")),
        (["+search.prune_overrides.bogus=1"], ("unknown key search.prune_overrides.bogus",)),
        (["search.prune_overrides.target_flops_reduction=1.5"], ("prune.target_flops_reduction", "(0, 1)", "1.5")),
        (["search.proxy.adapt_bn_batches=-3"], ("search.proxy.adapt_bn_batches", "integer >= 0", "-3")),
        # a proxy search with nothing fine-tuned has no model worth deploying
        (["search.finetune_front=0", "search.export=[pt2]"],
         ("search.export is read only with", "search.fidelity=proxy and search.finetune_front=0")),
        (["search.export=[tflite]"], ("search.export must be a list of formats from onnx, pt2", "['tflite']")),
    ],
)
def test_bad_blended_search_input_is_one_line_before_any_trial(args, parts, capsys):
    assert main(["search=blended", *args]) == 2
    err = capsys.readouterr().err
    assert all(part in err for part in parts), (parts, err)
    assert err.count("\n") == 1


def _tiny_blended_search(root, tmp_path, name: str, *extra: str) -> list[str]:
    """Overrides of a 4-trial blended search on the tiny data set, in ``tmp_path / "out" / name``."""
    return [
        "search=blended", f"data.root={root}", "data.val_size=100", "data.batch_size=32", "data.eval_batch_size=100",
        "model.pretrain.epochs=1", f"cache_dir={tmp_path / 'cache'}", f"output_root={tmp_path / 'out'}", f"name={name}",
        "search.num_trials=4", "search.population_size=2", "search.max_concurrent_trials=2", "num_cpus=2",
        "search.blend.pool=[l1,l2,apoz,taylor]", "search.blend.n_clusters=2", "search.proxy.adapt_bn_batches=2",
        "search.prune_overrides.q=0.2", "measure.batch_size=4", "measure.repeats=1", *extra,
    ]


def test_tiny_blended_search_end_to_end(tiny_fmnist, tmp_path, capsys, ray_session):
    """Clustering, proxy trials with evolved factors, the best one fine-tuned and tested, MLflow."""
    import json

    import mlflow

    from search.pareto import read_trials

    out = tmp_path / "out" / "b4"
    args = _tiny_blended_search(tiny_fmnist, tmp_path, "b4", "search.finetune_front=1", "search.export=[pt2]")
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1] == str(out)
    clustering = json.loads((out / "clustering" / "clustering.json").read_text())
    assert len(clustering["clusters"]) == 2 and len(clustering["representatives"]) == 2
    assert (out / "clustering" / "correlation.png").exists()
    rows = read_trials(out / "trials.parquet")
    assert len(rows) == 4 and all(r["criterion"] == "blended" and r["method"] == "one_shot" for r in rows)
    for r in rows:
        weights = set(json.loads(r["config_json"])["criterion.weights"])  # the run command's key
        assert weights == set(clustering["representatives"])
        assert r["flops_kept"] == pytest.approx(0.5, abs=0.02)  # every candidate at the FLOPs target
        assert len(set(r["prune_ratios"])) == 1 and 0.2 < r["prune_ratios"][0] < 0.5  # uniform, scaled to meet it
    [tuned] = read_trials(out / "finetuned.parquet")
    best = max((r for r in rows if r["status"] == "COMPLETED"), key=lambda r: (r["pareto"], r["val_acc"]))
    assert tuned["proxy_trial_id"] == best["trial_id"] and tuned["proxy_val_acc"] == pytest.approx(best["val_acc"])
    assert tuned["config_json"] == best["config_json"] and tuned["test_acc"] is not None and tuned["status"] == "COMPLETED"
    assert json.loads(tuned["config_json"])["criterion"] == "blended"
    # search.export deploys the fine-tuned candidate, not the proxy front
    assert [p.name for p in (out / "export").iterdir()] == [tuned["trial_id"]]
    program = torch.export.load(str(out / "export" / tuned["trial_id"] / "model.pt2")).module()
    assert sum(p.numel() for p in program.parameters()) == tuned["params"]
    records = [json.loads(f.read_text()) for f in (out / "ray" / "tune_finetune").rglob("record.json")]
    assert records and all(r["config"]["prune"]["criterion_options"]["layerwise"] == "global" for r in records)
    assert clustering["layerwise"] == "global"
    state = json.loads((out / "launch_state.json").read_text())
    assert state["candidates"] == clustering["representatives"]
    client = mlflow.MlflowClient(state["tracking_uri"])
    exp = client.get_experiment_by_name("prunesearch").experiment_id
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{state['parent_run_id']}'")
    assert len(children) == 5 and sum(r.data.tags.get("fidelity") == "full" for r in children) == 1
    artifacts = {a.path for a in client.list_artifacts(state["parent_run_id"])}
    assert {"clustering", "finetuned.parquet", "trials.parquet"} <= artifacts


def test_blend_cli_clusters_the_base_model_and_refuses_bad_input(tiny_fmnist, tmp_path, capsys):
    from search.blend.__main__ import main as blend_main

    assert blend_main(["search.blend.pool=[l1,apoz]", "search.blend.n_clusters=3"]) == 2
    err = capsys.readouterr().err
    assert all(part in err for part in ("search.blend.n_clusters", "[1, 2]", "3")) and err.count("\n") == 1, err
    args = [f"data.root={tiny_fmnist}", "data.val_size=100", "model.pretrain.epochs=1", f"cache_dir={tmp_path / 'cache'}",
            f"output_root={tmp_path / 'out' / 'search'}", "name=c1", "search.blend.pool=[l1,l2,fpgm,apoz]",
            "search.blend.n_clusters=2"]
    assert blend_main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    out = tmp_path / "out" / "blend" / "c1"
    assert lines[-1] == str(out) and any(line.startswith("candidates (cluster representatives):") for line in lines)
    assert {p.name for p in (out / "clustering").iterdir()} == {"clustering.json", "correlation.parquet", "correlation.png"}
    import json

    clustering = json.loads((out / "clustering" / "clustering.json").read_text())
    # Two clusters that partition the pool, each represented by one of its own members.
    members = [c for cluster in clustering["clusters"] for c in cluster]
    assert len(clustering["clusters"]) == 2 and sorted(members) == sorted(["l1", "l2", "fpgm", "apoz"])
    assert all(rep in cluster for rep, cluster in zip(clustering["representatives"], clustering["clusters"], strict=True))
    printed = next(line for line in lines if line.startswith("candidates (cluster representatives):"))
    assert all(rep in printed for rep in clustering["representatives"])
    assert len(list((tmp_path / "cache" / "criteria_scores").rglob("*.pt"))) == 4  # one cache file per criterion


# ---- layerwise blends (He et al. cluster and calibrate per layer) ----

def test_units_are_grouped_into_consecutive_stages_units_or_one_group():
    from search.blend.layout import unit_groups

    units = [f"u{i}" for i in range(5)]
    assert unit_groups(units, "global") == [units]
    assert unit_groups(units, "unit") == [[u] for u in units]
    stages = unit_groups(units, "stage", 2)
    assert stages == [["u0", "u1", "u2"], ["u3", "u4"]]  # consecutive, sizes differ by at most one
    assert [u for g in unit_groups(units, "stage", 3) for u in g] == units
    with pytest.raises(ValueError, match=r"search.blend.stages must be an integer in \[1, 5\].*but got 6"):
        unit_groups(units, "stage", 6)


def test_layerwise_blend_scores_each_unit_with_its_own_groups_factors():
    model, batches = _model(), _batches()
    units = describe_units(model)
    first, rest = [u.name for u in units[:2]], [u.name for u in units[2:]]
    options = {"layerwise": "stage", "groups": [{"units": first, "weights": {"l1": 1.0}},
                                                {"units": rest, "weights": {"apoz": 1.0, "l1": 0.0}}]}
    check_blend_options(options)
    for unit in units:
        got = get_criterion("blended")(model, unit, ScoringContext(batches=batches, options=options))
        alone = get_criterion("l1" if unit.name in first else "apoz")(model, unit, ScoringContext(batches=batches))
        assert all(select_keep(got, k) == select_keep(alone, k) for k in range(1, unit.n_filters))
    # l1 and apoz rank some unit differently, so the per-group factors did change a ranking.
    assert any(select_keep(get_criterion("l1")(model, u), u.n_filters // 2)
               != select_keep(get_criterion("apoz")(model, u, ScoringContext(batches=batches)), u.n_filters // 2)
               for u in units[2:])
    missing = {**options, "groups": options["groups"][:1]}
    with pytest.raises(ValueError, match=f"'{rest[0]}' is in none"):
        get_criterion("blended")(model, units[2], ScoringContext(batches=batches, options=missing))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"layerwise": "layer", "weights": {"l1": 1.0}}, r"criterion.layerwise must be one of global, stage, unit, but got 'layer'"),
        ({"layerwise": "stage", "weights": {"l1": 1.0}, "groups": [{"units": ["a"], "weights": {"l1": 1.0}}]},
         r"criterion.weights must be null with criterion.layerwise=stage"),
        ({"layerwise": "unit", "groups": []}, r"criterion.groups must be a non-empty list"),
        ({"layerwise": "unit", "groups": [{"units": ["a"], "weights": {"l1": 1.0}}, {"units": ["a"], "weights": {"l1": 1.0}}]},
         r"criterion.groups\[1\].units must not repeat a unit of an earlier group, but got 'a'"),
        ({"layerwise": "unit", "groups": [{"units": ["a"], "weights": {"l1": -1.0}}]},
         r"criterion.groups\[0\].weights.l1=-1.0 must be a finite number >= 0"),
        ({"groups": [{"units": ["a"], "weights": {"l1": 1.0}}], "weights": {"l1": 1.0}}, r"criterion.groups must be null"),
    ],
)
def test_bad_layerwise_options_are_one_line_errors(options, match):
    with pytest.raises(ValueError, match=match):
        check_blend_options(options)


def test_layerwise_space_suggests_factors_per_group_and_trials_carry_them_to_the_criterion():
    from omegaconf import OmegaConf

    from search.blend.layout import criterion_groups, make_layout
    from trainables.ray_trainable import TrialContext, trial_configs

    cfg = load_search_config(["search=blended", "search.blend.layerwise=stage", "search.blend.stages=2"])
    layout = make_layout("stage", [["features.0", "features.4"], ["features.7"]], [["l1", "apoz"], ["fpgm"]])
    space = define_space(OmegaConf.to_container(cfg.search, resolve=True), 3, ["l1", "apoz", "fpgm"], layout)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    space(trial)
    assert set(trial.params) == {"criterion", "weight_g0_l1", "weight_g0_apoz", "weight_g1_fpgm"}
    options = {"normalize": "rank", **criterion_groups(layout)}
    before = copy.deepcopy(options)
    ctx = TrialContext("small_cnn", {}, 10, {}, {}, prune={"method": "one_shot", "criterion_options": options},
                       finetune={}, measure={})
    prune, _, _ = trial_configs(ctx, trial.params)
    assert options == before  # the context's options are not filled in place
    groups = prune.criterion_options["groups"]
    assert prune.criterion_options["layerwise"] == "stage" and prune.criterion_options["weights"] is None
    assert groups[0] == {"units": ["features.0", "features.4"],
                         "weights": {"l1": trial.params["weight_g0_l1"], "apoz": trial.params["weight_g0_apoz"]}}
    assert groups[1] == {"units": ["features.7"], "weights": {"fpgm": trial.params["weight_g1_fpgm"]}}
    with pytest.raises(ValueError, match="weight_g2_l1 must be weight_g<group>_<candidate> with group < 2"):
        trial_configs(ctx, {**trial.params, "weight_g2_l1": 0.5})


def test_clustering_per_group_follows_each_groups_own_agreement():
    from search.blend.clustering import cluster_groups

    gen = torch.Generator().manual_seed(0)
    base = {u: torch.randn(40, generator=gen) for u in ("a", "b", "c", "d")}
    other = {u: torch.randn(40, generator=gen) for u in base}
    # On units a, b criterion y copies x; on c, d it copies z (and x, z are unrelated there).
    scores = {"x": base, "y": {u: (base[u] if u in "ab" else other[u]) * 2 + 1 for u in base}, "z": other}
    pool = ["x", "y", "z"]
    first, second = cluster_groups(scores, pool, [["a", "b"], ["c", "d"]], n_clusters=2)
    assert sorted(map(sorted, first.clusters)) == [["x", "y"], ["z"]]
    assert sorted(map(sorted, second.clusters)) == [["x"], ["y", "z"]]
    assert set(first.per_unit) == {"a", "b"} and set(second.per_unit) == {"c", "d"}


def test_bad_layerwise_search_input_is_one_line_before_any_trial(capsys):
    for args, parts in (
        (["search.blend.layerwise=layer"], ("search.blend.layerwise", "global, stage, unit", "'layer'")),
        (["search.blend.layerwise=stage", "search.blend.stages=0"], ("search.blend.stages", "integer >= 1", "0")),
        (["search.proxy.finetune_steps=-5"], ("search.proxy.finetune_steps", "integer >= 0", "-5")),
        (["search.proxy.finetune_steps=2.5"], ("search.proxy.finetune_steps", "integer >= 0", "2.5")),
    ):
        assert main(["search=blended", *args]) == 2
        err = capsys.readouterr().err
        assert all(part in err for part in parts) and err.count("\n") == 1, (parts, err)


# ---- the short-fine-tune proxy ----

@pytest.mark.parametrize("per_epoch", [1, 7, 429, 3906])
def test_proxy_epochs_give_back_exactly_k_protocol_steps(per_epoch):
    from types import SimpleNamespace as NS

    from search.blend.proxy import proxy_epochs
    from trainables.protocol.finetune import steps_per_epoch

    full, part = NS(train=range(5_500), train_size_full=55_000), NS(train=range(90), train_size_full=100)
    assert steps_per_epoch(full, NS(batch_size=128, steps_follow_fraction=False)) == 429  # the full set's epoch
    assert steps_per_epoch(full, NS(batch_size=128, steps_follow_fraction=True)) == 42  # one pass over the fraction
    assert steps_per_epoch(part, NS(batch_size=128, steps_follow_fraction=False)) == 1
    assert steps_per_epoch(full, NS(batch_size=10, steps_follow_fraction=False), world=4) == 1375
    for k in (0, 1, 3, 10, 30, 100, 999, 12_345):
        assert round(proxy_epochs(k, per_epoch) * per_epoch) == k  # the Finetuner's step count


def test_proxy_trial_takes_adaptive_bn_and_exactly_k_optimiser_steps(tiny_fmnist):
    from data import get_data
    from search._session import trial_prune
    from trainables.cli.compose import configs_of
    from trainables.protocol.config import MeasureConfig, PruneConfig
    from trainables.protocol.finetune import steps_per_epoch
    from trainables.protocol.stages import run_protocol

    splits = get_data("fashion_mnist", str(tiny_fmnist), val_size=100)
    cfg = load_search_config(["search=blended", "data.batch_size=32", "search.proxy.finetune_steps=7",
                              "search.proxy.adapt_bn_batches=2", "search.proxy.adapt_bn_batch_size=16"])
    prune, finetune, _, _ = configs_of(cfg)
    per_epoch = steps_per_epoch(splits, finetune)
    trial, full = trial_prune(cfg, prune, per_epoch)
    assert trial["method"] == "one_shot" and trial["p"] == 0 and trial["adapt_bn_batches"] == 2
    assert full["q"] == cfg.search.prune_overrides.q  # the front keeps its full fine-tuning
    assert trial_prune(cfg, prune)[0]["q"] == 0  # no data yet (config check): no steps to count
    torch.manual_seed(0)
    rec = run_protocol(build_model("small_cnn"), splits, PruneConfig(**{**trial, "criterion": "l1"}), finetune,
                       measure=MeasureConfig(latency=False), evaluate_test=False)
    assert rec["curve"][-1]["step"] == 7 and rec["curve"][-1]["phase"] == "final_finetune"
    assert [p["phase"] for p in rec["curve"]][:2] == ["base", "damage"]


# ---- one candidate per set of pruned filters ----

def _proxy_row(tmp_path, trial_id: str, val_acc: float, keep: dict[str, list[int]], weights: dict[str, float]) -> dict:
    import json

    from ray.train import Checkpoint

    folder = tmp_path / trial_id
    folder.mkdir()
    log = [{"unit": u, "keep_idxs": k} for u, k in keep.items()]
    (folder / "record.json").write_text(json.dumps({"prune_log": log}))
    config = {"criterion": "blended", **{f"weight_{c}": f for c, f in weights.items()}}
    return {"trial_id": trial_id, "status": "COMPLETED", "val_acc": val_acc, "pareto": False, "flops": 100,
            "config_json": json.dumps(config), "_checkpoint": Checkpoint.from_directory(str(folder))}


def test_finetuning_picks_skip_a_candidate_that_prunes_the_same_filters(tmp_path):
    import json

    from search.results import pick_for_finetuning

    keep = {"features.0": [0, 2, 3], "features.4": [1, 5]}
    rows = [
        _proxy_row(tmp_path, "a", 0.80, keep, {"l1": 0.9, "apoz": 0.1}),
        # Other factors, same filters kept (indices listed in another order): the same candidate.
        _proxy_row(tmp_path, "b", 0.80, {"features.4": [5, 1], "features.0": [3, 0, 2]}, {"l1": 0.8, "apoz": 0.1}),
        _proxy_row(tmp_path, "c", 0.75, {**keep, "features.4": [1, 6]}, {"l1": 0.1, "apoz": 0.9}),
        _proxy_row(tmp_path, "d", 0.70, {**keep, "features.0": [0, 1, 2]}, {"l1": 0.5, "apoz": 0.5}),
    ]
    said = []
    picked = pick_for_finetuning(rows, 2, log=said.append)
    assert [r["trial_id"] for r in picked] == ["a", "c"] and said == [
        "trial b prunes the same filters as trial a: not fine-tuned again"]
    assert [r["trial_id"] for r in pick_for_finetuning(rows, 5)] == ["a", "c", "d"]  # fewer distinct than asked
    # Without records, identical configs (NSGA-II proposing a vector twice) are one candidate.
    twin = {**rows[2], "trial_id": "e", "_checkpoint": None, "val_acc": 0.9}
    twice = [twin, {**twin, "trial_id": "f"}, {**rows[3], "_checkpoint": None}]
    assert [r["trial_id"] for r in pick_for_finetuning(twice, 2)] == ["e", "d"]
    assert len({json.loads(r["config_json"])["weight_l1"] for r in pick_for_finetuning(twice, 3)}) == 2


@pytest.mark.slow  # a whole search with Ray: ~100 s on 2 busy cores
def test_tiny_layerwise_search_with_a_short_fine_tune_proxy(tiny_fmnist, tmp_path, capsys, ray_session):
    """Per-stage clustering and factors, k-step proxy trials, distinct candidates fine-tuned."""
    import json

    from search.blend.dedupe import keep_signature
    from search.pareto import read_trials

    out = tmp_path / "out" / "lw"
    args = _tiny_blended_search(tiny_fmnist, tmp_path, "lw", "search.blend.layerwise=stage", "search.blend.stages=2",
                                "search.proxy.finetune_steps=3", "search.finetune_front=2")
    assert main(args) == 0
    capsys.readouterr()
    clustering = json.loads((out / "clustering" / "clustering.json").read_text())
    assert clustering["layerwise"] == "stage" and len(clustering["groups"]) == 2
    assert [u for g in clustering["groups"] for u in g["units"]] == [u.name for u in describe_units(build_model("small_cnn"))]
    assert all((out / "clustering" / f"group{i}" / "correlation.png").exists() for i in range(2))
    state = json.loads((out / "launch_state.json").read_text())
    assert state["candidates"]["layerwise"] == "stage"
    keys = {f"weight_g{i}_{c}" for i, g in enumerate(clustering["groups"]) for c in g["representatives"]}
    rows = read_trials(out / "trials.parquet")
    groups = "criterion.options.groups."  # the run command's keys: one weights map per group
    assert all({f"weight_g{k[len(groups):].split('.')[0]}_{c}" for k, w in json.loads(r["config_json"]).items()
                if k.startswith(groups) for c in w} == keys for r in rows)
    tuned = read_trials(out / "finetuned.parquet")
    assert 1 <= len(tuned) <= 2 and all(r["status"] == "COMPLETED" for r in tuned)
    records = []
    for run in (out / "ray" / "tune_finetune").rglob("record.json"):
        records.append(json.loads(run.read_text()))
    finals = [r for r in records if r["config"]["prune"]["q"] > 0]
    options = finals[0]["config"]["prune"]["criterion_options"]
    assert options["layerwise"] == "stage" and [g["units"] for g in options["groups"]] == [
        g["units"] for g in clustering["groups"]]
    # Never the same pruned network fine-tuned twice.
    signatures = {keep_signature(r["prune_log"]) for r in finals}
    assert len(signatures) == len({r["trial_id"] for r in tuned})
    proxies = list((out / "ray" / "tune").rglob("record.json"))
    assert proxies and all(json.loads(p.read_text())["curve"][-1]["step"] == 3 for p in proxies)  # k = 3 steps each


def test_blend_cli_clusters_per_unit_with_layerwise_unit(tiny_fmnist, tmp_path, capsys):
    import json

    import mlflow

    from search.blend.__main__ import main as blend_main

    args = [f"data.root={tiny_fmnist}", "data.val_size=100", "model.pretrain.epochs=1", f"cache_dir={tmp_path / 'cache'}",
            f"output_root={tmp_path / 'out' / 'search'}", "name=u1", "search.blend.pool=[l1,l2,fpgm,apoz]",
            "search.blend.n_clusters=2", "search.blend.layerwise=unit"]
    assert blend_main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    out = tmp_path / "out" / "blend" / "u1"
    clustering = json.loads((out / "clustering" / "clustering.json").read_text())
    units = [u.name for u in describe_units(build_model("small_cnn"))]
    assert clustering["layerwise"] == "unit" and [g["units"] for g in clustering["groups"]] == [[u] for u in units]
    for i, group in enumerate(clustering["groups"]):
        own = json.loads((out / "clustering" / f"group{i}" / "clustering.json").read_text())
        assert own["representatives"] == group["representatives"] and own["units"] == group["units"]
        assert list(own["per_unit"]) == group["units"]  # clustered on its own unit's matrix only
        assert all(rep in cluster for rep, cluster in zip(own["representatives"], own["clusters"], strict=True))
    assert sum(line.startswith("unit ") for line in lines) == len(units)
    run_line = next(line for line in lines if line.startswith("MLflow run "))
    run_id, uri = run_line.split()[2], run_line.split("(")[1].rstrip(")")
    tags = mlflow.MlflowClient(uri).get_run(run_id).data.tags
    assert tags["layerwise"] == "unit" and tags["representatives"].count(";") == len(units) - 1
