"""Models and data from outside the project, as the config names them.

``model=torchvision|timm|custom`` and ``data=custom`` name what they bring with ``model.source``,
``model.name``, ``model.factory`` and ``data.factory``; ``apply_sources`` folds those into one
qualified name each (``torchvision:mobilenet_v3_small``, ``custom:examples.tiny_custom:net``),
written into ``model.name`` and ``data.name`` right after composition. From there every
consumer (the checks, the base-model cache, records, the search's trials on Ray workers,
MLflow's rebuild path) reads one name, resolved by the model and data registries' sources.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["MODEL_SOURCES", "apply_sources", "check_input_shape", "check_sources", "qualified_data_name",
           "qualified_model_name", "require"]

# No torch here: a config is checked (and most bad input refused) before torch is imported.
MODEL_SOURCES = ("torchvision", "timm", "custom")

# What a required key (``???`` in conf/) wants, for the one-line error when it is left out.
_REQUIRED = {
    "model.name": "a model name of model.source (e.g. model=torchvision model.name=mobilenet_v3_small)",
    "model.factory": "<module>:<callable> returning an nn.Module (e.g. examples.tiny_custom:net)",
    "data.factory": "<module>:<callable> returning the train and test Datasets (e.g. examples.tiny_custom:data)",
    "data.root": "the folder holding the data (data=folder: one sub-folder of images per class)",
}


def qualified_model_name(source: str | None, name: str | None, factory: str | None = None) -> str:
    """The one name a model is known by everywhere (cache key, records, Ray trials, MLflow).

    ``source`` None (or ``registry``) keeps a registered ``name``; ``torchvision`` / ``timm``
    give ``<source>:<name>``; ``custom`` gives ``custom:<factory>``. A qualified name given
    again (a saved, resolved config) is kept as it is.
    """
    if source in (None, "registry"):
        require(factory is None, "model.factory", "null unless model.source=custom", factory)
        return name
    require(source in MODEL_SOURCES, "model.source", f"one of {', '.join(MODEL_SOURCES)}", source)
    if source == "custom":
        # the form (<module>:<callable>) and the import are checked when the name is resolved
        require(isinstance(factory, str) and bool(factory), "model.factory",
                "<module>:<callable>, e.g. examples.tiny_custom:net", factory)
        qualified = f"custom:{factory}"
        require(name in (None, qualified), "model.name", f"null with model=custom (the factory names the model, "
                f"{qualified})", name)
        return qualified
    require(factory is None, "model.factory", f"null with model={source} (model.name names the model)", factory)
    require(isinstance(name, str) and bool(name) and name != "???", "model.name",
            f"a {source} model name, e.g. {'mobilenet_v3_small' if source == 'torchvision' else 'resnet18d'}", name)
    return name if name.startswith(f"{source}:") else f"{source}:{name}"


def require(ok: bool, key: str, allowed: str, value: Any) -> None:
    """The house's one-line refusal: "<key> must be <allowed>, but got <value>"."""
    if not ok:
        raise ValueError(f"{key} must be {allowed}, but got {value!r}")


def check_input_shape(value: Any) -> tuple[int, int, int]:
    """``model.input_shape`` as a (C, H, W) tuple, or a one-line refusal."""
    ok = (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 3
          and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value))
    require(ok, "model.input_shape", "null or [C, H, W], three positive integers", value)
    return tuple(int(v) for v in value)


def qualified_data_name(factory: Any, name: Any) -> str:
    """``custom:<factory>``: the data set name of ``data=custom`` (the factory's form and import are
    checked when the name is resolved, with the config)."""
    require(isinstance(factory, str) and bool(factory), "data.factory",
            "<module>:<callable>, e.g. examples.tiny_custom:data", factory)
    qualified = f"custom:{factory}"
    if name not in (None, qualified):
        raise ValueError(f"data.name must be null with data=custom (the factory names the data set, {qualified}), "
                         f"but got {name!r}")
    return qualified


def apply_sources(cfg: Any) -> None:
    """Write the qualified names into ``cfg.model.name`` / ``cfg.data.name`` (a freshly composed
    config, changed in place). A required key still left out (``???``) leaves its name as it is:
    ``check_sources`` refuses it when the config is checked, while a composition of a group's
    defaults alone (``search.command``) stays possible."""
    from omegaconf import OmegaConf

    model, data = cfg.model, cfg.data
    if ("source" in model or "factory" in model) and not _missing(model, "name", "factory"):
        model.name = qualified_model_name(model.get("source"), model.get("name"), model.get("factory"))
    if not _missing(model, "input_shape") and model.get("input_shape") is not None:
        check_input_shape(OmegaConf.to_object(model.input_shape))
    if "factory" in data and not _missing(data, "name", "factory"):
        data.name = qualified_data_name(data.factory, data.get("name"))


def check_sources(cfg: Any) -> None:
    """A required key of the model or data group left out (``???`` in conf/) is a one-line error."""
    from omegaconf import OmegaConf

    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if k.split(".")[0] in ("model", "data"))
    if missing:
        key = missing[0]
        raise ValueError(f"{key} must be given: {_REQUIRED.get(key, 'a value')}, but got ???")


def _missing(node: Any, *keys: str) -> bool:
    from omegaconf import OmegaConf

    # `key in node` is False for a missing (???) value, so ask OmegaConf (False for an absent key).
    return any(OmegaConf.is_missing(node, key) for key in keys)
