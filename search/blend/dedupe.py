"""One candidate per set of pruned filters.

Two calibration-factor vectors that keep the same filters in every unit are the same
candidate: from the same base weights they give the same pruned network, so fine-tuning
both buys nothing (NSGA-II proposes a factor vector it has already tried, and many
vectors differ only by factors too small to change a ranking). A trial's keep sets are read
from its record (``prune_log``: the kept filter indices per unit, what the protocol did),
so telling candidates apart costs no scoring and no fine-tuning.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Hashable, Iterable

__all__ = ["distinct", "keep_signature", "trial_signature"]


def keep_signature(prune_log: Iterable[dict]) -> str:
    """A digest of the kept filter indices per unit (order of the log and of indices ignored)."""
    keep = sorted((rec["unit"], sorted(int(i) for i in rec["keep_idxs"])) for rec in prune_log)
    return hashlib.sha256(json.dumps(keep).encode()).hexdigest()[:20]


def trial_signature(row: dict) -> Hashable:
    """The keep signature of a trial row (``search.results.trial_rows``), read from its final
    checkpoint's record; a trial without one falls back to its config, so that identical
    configs are still one candidate."""
    from trainables.ray_trainable import read_trial_record

    record = read_trial_record(row.get("_checkpoint"))
    if record is not None:
        return "keep:" + keep_signature(record["prune_log"])
    return "config:" + row["config_json"]


def distinct(rows: Iterable[dict], n: int, signature: Callable[[dict], Hashable] = trial_signature,
             log: Callable[[str], None] | None = None) -> list[dict]:
    """The first ``n`` rows (in the given order) whose signatures differ; a row with the
    signature of an earlier one is skipped for the next distinct row."""
    picked: list[dict] = []
    seen: dict[Hashable, dict] = {}
    for row in rows:
        if len(picked) == n:
            break
        key = signature(row)
        if key in seen:
            if log is not None:
                log(f"trial {row.get('trial_id')} prunes the same filters as trial {seen[key].get('trial_id')}: "
                    "not fine-tuned again")
            continue
        seen[key] = row
        picked.append(row)
    return picked
