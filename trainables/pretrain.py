"""``python -m trainables.pretrain [key=value ...]``: train (or find) the cached base model of a
run config and print its validation accuracy and, as the last line, its path.

Takes the same overrides as ``python -m trainables.run`` (model, data, ``model.pretrain.*``).
"""

from __future__ import annotations

import sys

from trainables.cli import cli_config
from trainables.cli.compose import load_run_config

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    cfg, code = cli_config(__doc__, argv, load_run_config)
    if cfg is None:
        return code
    from trainables.cli.base_model import prepare  # torch: only once the config is good

    try:
        _, _, path, meta = prepare(cfg)  # missing data files are found only here
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"base val_acc={meta.get('val_acc', float('nan')):.4f}")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
