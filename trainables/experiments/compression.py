"""Compression of chosen conv layers after filter pruning: CAR, then Deep Compression.

Abbasi-Asl and Yu (2017) follow CAR filter pruning with the weight-level pipeline of Han et
al.'s Deep Compression (ICLR 2016) and report the size of the pruned layer. Four stages, each
fine-tuned on the whole network before it is measured:

1. filters removed: the criterion (``car`` by default) scores the layer's filters, the lowest
   go (``trainables.core.surgery.prune_layer``; the next layer loses the matching input channels);
2. weights pruned: the smallest-magnitude remaining weights of each layer are masked with
   ``torch.nn.utils.prune.l1_unstructured`` and the mask is held while fine-tuning;
3. weights shared: per layer, scikit-learn's k-means with Deep Compression's linear
   initialisation over [min, max] of the surviving weights; fine-tuning then trains the
   centroids, each receiving the sum of its member weights' gradients;
4. entropy coded: Huffman codes for the cluster indices and the relative position indices.

Bits are counted as Deep Compression counts them. A sparse layer is a list of entries in
flattening (C) order, each a value and the number of zeros skipped since the previous entry
(the relative index) at ``index_bits`` bits; a run of more zeros than ``2**index_bits - 1``
is bridged by a filler entry (a stored zero). Values are 32-bit floats after stage 2 and
``bits``-bit codes after stage 3, code 0 standing for the filler zero and codes 1.. for the
``2**bits - 1`` (at most) centroids, each stored at 32 bits. After stage 4 both code streams
are Huffman coded; their bits are the exact code lengths summed, plus each Huffman table
(one ``(symbol, code length)`` pair per symbol used: the codes are canonical, so lengths
define them). Not counted, at any stage: the layer's shape and entry count (a few integers),
the byte padding of a stream's last byte (< 8 bits), and the layer's bias (the project's
convs feed a BatchNorm and have none). Ratios are against the dense float32 weight of the
original, unpruned layer (32 bits per weight).

``encode_layer`` produces the storage form (a dict of numpy arrays and bytes) and
``decode_layer`` turns it back into the dense weight, bit for bit the quantised one.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from trainables.core.surgery import Unit, describe_units, prune_layer
from trainables.protocol.config import require, require_int
from trainables.protocol.planning import select_keep
from trainables.protocol.schedules import kept_count

__all__ = [
    "FLOAT_BITS", "LENGTH_BITS", "STAGES", "CompressConfig", "SharedWeights", "canonical_codes", "check_layers",
    "coded_bits", "compress_model", "decode_layer", "dense_bits", "encode_layer", "huffman_decode", "huffman_encode",
    "huffman_lengths", "keep_by_greedy_car", "keep_by_score", "linear_kmeans", "prune_weights", "quantise", "quantised_bits", "remove_filters",
    "shared_codes", "sparse_bits", "sparse_layout", "stage_sizes", "stored_bits",
]

FLOAT_BITS = 32  # a float32 weight or centroid
LENGTH_BITS = 5  # a code length (1..31) in a stored Huffman table
STAGES = ("base", "filters_removed", "weights_pruned", "quantised", "huffman")


# ---- configuration ------------------------------------------------------------------------


def _per_layer(key: str, value: Any, n: int, check: Callable[[str, Any], None]) -> list:
    """``value`` (one for every layer, or a list with one per layer), checked, as a list of ``n``."""
    if isinstance(value, (list, tuple)):
        require(len(value) == n, key, f"one value or a list of {n} (one per layer)", list(value))
        for i, v in enumerate(value):
            check(f"{key}[{i}]", v)
        return list(value)
    check(key, value)
    return [value] * n


def _share(key: str, value: Any) -> None:
    ok = isinstance(value, Real) and not isinstance(value, bool) and 0 <= value < 1
    require(ok, key, "in [0, 1)", value)


def _code_width(key: str, value: Any) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 16, key, "an integer in [1, 16]",
            value)


def _epochs(key: str, value: Any) -> None:
    ok = isinstance(value, Real) and not isinstance(value, bool) and value >= 0
    require(ok, key, "a number >= 0", value)


@dataclass(kw_only=True)
class CompressConfig:
    """What the compression pipeline does to which layers (``compress.*`` in ``conf/compress.yaml``)."""

    layers: list[str] | None = None  # prunable units (single convs), input order; None: the first two
    greedy: bool = False  # stage 1 by greedy CAR (trainables.protocol.greedy_car) instead of the criterion's one-shot scores
    # one value for every layer, or a sequence with one per layer (the defaults: the colour model's first two convs)
    filter_ratio: float | Sequence[float] = 0.5  # stage 1: share of each layer's filters removed by the criterion
    sparsity: float | Sequence[float] = (0.8, 0.85)  # stage 2: share of the remaining weights zeroed by magnitude
    bits: int | Sequence[int] = (3, 4)  # stage 3: code width: 2**bits - 1 shared weights + the zero code
    index_bits: int = 4  # relative position index width (Deep Compression: 8 for conv, 5 for fc layers)
    filter_epochs: float = 1.0  # fine-tuning epochs after stage 1 (filters removed)
    prune_epochs: float = 0.5  # ... after stage 2 (weights pruned, the mask held)
    quant_epochs: float = 0.5  # ... after stage 3 (the centroids trained)
    quant_lr: float = 1.0e-3  # lr of stage 3's fine-tuning: a centroid's gradient sums over its members
    kmeans_max_iter: int = 300

    def __post_init__(self) -> None:
        layers = self.layers
        require(layers is None or (isinstance(layers, (list, tuple)) and len(layers) >= 1
                                   and all(isinstance(x, str) for x in layers) and len(set(layers)) == len(layers)),
                "compress.layers", "null or a non-empty list of distinct unit names", layers)
        require(isinstance(self.greedy, bool), "compress.greedy", "true or false", self.greedy)
        n = 2 if layers is None else len(layers)  # None: the model's first two units
        self.ratios_for(n)
        _code_width("compress.index_bits", self.index_bits)
        for key in ("filter_epochs", "prune_epochs", "quant_epochs"):
            _epochs(f"compress.{key}", getattr(self, key))
        ok = isinstance(self.quant_lr, Real) and not isinstance(self.quant_lr, bool) and self.quant_lr > 0
        require(ok, "compress.quant_lr", "a number > 0", self.quant_lr)
        require_int("compress.kmeans_max_iter", self.kmeans_max_iter, 1)

    def ratios_for(self, n: int) -> tuple[list[float], list[float], list[int]]:
        """(filter ratios, sparsities, code widths), one per layer, for ``n`` layers."""
        return (_per_layer("compress.filter_ratio", self.filter_ratio, n, _share),
                _per_layer("compress.sparsity", self.sparsity, n, _share),
                _per_layer("compress.bits", self.bits, n, _code_width))


def check_layers(model: nn.Module, layers: Sequence[str] | None) -> list[Unit]:
    """The units to compress (``None``: the first two), each a single conv; a one-line error otherwise."""
    units = describe_units(model)
    by_name = {u.name: u for u in units}
    if layers is None:
        chosen = units[:2]
    else:
        unknown = [x for x in layers if x not in by_name]
        require(not unknown, "compress.layers", f"units of the model ({', '.join(by_name)})", list(layers))
        chosen = sorted((by_name[x] for x in layers), key=units.index)
    for u in chosen:  # a residual unit spans several convs; its "layer size" would be ambiguous
        require(len(u.convs) == 1, "compress.layers", "units made of a single conv", u.name)
    return chosen


# ---- bit counting and the storage format ----------------------------------------------------


def dense_bits(n_weights: int) -> int:
    """A dense float32 layer of ``n_weights`` weights."""
    return FLOAT_BITS * int(n_weights)


def sparse_layout(nonzero: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (in the flattened layer) of the stored entries and their relative indices.

    ``nonzero`` is a boolean array (any shape, read in C order). An entry's relative index is
    the number of zeros skipped since the previous entry (since the start for the first); it
    must fit ``index_bits`` bits, so a longer run of zeros gets filler entries, each skipping
    ``2**index_bits - 1`` zeros and storing the zero that follows. Returns ``(positions, gaps)``.
    """
    limit = (1 << index_bits) - 1
    positions, gaps = [], []
    previous = -1
    for p in np.flatnonzero(np.asarray(nonzero).ravel()):
        gap = int(p) - previous - 1
        while gap > limit:  # a filler: skip `limit` zeros, store the next (zero) weight
            previous += limit + 1
            positions.append(previous)
            gaps.append(limit)
            gap -= limit + 1
        positions.append(int(p))
        gaps.append(gap)
        previous = int(p)
    return np.asarray(positions, dtype=np.int64), np.asarray(gaps, dtype=np.int64)


