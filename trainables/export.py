"""Export a pruned model for deployment: ONNX and the ``torch.export`` program (.pt2).

``python -m trainables.export <run folder> [--format onnx|pt2 ...] [--out DIR]`` rebuilds the
pruned model of a ``trainables.run`` folder (its ``config.yaml`` names the base model, its
``record.json`` holds the prune log; ``model.pt``, when present, the fine-tuned weights) and
writes ``model.onnx`` / ``model.pt2`` beside them, each checked against PyTorch's outputs.

- ONNX goes through ``torch.onnx.export(..., dynamo=True)``: the model is captured with
  ``torch.export`` and translated by onnxscript; ONNX Runtime runs it. The three packages are
  an optional extra: ``pip install -e ".[onnx]"``.
- ``.pt2`` is ``torch.export.save`` of the exported program: loadable with
  ``torch.export.load`` in any PyTorch of the same or a later version, no Python model code.

Both are exported in eval mode (BN uses its running statistics) with a dynamic batch
dimension. A pruned model is a plain, smaller model of the same architecture: nothing
about pruning survives in the file, so any runtime that runs the base model runs it.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FORMATS", "check_export", "export_model", "load_run_model", "main", "onnx_latency", "onnx_session",
           "onnxruntime_available"]

FORMATS = ("onnx", "pt2")
_ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
# Exported and eager outputs agree to float32 rounding: the runtimes order sums differently
# (and ONNX Runtime folds BN into the conv), so exact equality is not expected.
ATOL = 1e-4


def onnxruntime_available() -> bool:
    """True when the ``onnx`` extra (onnx, onnxscript, onnxruntime) is installed."""
    return all(importlib.util.find_spec(p) is not None for p in _ONNX_PACKAGES)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, but got {fmt!r}")
    if fmt == "onnx" and not onnxruntime_available():
        missing = [p for p in _ONNX_PACKAGES if importlib.util.find_spec(p) is None]
        raise ValueError(f"--format onnx needs the packages {', '.join(missing)}; install them with "
                         "pip install -e \".[onnx]\"")


def _flat(out: Any) -> list[Tensor]:
    """The tensors of a model output (a tensor, or tuples / lists / dicts of them), in the order
    torch.export flattens them (dict values by insertion order), which ONNX outputs follow."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flat(v)]
    raise ValueError(f"model outputs must be tensors or tuples, lists or dicts of them, but got {type(out).__name__}")


def _dynamic_batch(example: Tensor) -> tuple[dict[int, Any]]:
    # DYNAMIC, not a named Dim with bounds: export checks the model really is batch-generic
    # (a flatten that hard-codes the batch would fail here, not in deployment).
    return ({0: torch.export.Dim.DYNAMIC},) if example.shape[0] > 1 else ({},)


def export_model(model: nn.Module, example: Tensor, path: str | Path, fmt: str) -> Path:
    """Write ``model`` (evaluated on inputs like ``example``, shape (B, C, H, W)) to ``path`` as
    ``fmt`` (onnx | pt2); the batch dimension stays dynamic when ``example`` has B >= 2.

    ``model`` is not changed: a copy is put in eval mode and exported.
    """
    _check_format(fmt)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = copy.deepcopy(model).eval()
    with torch.no_grad():
        if fmt == "pt2":
            program = torch.export.export(net, (example,), dynamic_shapes=_dynamic_batch(example))
            torch.export.save(program, str(path))
        else:
            onnx_program = torch.onnx.export(net, (example,), dynamo=True, dynamic_shapes=_dynamic_batch(example),
                                             verbose=False)
            onnx_program.save(str(path))
    return path


def onnx_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_exported(path: str | Path, x: Tensor) -> list[Tensor]:
    """The outputs of an exported file (by its suffix: .onnx in ONNX Runtime, .pt2 in PyTorch) on ``x``."""
    path = Path(path)
    if path.suffix == ".onnx":
        session = onnx_session(path)
        outs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        return [torch.from_numpy(o) for o in outs]
    with torch.no_grad():
        return _flat(torch.export.load(str(path)).module()(x))


