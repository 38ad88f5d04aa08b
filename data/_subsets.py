"""Named class subsets stored as YAML files in ``conf/classes/``."""

from __future__ import annotations

from pathlib import Path

CLASSES_DIR = Path(__file__).resolve().parent.parent / "conf" / "classes"


def list_class_subsets() -> list[str]:
    """Names accepted by ``load_class_subset`` (file stems in ``conf/classes/``)."""
    return sorted(p.stem for p in CLASSES_DIR.glob("*.yaml"))


def load_class_subset(name: str) -> list[int | str]:
    """The ``classes:`` list of ``conf/classes/<name>.yaml``, ready for ``get_data(classes=...)``."""
    import yaml  # ships with hydra-core; imported here so `import data` stays light

    valid = list_class_subsets()
    if name not in valid:
        raise ValueError(
            f"unknown class subset '{name}'; valid: {', '.join(valid) or 'none'} (files in {CLASSES_DIR})"
        )
    path = CLASSES_DIR / f"{name}.yaml"
    cfg = yaml.safe_load(path.read_text())
    classes = cfg.get("classes") if isinstance(cfg, dict) else None
    if not isinstance(classes, list) or not classes:
        raise ValueError(f"{path}: expected a non-empty list under the key 'classes'")
    return list(classes)