def sparse_bits(n_entries: int, index_bits: int, value_bits: int = FLOAT_BITS) -> int:
    """A sparse layer of ``n_entries`` entries (fillers included): value plus relative index each."""
    return int(n_entries) * (value_bits + index_bits)


def quantised_bits(n_entries: int, bits: int, index_bits: int, n_centroids: int) -> int:
    """Fixed-width cluster codes and relative indices, plus the float32 centroids."""
    return sparse_bits(n_entries, index_bits, bits) + FLOAT_BITS * int(n_centroids)


def huffman_lengths(symbols: Sequence[int] | np.ndarray) -> dict[int, int]:
    """Huffman code length of each distinct symbol of ``symbols`` (by its frequency there).

    Written with heapq because what we need is the code itself, exactly: the packages at hand
    (e.g. dahuffman) add an end-of-stream symbol to every code and pad streams to bytes, which
    would put their container format into the bit count. A lone symbol gets a 1-bit code. Ties
    are broken by symbol value, so the lengths are deterministic.
    """
    freq = Counter(int(s) for s in np.asarray(symbols).ravel())
    if not freq:
        return {}
    if len(freq) == 1:
        return {next(iter(freq)): 1}
    counter = itertools.count()
    # heap items: (weight, tie-breaker, symbols of the subtree); merging deepens every symbol by one
    heap = [(w, next(counter), [s]) for s, w in sorted(freq.items())]
    heapq.heapify(heap)
    depth = dict.fromkeys(freq, 0)
    while len(heap) > 1:
        w1, _, a = heapq.heappop(heap)
        w2, _, b = heapq.heappop(heap)
        for s in a + b:
            depth[s] += 1
        heapq.heappush(heap, (w1 + w2, next(counter), a + b))
    return depth


