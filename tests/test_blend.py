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
from trainables.protocol import recalibrate_bn, select_keep


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
    ],
)
def test_bad_blended_search_input_is_one_line_before_any_trial(args, parts, capsys):
    assert main(["search=blended", *args]) == 2
    err = capsys.readouterr().err
    assert all(part in err for part in parts), (parts, err)
    assert err.count("\n") == 1


def test_tiny_blended_search_end_to_end(tiny_fmnist, tmp_path, capsys, ray_session):
    """Clustering, proxy trials with evolved factors, the best one fine-tuned and tested, MLflow."""
    import json

    import mlflow

    from search.pareto import read_trials

    out = tmp_path / "out" / "b4"
    args = [
        "search=blended", f"data.root={tiny_fmnist}", "data.val_size=100", "data.batch_size=32", "data.eval_batch_size=100",
        "model.pretrain.epochs=1", f"cache_dir={tmp_path / 'cache'}", f"output_root={tmp_path / 'out'}", "name=b4",
        "search.num_trials=4", "search.population_size=2", "search.max_concurrent_trials=2", "num_cpus=2",
        "search.blend.pool=[l1,l2,apoz,taylor]", "search.blend.n_clusters=2", "search.proxy.adapt_bn_batches=2",
        "search.finetune_front=1", "search.prune_overrides.q=0.2", "measure.batch_size=4", "measure.repeats=1",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1] == str(out)
    clustering = json.loads((out / "clustering" / "clustering.json").read_text())
    assert len(clustering["clusters"]) == 2 and len(clustering["representatives"]) == 2
    assert (out / "clustering" / "correlation.png").exists()
    rows = read_trials(out / "trials.parquet")
    assert len(rows) == 4 and all(r["criterion"] == "blended" and r["method"] == "one_shot" for r in rows)
    for r in rows:
        weights = {k for k in json.loads(r["config_json"]) if k.startswith("weight_")}
        assert weights == {f"weight_{c}" for c in clustering["representatives"]}
        assert r["flops_ratio"] == pytest.approx(0.5, abs=0.02)  # every candidate at the FLOPs target
        assert len(set(r["ratios"])) == 1 and 0.2 < r["ratios"][0] < 0.5  # uniform, scaled to meet it
    [tuned] = read_trials(out / "finetuned.parquet")
    best = max((r for r in rows if r["status"] == "COMPLETED"), key=lambda r: (r["pareto"], r["val_acc"]))
    assert tuned["proxy_trial_id"] == best["trial_id"] and tuned["proxy_val_acc"] == pytest.approx(best["val_acc"])
    assert tuned["config_json"] == best["config_json"] and tuned["test_acc"] is not None and tuned["status"] == "COMPLETED"
    assert json.loads(tuned["config_json"])["criterion"] == "blended"
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