def check_export(model: nn.Module, path: str | Path, x: Tensor, atol: float = ATOL) -> float:
    """The largest absolute difference between the exported file's outputs and ``model``'s (eval
    mode) on ``x``; a ``ValueError`` when it exceeds ``atol`` or the outputs differ in shape."""
    net = copy.deepcopy(model).eval()
    with torch.no_grad():
        want = _flat(net(x))
    got = run_exported(path, x)
    if [tuple(t.shape) for t in got] != [tuple(t.shape) for t in want]:
        raise ValueError(f"exported outputs of {path} have shapes {[tuple(t.shape) for t in got]}, "
                         f"PyTorch's {[tuple(t.shape) for t in want]}")
    diff = max(float((g.float() - w.float()).abs().max()) for g, w in zip(got, want, strict=True))
    if diff > atol:
        raise ValueError(f"exported outputs of {path} must equal PyTorch's within {atol}, but differ by {diff:.3g}")
    return diff


def onnx_latency(path: str | Path, x: Tensor, *, threads: int = 1, warmup: int = 3, repeats: int = 10) -> dict:
    """Median wall time (ms) of one ONNX Runtime (CPU) run of the model at ``path`` on ``x``, as
    ``trainables.core.metrics.measure_latency`` times PyTorch: ``warmup`` untimed runs, then ``repeats``.

    ONNX Runtime applies its own graph optimisations (BN folding, conv + activation fusion) at
    session creation, the counterpart of ``measure_latency``'s deployment form.
    """
    session = onnx_session(path, threads)
    feed = {session.get_inputs()[0].name: x.numpy()}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(1e3 * (time.perf_counter() - t0))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "times_ms": times,
            "batch_size": int(x.shape[0]), "threads": threads, "device": "cpu", "runtime": "onnxruntime"}


def load_run_model(folder: str | Path, log=print) -> tuple[nn.Module, dict]:
    """``(pruned model, record)`` of a ``trainables.run`` folder: the base model its config names
    (from the cache, as the run loaded it), pruned by replaying the record's prune log, with the
    run's fine-tuned weights when the folder holds ``model.pt``."""
    from omegaconf import OmegaConf

    from trainables.cli.base_model import prepare
    from trainables.protocol.stages import rebuild_pruned

    folder = Path(folder)
    missing = [n for n in ("config.yaml", "record.json") if not (folder / n).is_file()]
    if missing:
        raise ValueError(f"run folder must be a trainables.run output holding config.yaml and record.json, "
                         f"but {folder} has no {missing[0]}")
    record = json.loads((folder / "record.json").read_text())
    if "prune_log" not in record:
        raise ValueError(f"record.json must hold a prune_log (a trainables.run record), but {folder} has none")
    cfg = OmegaConf.load(folder / "config.yaml")
    model, _, _, _ = prepare(cfg, log=log)
    weights = folder / "model.pt"
    state = torch.load(weights, map_location="cpu", weights_only=True) if weights.is_file() else None
    if state is None:
        log(f"{folder} has no model.pt: exporting the pruned base weights (not fine-tuned)")
    return rebuild_pruned(model, record, state).eval(), record


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainables.export", description=__doc__.split("\n\n")[0],
                                     exit_on_error=False)
    parser.add_argument("run_folder", help="a trainables.run output folder (config.yaml, record.json, model.pt)")
    parser.add_argument("--format", action="append", dest="formats", metavar="onnx|pt2",
                        help="repeat for both (default: onnx and pt2)")
    parser.add_argument("--out", default=None, help="output folder (default: the run folder)")
    parser.add_argument("--batch-size", type=int, default=2, help="example batch (>= 2 keeps the batch dynamic)")
    try:
        args = parser.parse_args(list(argv))
    except argparse.ArgumentError as err:
        raise ValueError(str(err)) from None
    args.formats = list(dict.fromkeys(args.formats or FORMATS))  # each format once, in the order given
    for fmt in args.formats:
        _check_format(fmt)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be an integer >= 1, but got {args.batch_size}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        args = _parse(argv)
        model, _ = load_run_model(args.run_folder, log=lambda *_: None)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from trainables.core.models import input_shape_of

    x = torch.randn(args.batch_size, *input_shape_of(model), generator=torch.Generator().manual_seed(0))
    out = Path(args.out or args.run_folder)
    for fmt in args.formats:
        path = export_model(model, x, out / f"model.{fmt}", fmt)
        diff = check_export(model, path, x)
        print(f"{path}  (max |exported - PyTorch| = {diff:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