def canonical_codes(lengths: dict[int, int]) -> dict[int, tuple[int, int]]:
    """Canonical Huffman codes: symbol -> (code, length), codes assigned in (length, symbol) order,
    so the table of lengths alone defines the code (as DEFLATE stores it)."""
    codes, code, prev = {}, 0, 0
    for s, n in sorted(lengths.items(), key=lambda kv: (kv[1], kv[0])):
        code <<= n - prev
        codes[s] = (code, n)
        code, prev = code + 1, n
    return codes


def huffman_encode(symbols: Sequence[int] | np.ndarray, lengths: dict[int, int]) -> tuple[bytes, int]:
    """The canonical Huffman bitstream of ``symbols`` (MSB first, last byte zero-padded) and its bit count."""
    codes = canonical_codes(lengths)
    bits = "".join(format(c, f"0{n}b") for c, n in (codes[int(s)] for s in np.asarray(symbols).ravel()))
    if not bits:
        return b"", 0
    padded = bits + "0" * (-len(bits) % 8)
    return int(padded, 2).to_bytes(len(padded) // 8, "big"), len(bits)


def huffman_decode(stream: bytes, n_bits: int, n_symbols: int, lengths: dict[int, int]) -> np.ndarray:
    """The ``n_symbols`` symbols of a ``huffman_encode`` stream."""
    lookup = {(n, c): s for s, (c, n) in canonical_codes(lengths).items()}
    bits = format(int.from_bytes(stream, "big"), f"0{8 * len(stream)}b")[:n_bits] if stream else ""
    out, code, n = [], 0, 0
    for b in bits:
        code, n = (code << 1) | (b == "1"), n + 1
        s = lookup.get((n, code))
        if s is not None:
            out.append(s)
            code, n = 0, 0
    if len(out) != n_symbols or n:
        raise ValueError(f"Huffman stream must decode to {n_symbols} symbols, but got {len(out)} (corrupt stream)")
    return np.asarray(out, dtype=np.int64)


def _table(lengths: dict[int, int]) -> np.ndarray:
    return np.asarray(sorted(lengths.items()), dtype=np.int64).reshape(-1, 2)  # (n_used, 2): symbol, length


def encode_layer(codes: np.ndarray, centroids: np.ndarray, bits: int, index_bits: int) -> dict[str, Any]:
    """The storage form of a quantised layer: a dict of numpy arrays, bytes and ints.

    ``codes`` (the weight's shape) holds 0 for a zero weight and i >= 1 for ``centroids[i - 1]``.
    Fields: ``shape``, ``bits``, ``index_bits``, ``n_entries``, ``centroids`` (float32),
    ``value_table`` / ``gap_table`` ((symbol, code length) rows), ``values`` / ``gaps`` (the
    Huffman bitstreams) and ``value_nbits`` / ``gap_nbits`` (their lengths in bits).
    """
    codes = np.asarray(codes)
    centroids = np.asarray(centroids, dtype=np.float32)
    require(codes.size > 0 and codes.min() >= 0 and codes.max() <= len(centroids), "codes",
            f"integers in [0, {len(centroids)}] (0: zero, i: centroids[i-1])", f"range [{codes.min()}, {codes.max()}]")
    require(len(centroids) < (1 << bits), "centroids", f"at most 2**bits - 1 = {(1 << bits) - 1} values", len(centroids))
    positions, gaps = sparse_layout(codes != 0, index_bits)
    values = codes.ravel()[positions]  # fillers read a zero weight: code 0
    value_lengths, gap_lengths = huffman_lengths(values), huffman_lengths(gaps)
    value_stream, value_nbits = huffman_encode(values, value_lengths)
    gap_stream, gap_nbits = huffman_encode(gaps, gap_lengths)
    return {"shape": np.asarray(codes.shape, dtype=np.int64), "bits": int(bits), "index_bits": int(index_bits),
            "n_entries": len(positions), "centroids": centroids, "value_table": _table(value_lengths),
            "gap_table": _table(gap_lengths), "values": value_stream, "value_nbits": value_nbits,
            "gaps": gap_stream, "gap_nbits": gap_nbits}


def decode_layer(stored: dict[str, Any]) -> Tensor:
    """The dense float32 weight of an ``encode_layer`` dict."""
    n = int(stored["n_entries"])
    values = huffman_decode(stored["values"], int(stored["value_nbits"]), n, dict(stored["value_table"].tolist()))
    gaps = huffman_decode(stored["gaps"], int(stored["gap_nbits"]), n, dict(stored["gap_table"].tolist()))
    positions = np.cumsum(gaps + 1) - 1  # each entry sits one past the zeros it skips
    table = np.concatenate([np.zeros(1, dtype=np.float32), np.asarray(stored["centroids"], dtype=np.float32)])
    flat = np.zeros(int(np.prod(stored["shape"])), dtype=np.float32)
    flat[positions] = table[values]
    return torch.from_numpy(flat.reshape(tuple(int(s) for s in stored["shape"])))


def coded_bits(stored: dict[str, Any]) -> dict[str, int]:
    """Bits of an ``encode_layer`` dict by part, and their ``total``."""
    parts = {
        "centroids": FLOAT_BITS * len(stored["centroids"]),
        "values": int(stored["value_nbits"]),
        "gaps": int(stored["gap_nbits"]),
        "value_table": len(stored["value_table"]) * (int(stored["bits"]) + LENGTH_BITS),
        "gap_table": len(stored["gap_table"]) * (int(stored["index_bits"]) + LENGTH_BITS),
    }
    return {**parts, "total": sum(parts.values())}


def stored_bits(stored: dict[str, Any]) -> int:
    """Total bits of an ``encode_layer`` dict (see ``coded_bits``)."""
    return coded_bits(stored)["total"]


def stage_sizes(codes: np.ndarray, n_centroids: int, bits: int, index_bits: int) -> dict[str, int]:
    """Bits of a layer after stages 2 and 3 from its final codes (the zero pattern is fixed from stage 2 on)."""
    n_entries = len(sparse_layout(np.asarray(codes) != 0, index_bits)[0])
    return {"weights_pruned": sparse_bits(n_entries, index_bits),
            "quantised": quantised_bits(n_entries, bits, index_bits, n_centroids), "n_entries": n_entries}


# ---- the model stages -------------------------------------------------------------------------


def remove_filters(model: nn.Module, units: Sequence[Unit], ratios: Sequence[float],
                   choose: Callable[[nn.Module, Unit, int], Sequence[int]]) -> list[dict]:
    """Stage 1: remove ``ratio`` of each unit's filters, in place; ``choose(model, unit, k)``
    names the ``k`` filters to keep (current numbering).

    Units go from the one nearest the output inward, each scored on the network as pruned so
    far (the protocol's layer_by_layer order). Returns the ``prune_layer`` records.
    """
    log = []
    for unit, ratio in reversed(list(zip(units, ratios, strict=True))):
        current = next(u for u in describe_units(model) if u.name == unit.name)  # its current width
        log.append(prune_layer(model, unit.name, choose(model, current, kept_count(current.n_filters, ratio, 1))))
    return log


def keep_by_score(score: Callable[[nn.Module, Unit], Tensor]) -> Callable[[nn.Module, Unit, int], list[int]]:
    """A ``remove_filters`` chooser from a criterion bound to its data: the ``k`` highest scores."""
    return lambda model, unit, k: select_keep(score(model, unit), k)


def keep_by_greedy_car(batches: Sequence[tuple[Tensor, Tensor]]) -> Callable[[nn.Module, Unit, int], list[int]]:
    """A ``remove_filters`` chooser: keep what greedy CAR (``trainables.protocol.greedy_car``, Abbasi-Asl
    and Yu's algorithm, re-scored after every removal on ``batches``) does not remove."""

    def choose(model: nn.Module, unit: Unit, k: int) -> list[int]:
        from trainables.protocol.greedy_car import greedy_car_order

        removed = set(greedy_car_order(model, unit.name, batches, n_remove=unit.n_filters - k))
        return [i for i in range(unit.n_filters) if i not in removed]
    return choose


def prune_weights(model: nn.Module, convs: Sequence[str], sparsities: Sequence[float]) -> None:
    """Stage 2: mask the ``round(sparsity x n)`` smallest-|w| weights of each conv, in place.

    ``torch.nn.utils.prune`` keeps ``weight_orig`` as the parameter and recomputes
    ``weight = weight_orig * weight_mask`` before each forward, so fine-tuning holds the mask;
    ``torch.nn.utils.prune.remove`` (done by ``quantise``) makes it permanent.
    """
    for name, sparsity in zip(convs, sparsities, strict=True):
        torch_prune.l1_unstructured(model.get_submodule(name), "weight", amount=float(sparsity))


def linear_kmeans(values: np.ndarray, k: int, max_iter: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means of 1-d ``values`` with Deep Compression's linear initialisation: ``k`` centroids
    evenly spaced over [min, max] (Han et al. found it keeps the rare large weights, which
    density-based initialisations lose). Returns (float32 centroids, label per value).
    ``k`` is capped at the number of distinct values."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    x = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    k = min(int(k), len(np.unique(x)))
    init = np.linspace(x.min(), x.max(), k).reshape(-1, 1)
    with threadpool_limits(1):  # a few thousand scalars: OpenMP threads only contend with the training's
        km = KMeans(n_clusters=k, init=init, n_init=1, max_iter=max_iter, random_state=seed).fit(x)
    return km.cluster_centers_.ravel().astype(np.float32), km.labels_.astype(np.int64)


class SharedWeights(nn.Module):
    """A parametrization (``torch.nn.utils.parametrize``): the conv's weight is ``table[codes]``
    with ``table = [0, *centroids]``. Indexing's backward adds up the gradients of every weight
    that reads a centroid, which is Deep Compression's centroid update; code 0 stays zero."""

    def __init__(self, centroids: Tensor, codes: Tensor):
        super().__init__()
        self.centroids = nn.Parameter(centroids.clone())  # (k,)
        self.register_buffer("codes", codes.clone())  # int64, the weight's shape

    def forward(self, weight: Tensor) -> Tensor:  # the original weight is not read
        table = torch.cat([self.centroids.new_zeros(1), self.centroids])
        return table[self.codes]


def quantise(model: nn.Module, convs: Sequence[str], bits: Sequence[int], max_iter: int = 300, seed: int = 0) -> None:
    """Stage 3: share the nonzero weights of each conv among ``2**bits - 1`` k-means centroids
    (``bits``: one per conv).

    Makes stage 2's mask permanent, then replaces each weight with a ``SharedWeights``
    parametrization (in place); ``shared_codes`` reads the result.
    """
    for name, width in zip(convs, bits, strict=True):
        conv = model.get_submodule(name)
        if torch_prune.is_pruned(conv):
            torch_prune.remove(conv, "weight")
        w = conv.weight.detach()
        nz = w != 0
        centroids, labels = linear_kmeans(w[nz].cpu().numpy(), (1 << width) - 1, max_iter, seed)
        codes = torch.zeros(w.shape, dtype=torch.int64, device=w.device)
        codes[nz] = torch.from_numpy(labels + 1).to(w.device)
        parametrize.register_parametrization(conv, "weight", SharedWeights(torch.from_numpy(centroids).to(w), codes))


def shared_codes(model: nn.Module, conv: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes, float32 centroids) of a conv quantised by ``quantise``."""
    shared = model.get_submodule(conv).parametrizations.weight[0]
    return shared.codes.cpu().numpy(), shared.centroids.detach().cpu().numpy().astype(np.float32)


# ---- the pipeline -----------------------------------------------------------------------------


def _layer_row(name: str, base_shape: tuple[int, ...], pruned_shape: tuple[int, ...], sizes: dict,
               stored: dict, sparsity: float, has_bias: bool) -> dict:
    n_base = int(np.prod(base_shape))
    parts = coded_bits(stored)
    bits = {"base": dense_bits(n_base), "filters_removed": dense_bits(int(np.prod(pruned_shape))),
            "weights_pruned": sizes["weights_pruned"], "quantised": sizes["quantised"], "huffman": parts["total"]}
    # The bias (one float32 per kept filter) is not pruned or shared; Deep Compression counts
    # weights only, so it is kept apart, in bias_bits.
    bias = {s: dense_bits(base_shape[0] if s == "base" else pruned_shape[0]) if has_bias else 0 for s in STAGES}
    return {"name": name, "shape_base": list(base_shape), "shape_pruned": list(pruned_shape), "sparsity": sparsity,
            "bits_per_code": int(stored["bits"]),
            "n_nonzero": int(sizes["n_nonzero"]), "n_entries": sizes["n_entries"], "n_centroids": len(stored["centroids"]),
            "bits": bits, "ratio": {s: bits["base"] / b for s, b in bits.items()}, "bias_bits": bias,
            "huffman_parts": parts}


def _totals(rows: list[dict]) -> dict:
    bits = {s: sum(r["bits"][s] for r in rows) for s in STAGES}
    with_bias = {s: bits[s] + sum(r["bias_bits"][s] for r in rows) for s in STAGES}
    return {"bits": bits, "ratio": {s: bits["base"] / b for s, b in bits.items()},
            "bits_with_bias": with_bias, "ratio_with_bias": {s: with_bias["base"] / b for s, b in with_bias.items()}}


def compress_model(model: nn.Module, splits: Any, cfg: CompressConfig, finetune: Any,
                   choose: Callable[[nn.Module, Unit, int], Sequence[int]], *, seed: int = 0, progress: bool = False,
                   evaluate_test: bool = True, log: Callable[[str], None] = print) -> tuple[dict, dict[str, dict]]:
    """Run the four stages on ``model`` (in place) and return ``(record, storage)``.

    ``splits`` is a ``data.DataSplits``, ``finetune`` a ``FinetuneConfig`` (stage 3 uses
    ``cfg.quant_lr`` instead of its lr), ``choose(model, unit, k)`` the structural step's
    choice of the ``k`` filters to keep (``keep_by_score`` of a criterion, or greedy CAR). At the end the
    model's chosen convs hold the decoded weights (a plain dense conv each). ``record`` holds
    per stage the val accuracy after its fine-tuning (``val_acc``) and per layer and in total
    the bits and the ratio to the dense original (see the module docstring); ``storage``
    maps each conv to its ``encode_layer`` dict.
    """
    from dataclasses import replace

    from trainables.protocol.finetune import Finetuner

    t0 = time.perf_counter()
    units = check_layers(model, cfg.layers)
    convs = [u.convs[0] for u in units]
    filter_ratios, sparsities, widths = cfg.ratios_for(len(units))
    base_shapes = {c: tuple(model.get_submodule(c).weight.shape) for c in convs}
    quiet = lambda _m: None  # noqa: E731  (the record keeps what matters)
    tuner = Finetuner(model, splits, finetune, seed, quiet, progress,
                      cfg.filter_epochs + cfg.prune_epochs + cfg.quant_epochs)
    val: dict[str, float] = {"base": tuner.val_acc(full=True)}
    log(f"stage 0 base: val_acc={val['base']:.4f}")

    def stage(name: str, epochs: float, i: int, tune: Finetuner) -> None:
        with torch.random.fork_rng(devices=[]):  # dropout draws seeded per stage
            torch.manual_seed(seed * 1_000 + i)
            if epochs > 0:
                tune.finetune(epochs, name, anneal=finetune.anneal_final)
        val[name] = tune.val_acc(full=True)
        log(f"stage {i} {name}: val_acc={val[name]:.4f} ({time.perf_counter() - t0:.0f}s)")

    prune_log = remove_filters(model, units, filter_ratios, choose)
    stage("filters_removed", cfg.filter_epochs, 1, tuner)
    pruned_shapes = {c: tuple(model.get_submodule(c).weight.shape) for c in convs}
    prune_weights(model, convs, sparsities)
    stage("weights_pruned", cfg.prune_epochs, 2, tuner)
    quantise(model, convs, widths, cfg.kmeans_max_iter, seed)
    tuner.close()
    # The centroids' gradients are sums over their members, hence a learning rate of their own;
    # the batch stream continues where stage 2 left it.
    qtuner = Finetuner(model, splits, replace(finetune, lr=cfg.quant_lr), seed, quiet, progress, cfg.quant_epochs,
                       start_step=tuner.step)
    stage("quantised", cfg.quant_epochs, 3, qtuner)
    qtuner.close()
    storage, rows = {}, []
    for conv, sparsity, width in zip(convs, sparsities, widths, strict=True):
        codes, centroids = shared_codes(model, conv)
        storage[conv] = stored = encode_layer(codes, centroids, width, cfg.index_bits)
        sizes = {**stage_sizes(codes, len(centroids), width, cfg.index_bits), "n_nonzero": int((codes != 0).sum())}
        has_bias = model.get_submodule(conv).bias is not None
        rows.append(_layer_row(conv, base_shapes[conv], pruned_shapes[conv], sizes, stored, sparsity, has_bias))
    _load_decoded(model, storage)
    val["huffman"] = qtuner.val_acc(full=True)  # the decoded model: lossless coding, same accuracy
    log(f"stage 4 huffman: val_acc={val['huffman']:.4f} (decoded weights)")
    record = {
        "layers": rows, "val_acc": val, "prune_log": prune_log, "total": _totals(rows),
        "accuracy_loss_points": 100 * (val["base"] - val["huffman"]),
        "final_test_acc": qtuner.evaluate(splits.test)["top1"] if evaluate_test else None,
        "wall_s": time.perf_counter() - t0,
    }
    return record, storage


@torch.no_grad()
def _load_decoded(model: nn.Module, storage: dict[str, dict]) -> None:
    """Swap each quantised conv's parametrization for its decoded dense weight; they must be equal bit for bit."""
    for conv, stored in storage.items():
        module = model.get_submodule(conv)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        decoded = decode_layer(stored).to(module.weight)
        if not torch.equal(decoded, module.weight):
            raise RuntimeError(f"the decoded weight of {conv} differs from the quantised one")
        module.weight.copy_(decoded)
