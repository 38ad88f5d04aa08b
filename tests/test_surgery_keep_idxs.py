"""keep_idxs are integers, read once, checked alike by ``prune_layer`` and ``mask_filters``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from trainables import build_model, describe_units, mask_filters, prune_layer

BAD = [
    pytest.param([0.5, 2.7], r"keep_idxs must be integers, but got 0.5$", id="floats"),
    pytest.param([1, 2.0], r"keep_idxs must be integers, but got 2.0$", id="integral-float"),
    pytest.param([True], r"keep_idxs must be integers, but got True$", id="bool"),
    pytest.param([np.True_, 1], r"keep_idxs must be integers, but got np.True_$", id="numpy-bool"),
    pytest.param([np.float64(1.0)], r"keep_idxs must be integers, but got np.float64\(1.0\)$", id="numpy-float-scalar"),
    pytest.param(np.array([1.0, 2.0]), r"keep_idxs must be integers, but got a numpy array of dtype float64$", id="numpy-float-array"),
    pytest.param(torch.tensor([1.0, 2.0]), r"keep_idxs must be integers, but got a tensor of dtype torch.float32$", id="float-tensor"),
    pytest.param(torch.tensor([True, False]), r"keep_idxs must be integers, but got a tensor of dtype torch.bool$", id="bool-tensor"),
    pytest.param([torch.tensor(1.0)], r"keep_idxs must be integers, but got tensor\(1.\)$", id="float-tensor-element"),
    pytest.param(torch.tensor([[0, 1]]), r"keep_idxs must be one-dimensional, but got a 2-d tensor$", id="2d-tensor"),
    pytest.param([None], r"keep_idxs must be integers, but got None$", id="none"),
    pytest.param("01", r"keep_idxs must be a sequence of integers, but got '01'$", id="string"),
    pytest.param(3, r"keep_idxs must be a sequence of integers, but got 3$", id="bare-int"),
    pytest.param([1, 1], r"keep_idxs has duplicates: 1$", id="duplicate"),
    pytest.param([3, 1, 3, 2, 1], r"keep_idxs has duplicates: 1, 3$", id="duplicates"),
    pytest.param(np.array([0, 16]), r"keep_idxs \[16\] out of range; valid indices are 0..15$", id="numpy-out-of-range"),
]

GOOD = [
    pytest.param(lambda: (i for i in [5, 0, 3]), id="generator"),  # read once: no false "duplicates"
    pytest.param(lambda: np.array([5, 0, 3]), id="numpy-int-array"),
    pytest.param(lambda: np.array([5, 0, 3], dtype=np.uint8), id="numpy-uint8-array"),
    pytest.param(lambda: [np.int64(5), np.int32(0), 3], id="numpy-int-scalars"),
    pytest.param(lambda: torch.tensor([5, 0, 3]), id="int-tensor"),
    pytest.param(lambda: [torch.tensor(5), torch.tensor(0), torch.tensor(3)], id="int-tensor-elements"),
    pytest.param(lambda: (5, 0, 3), id="tuple"),
    pytest.param(lambda: {0, 3, 5}, id="set"),
]


@pytest.fixture(scope="module")
def small_cnn():
    torch.manual_seed(0)
    return build_model("small_cnn").eval()


@pytest.mark.parametrize("keep, message", BAD)
def test_prune_layer_refuses_bad_keep_idxs(small_cnn, keep, message):
    model = copy.deepcopy(small_cnn)
    with pytest.raises(ValueError, match=r"^unit 'features.0': " + message):
        prune_layer(model, "features.0", keep)
    assert model.features[0].out_channels == 16  # nothing was touched


@pytest.mark.parametrize("keep, message", BAD)
def test_mask_filters_refuses_bad_keep_idxs(small_cnn, keep, message):
    model = copy.deepcopy(small_cnn)
    unit = describe_units(model)[0]
    with pytest.raises(ValueError, match=r"^unit 'features.0': " + message):
        mask_filters(model, unit, keep)
    assert torch.equal(model.features[0].weight, small_cnn.features[0].weight)


@pytest.mark.parametrize("make_keep", GOOD)
def test_int_like_keep_idxs_are_accepted(small_cnn, make_keep):
    model = copy.deepcopy(small_cnn)
    record = prune_layer(model, "features.0", make_keep())
    assert record["keep_idxs"] == [0, 3, 5] and all(type(i) is int for i in record["keep_idxs"])
    assert model.features[0].out_channels == 3

    masked, reference = copy.deepcopy(small_cnn), copy.deepcopy(small_cnn)
    unit = describe_units(masked)[0]
    mask_filters(masked, unit, make_keep())
    mask_filters(reference, unit, [0, 3, 5])
    assert torch.equal(masked.features[0].weight, reference.features[0].weight)
    assert int((masked.features[0].weight.flatten(1).abs().sum(dim=1) > 0).sum()) == 3


def test_mask_filters_may_mask_every_filter_but_prune_layer_may_not(small_cnn):
    model = copy.deepcopy(small_cnn)
    unit = describe_units(model)[0]
    mask_filters(model, unit, [])  # a one-filter unit's CAR ablation masks all of it
    assert not model.features[0].weight.any() and not model.features[1].weight.any()
    with pytest.raises(ValueError, match=r"keep_idxs is empty"):
        prune_layer(model, "features.0", iter([]))
