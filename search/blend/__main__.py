"""``python -m search.blend [key=value ...]``: criteria clustering on the base model.

Scores every ``search.blend.pool`` criterion on every prunable unit of the base model (cached),
clusters the criteria by their mean Spearman rank correlation and prints the clusters and
their representatives; writes ``clustering.json``, ``correlation.parquet`` and
``correlation.png`` and logs them to MLflow as a run of the experiment. The last line printed
is the output folder. Overrides are those of ``python -m search.launch search=blended``:

    python -m search.blend
    python -m search.blend 'search.blend.pool=[l1,l2,apoz,taylor,random]' search.blend.n_clusters=3
    python -m search.blend search.blend.n_clusters=null search.blend.distance_threshold=0.3
    python -m search.blend search.blend.layerwise=stage search.blend.stages=2   # a clustering per stage too
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from search.launch import load_search_config
    from trainables.cli import cli_config

    cfg, code = cli_config(__doc__, argv, lambda args: load_search_config(["search=blended", *args]),
                           config_name="launch", help_overrides=["search=blended"])
    if cfg is None:
        return code
    from omegaconf import OmegaConf

    from search._session import blend_candidates, trial_prune
    from search.tracking import SearchTracker, default_tracking_uri
    from trainables.cli.base_model import prepare
    from trainables.cli.compose import configs_of

    root = Path(cfg.output_root).expanduser().resolve()
    out = root.parent / "blend" / (cfg.name or time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = cfg.mlflow.tracking_uri or default_tracking_uri(root)
    print(f"output folder: {out}")
    cfg.search.blend.candidates = None  # this command always clusters
    base, splits, base_path, _ = prepare(cfg)
    _, full = trial_prune(cfg, configs_of(cfg)[0])
    t0 = time.perf_counter()
    reps, files = blend_candidates(cfg, base, splits, base_path, full, out)
    tracker = SearchTracker(tracking_uri, cfg.mlflow.experiment)
    run_id = tracker.start_search(f"clustering-{out.name}", {"model": cfg.model.name, "data": cfg.data.name,
                                                             "blend": OmegaConf.to_container(cfg.search.blend, resolve=True)})
    tracker.client.set_tag(run_id, "role", "criteria_clustering")
    # A layerwise layout has representatives per group: "g0:a,b;g1:c,d".
    groups = [g["candidates"] for g in reps["groups"]] if isinstance(reps, dict) else [reps]
    tracker.client.set_tag(run_id, "layerwise", reps["layerwise"] if isinstance(reps, dict) else "global")
    tracker.client.set_tag(run_id, "representatives", ";".join(
        ",".join(g) if len(groups) == 1 else f"g{i}:{','.join(g)}" for i, g in enumerate(groups)))
    tracker.finish_search({"n_clusters": max(len(g) for g in groups), "n_groups": len(groups),
                           "wall_s": time.perf_counter() - t0}, files)
    print(f"MLflow run {run_id} ({tracking_uri})")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
