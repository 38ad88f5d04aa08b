"""The compression pipeline: bit counts by hand, Huffman coding, the storage round trip, the
stages on a tiny model, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from data import get_data
from trainables import build_model, get_criterion
from trainables.criteria import ScoringContext
from trainables.experiments.compression import (
    STAGES,
    CompressConfig,
    SharedWeights,
    check_layers,
    coded_bits,
    compress_model,
    decode_layer,
    encode_layer,
    huffman_decode,
    huffman_encode,
    huffman_lengths,
    keep_by_greedy_car,
    keep_by_score,
    linear_kmeans,
    prune_weights,
    quantise,
    quantised_bits,
    shared_codes,
    sparse_bits,
    sparse_layout,
)
from trainables.protocol.config import FinetuneConfig


def test_sparse_layout_by_hand():
    # index_bits=2: a relative index holds 0..3 skipped zeros.
    # positions: 1 (skips 1), 2 (skips 0), then 9 zeros (3..11) before 12: more than 3, so
    # fillers at 6 (skips 3..5) and 10 (skips 7..9), then 12 skips 11 -> gap 1.
    nonzero = np.zeros(14, dtype=bool)
    nonzero[[1, 2, 12]] = True
    positions, gaps = sparse_layout(nonzero, index_bits=2)
    assert positions.tolist() == [1, 2, 6, 10, 12]
    assert gaps.tolist() == [1, 0, 3, 3, 1]
    # float32 values + 2-bit indices: 5 entries x 34 bits; 3-bit codes + 7 centroids at 32 bits
    assert sparse_bits(len(positions), 2) == 5 * 34
    assert quantised_bits(len(positions), 3, 2, 7) == 5 * 5 + 7 * 32


def test_sparse_layout_reads_c_order_and_empty():
    grid = np.array([[0, 0, 1], [1, 0, 0]], dtype=bool)  # flattened: 0 0 1 1 0 0
    positions, gaps = sparse_layout(grid, index_bits=4)
    assert positions.tolist() == [2, 3] and gaps.tolist() == [2, 0]
    assert [len(a) for a in sparse_layout(np.zeros(5, dtype=bool), 4)] == [0, 0]


def test_huffman_lengths_by_hand():
    # frequencies a=5, b=2, c=1, d=1: merge c+d (2), then b+(cd) (4), then a+(bcd) (9):
    # a at depth 1, b at 2, c and d at 3; the stream is 5x1 + 2x2 + 1x3 + 1x3 = 15 bits.
    symbols = [0] * 5 + [1] * 2 + [2, 3]
    lengths = huffman_lengths(symbols)
    assert lengths == {0: 1, 1: 2, 2: 3, 3: 3}
    stream, n_bits = huffman_encode(symbols, lengths)
    assert n_bits == 15 and len(stream) == 2
    assert huffman_decode(stream, n_bits, len(symbols), lengths).tolist() == symbols
    assert huffman_lengths([7, 7, 7]) == {7: 1}  # a lone symbol still costs a bit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_huffman_never_beats_entropy_nor_loses_to_fixed_width(seed):
    rng = np.random.default_rng(seed)
    symbols = rng.geometric(0.3, size=500).clip(max=15)
    lengths = huffman_lengths(symbols)
    _, n_bits = huffman_encode(symbols, lengths)
    p = np.bincount(symbols) / len(symbols)
    entropy = -(p[p > 0] * np.log2(p[p > 0])).sum() * len(symbols)
    assert entropy <= n_bits < entropy + len(symbols)  # Shannon's bounds
    assert n_bits <= 4 * len(symbols)  # never worse than the 4-bit fixed code
    assert sum(2.0 ** -n for n in lengths.values()) == 1.0  # a complete prefix code


def test_encode_decode_round_trip_and_bits_by_hand():
    # a 1x1x2x4 weight: codes 0 0 2 1 | 0 0 0 1, centroids [-0.5, 0.25]; index_bits=2
    codes = np.array([0, 0, 2, 1, 0, 0, 0, 1]).reshape(1, 1, 2, 4)
    centroids = np.array([-0.5, 0.25], dtype=np.float32)
    stored = encode_layer(codes, centroids, bits=2, index_bits=2)
    # entries at 2 (gap 2), 3 (gap 0), 7 (gap 3): values 2, 1, 1 and gaps 2, 0, 3
    assert stored["n_entries"] == 3
    # value Huffman: 1 twice, 2 once -> lengths 1 and 1: 3 bits; gaps 2, 0, 3 once each -> 1+2+2 = 5 bits
    bits = coded_bits(stored)
    assert (bits["values"], bits["gaps"]) == (3, 5)
    assert bits["centroids"] == 2 * 32
    assert bits["value_table"] == 2 * (2 + 5) and bits["gap_table"] == 3 * (2 + 5)
    assert bits["total"] == 3 + 5 + 64 + 14 + 21
    expected = torch.tensor([0, 0, 0.25, -0.5, 0, 0, 0, -0.5]).reshape(1, 1, 2, 4)
    assert torch.equal(decode_layer(stored), expected)


@pytest.mark.parametrize("index_bits", [1, 3, 8])
def test_round_trip_of_random_sparse_codes(index_bits):
    rng = np.random.default_rng(index_bits)
    codes = rng.integers(1, 8, size=(6, 3, 3, 3)) * (rng.random((6, 3, 3, 3)) < 0.2)
    centroids = rng.normal(size=7).astype(np.float32)
    stored = encode_layer(codes, centroids, bits=3, index_bits=index_bits)
    table = np.concatenate([[0], centroids]).astype(np.float32)
    assert np.array_equal(decode_layer(stored).numpy(), table[codes])


def test_linear_kmeans_initialises_over_the_range_and_is_deterministic():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 0.05, 300), [0.9, -0.8]])  # two rare large weights
    c1, l1 = linear_kmeans(values, 7, seed=0)
    c2, l2 = linear_kmeans(values, 7, seed=0)
    assert np.array_equal(c1, c2) and np.array_equal(l1, l2)
    # linear initialisation keeps a centroid on each rare large weight (Han et al.'s reason for it)
    assert np.isclose(c1.max(), 0.9, atol=1e-6) and np.isclose(c1.min(), -0.8, atol=1e-6)
    assert len(linear_kmeans(np.array([0.1, 0.1, 0.2]), 7)[0]) == 2  # capped at the distinct values


def _conv_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.ReLU(), nn.Conv2d(8, 4, 3, bias=False))


def test_weight_mask_is_held_through_training():
    model = _conv_model()
    prune_weights(model, ["0", "2"], [0.5, 0.75])
    zero = [(model[i].weight == 0).clone() for i in (0, 2)]
    assert [int(z.sum()) for z in zero] == [round(0.5 * 216), round(0.75 * 288)]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3, 9, 9)).square().mean().backward()
        opt.step()
    for i, z in zip((0, 2), zero, strict=True):
        assert bool((model[i].weight[z] == 0).all())  # the masked weights stayed zero ...
        assert not torch.equal(model[i].weight_orig[z], torch.zeros_like(model[i].weight_orig[z]))  # ... though trained


def test_centroid_gradient_is_the_sum_of_its_members():
    model = _conv_model()
    prune_weights(model, ["0"], [0.5])
    quantise(model, ["0"], bits=[2])
    codes, centroids = shared_codes(model, "0")
    assert len(centroids) == 3 and set(np.unique(codes)) <= {0, 1, 2, 3}
    # the same forward with a plain dense weight: its gradient summed per code
    dense = model[0].weight.detach().clone().requires_grad_(True)
    x = torch.randn(2, 3, 9, 9)
    F.conv2d(x, dense).square().sum().backward()
    out = model[0](x)
    out.square().sum().backward()
    grad = model[0].parametrizations.weight[0].centroids.grad
    expected = torch.stack([dense.grad[torch.from_numpy(codes) == i].sum() for i in (1, 2, 3)])
    assert torch.allclose(grad, expected, rtol=1e-5, atol=1e-6)


def test_decoded_conv_matches_the_quantised_model_exactly():
    model = _conv_model(seed=3)
    prune_weights(model, ["0", "2"], [0.6, 0.8])
    quantise(model, ["0", "2"], bits=[3, 3])
    x = torch.randn(5, 3, 11, 11)
    for name in ("0", "2"):
        conv = model.get_submodule(name)
        assert isinstance(conv.parametrizations.weight[0], SharedWeights)
        codes, centroids = shared_codes(model, name)
        decoded = decode_layer(encode_layer(codes, centroids, bits=3, index_bits=3))
        inp = x if name == "0" else torch.relu(model[0](x))
        with torch.no_grad():
            assert torch.equal(F.conv2d(inp, decoded), conv(inp))


@pytest.fixture(scope="module")
def splits(tiny_fmnist):
    return get_data("fashion_mnist", str(tiny_fmnist), val_size=100)


def test_stages_shrink_the_layers_and_the_result_runs(splits):
    torch.manual_seed(0)
    model = build_model("small_cnn", width=4)
    cfg = CompressConfig(filter_ratio=[0.5, 0.25], sparsity=[0.5, 0.7], bits=[2, 3], index_bits=3,
                         filter_epochs=0.2, prune_epochs=0.2, quant_epochs=0.2)
    ft = FinetuneConfig(batch_size=32, eval_batch_size=100)
    car = get_criterion("car")
    ctx = ScoringContext(batches=[next(iter(torch.utils.data.DataLoader(splits.train_eval, batch_size=32)))])
    record, storage = compress_model(model, splits, cfg, ft, keep_by_score(lambda m, u: car(m, u, ctx)), seed=0,
                                     evaluate_test=False, log=lambda _m: None)
    assert [r["name"] for r in record["layers"]] == ["features.0", "features.4"] == list(storage)
    first, second = record["layers"]
    assert first["shape_pruned"] == [2, 1, 3, 3]  # half of 4 filters
    assert second["shape_pruned"] == [6, 2, 3, 3]  # a quarter of 8 filters, inputs follow the first
    for row in record["layers"]:
        bits = [row["bits"][s] for s in STAGES[:4]]
        assert all(a > b for a, b in zip(bits, bits[1:], strict=False)), bits  # stages 0-3 strictly shrink
        parts = row["huffman_parts"]
        assert parts["values"] <= row["n_entries"] * row["bits_per_code"] and parts["gaps"] <= row["n_entries"] * cfg.index_bits
    # the model now runs on the decoded weights: plain convs equal to the storage's decoding
    for conv, stored in storage.items():
        module = model.get_submodule(conv)
        assert not hasattr(module, "parametrizations")
        assert torch.equal(module.weight.detach(), decode_layer(stored))
    assert record["val_acc"]["huffman"] == record["val_acc"]["quantised"]  # lossless coding
    assert set(record["val_acc"]) == set(STAGES)


def test_greedy_chooser_keeps_what_greedy_car_does_not_remove(splits):
    from trainables.core.surgery import describe_units
    from trainables.protocol.greedy_car import greedy_car_order_naive

    torch.manual_seed(1)
    model = build_model("small_cnn", width=4)
    batches = [next(iter(torch.utils.data.DataLoader(splits.train_eval, batch_size=16)))]
    unit = describe_units(model)[0]
    keep = keep_by_greedy_car(batches)(model, unit, 1)
    removed = greedy_car_order_naive(model, unit.name, batches, n_remove=3)
    assert len(keep) == 1 and sorted(keep + removed) == list(range(4))


@pytest.mark.parametrize("kwargs, musts", [
    ({"filter_ratio": 1.0}, ["compress.filter_ratio must be in [0, 1), but got 1.0"]),
    ({"sparsity": [0.5]}, ["compress.sparsity must be one value or a list of 2 (one per layer), but got [0.5]"]),
    ({"layers": ["a"], "sparsity": [0.5, -0.1]}, ["compress.sparsity must be one value or a list of 1"]),
    ({"layers": ["a", "b"], "sparsity": [0.5, -0.1]}, ["compress.sparsity[1] must be in [0, 1), but got -0.1"]),
    ({"bits": 0}, ["compress.bits must be an integer in [1, 16], but got 0"]),
    ({"bits": [4, 17]}, ["compress.bits[1] must be an integer in [1, 16], but got 17"]),
    ({"index_bits": True}, ["compress.index_bits must be an integer in [1, 16], but got True"]),
    ({"quant_epochs": -1}, ["compress.quant_epochs must be a number >= 0, but got -1"]),
    ({"quant_lr": 0}, ["compress.quant_lr must be a number > 0, but got 0"]),
    ({"greedy": "yes"}, ["compress.greedy must be true or false, but got 'yes'"]),
    ({"layers": []}, ["compress.layers must be null or a non-empty list of distinct unit names, but got []"]),
    ({"layers": ["a", "a"]}, ["compress.layers must be null or a non-empty list of distinct unit names"]),
])
def test_config_refuses(kwargs, musts):
    with pytest.raises(ValueError) as info:
        CompressConfig(**kwargs)
    text = str(info.value)
    assert "\n" not in text and all(m in text for m in musts), text


def test_layers_must_be_single_conv_units():
    with pytest.raises(ValueError, match="compress.layers must be units of the model"):
        check_layers(build_model("small_cnn"), ["features.99"])
    with pytest.raises(ValueError, match="compress.layers must be units made of a single conv"):
        check_layers(build_model("resnet20_cifar"), ["conv1"])  # conv1 + the stage-1 block outputs
    assert [u.name for u in check_layers(build_model("small_cnn"), None)] == ["features.0", "features.4"]


def test_encode_refuses_codes_outside_the_codebook():
    with pytest.raises(ValueError, match="codes must be integers in"):
        encode_layer(np.array([0, 3]), np.array([0.1, 0.2], dtype=np.float32), bits=2, index_bits=2)


@pytest.mark.slow  # trains a tiny base model first; the stages themselves are tested above
def test_command_line_end_to_end(tiny_fmnist, tmp_path, capsys):
    from trainables.compress import main

    args = [f"data.root={tiny_fmnist}", "data.val_size=100", "data.batch_size=32", "data.eval_batch_size=100",
            "model=small_cnn", "data=fashion_mnist", "model.pretrain.epochs=1", f"cache_dir={tmp_path / 'cache'}",
            f"output_dir={tmp_path / 'out'}", "progress=false", "prune.score_batches=1", "compress.bits=2",
            "compress.filter_epochs=0.1", "compress.prune_epochs=0.1", "compress.quant_epochs=0.1"]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    path = Path(lines[-1])
    record = json.loads(path.read_text())
    assert record["criterion"] == "car" and [r["name"] for r in record["layers"]] == ["features.0", "features.4"]
    assert any(line.startswith("huffman") for line in lines)
    # the saved storage decodes to the pruned layers' shapes, with as many nonzeros as the record says
    saved = np.load(path.parent / "layers.npz")
    for row in record["layers"]:
        stored = {k.split("/", 1)[1]: saved[k] for k in saved.files if k.startswith(row["name"] + "/")}
        for key in ("values", "gaps"):
            stored[key] = stored[key].tobytes()
        weight = decode_layer(stored)
        assert list(weight.shape) == row["shape_pruned"]
        assert int((weight != 0).sum()) <= row["n_nonzero"]  # a centroid may sit at exactly 0
        assert coded_bits(stored)["total"] == row["bits"]["huffman"]
