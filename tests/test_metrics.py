"""Metrics are right when they match hand counts: FLOPs = 2 x MACs, parameters, accuracy."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainables import (
    build_model,
    count_flops,
    count_params,
    deployment_form,
    evaluate,
    measure_latency,
    prune_layer,
)


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking BN statistics, so that a wrong fold shows up in the output."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
    return model


# --- FLOPs and parameters -------------------------------------------------------------------


def test_conv_flops_are_twice_the_macs():
    model = nn.Sequential(nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1, bias=False))
    h_out, w_out = (10 + 2 - 3) // 2 + 1, (12 + 2 - 3) // 2 + 1  # (5, 6)
    macs = 8 * h_out * w_out * (3 * 3 * 3)  # output values x (C_in x kH x kW)
    assert count_flops(model, input_shape=(3, 10, 12)) == 2 * macs


def test_linear_flops_are_twice_the_macs():
    model = nn.Sequential(nn.Linear(20, 7))
    assert count_flops(model, input_shape=(20,)) == 2 * 20 * 7


def test_flops_fall_after_pruning_by_the_removed_macs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    model.input_shape = (3, 6, 6)
    before = count_flops(model)
    prune_layer(model, "0", keep_idxs=[0, 2, 5])  # 8 -> 3 filters
    after = count_flops(model)
    assert 0 < after < before
    # Both convs lose 5 of their 8 channels: 5 output maps of the first, 5 input maps of the second.
    assert before - after == 2 * (5 * 6 * 6 * 3 * 9 + 4 * 6 * 6 * 5 * 9)


def test_count_params_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 5))
    conv, bn, linear = 8 * 3 * 3 * 3 + 8, 8 + 8, 8 * 5 + 5  # running stats are buffers, not parameters
    assert count_params(model) == conv + bn + linear


# --- deployment form and latency --------------------------------------------------------


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("arch", ["small_cnn", "resnet20_cifar"])
def test_deployment_form_computes_what_the_model_computes(arch, channels_last):
    torch.manual_seed(0)
    model = _randomise_bn(build_model(arch)).train()
    x = torch.randn(4, *model.input_shape, generator=torch.Generator().manual_seed(1))
    deployed = deployment_form(model, channels_last=channels_last)
    assert model.training, "deployment_form must not switch the caller's model to eval"
    with torch.no_grad():
        expected, got = model.eval()(x), deployed(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


class _ConvPlusBias(nn.Module):
    """conv -> add a broadcast (1, C, 1, 1) tensor -> relu: an add the fused kernel cannot take."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.shift = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x) + self.shift)


def test_deployment_form_keeps_a_broadcasting_add_right():
    torch.manual_seed(0)
    model, x = _ConvPlusBias(), torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.allclose(deployment_form(model)(x), model(x), rtol=1e-5, atol=1e-6)


def test_deployment_form_folds_batchnorm():
    model = _randomise_bn(build_model("small_cnn"))
    deployed = deployment_form(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "the caller's model is untouched"


def test_measure_latency_reports_its_conditions():
    model = build_model("small_cnn").train()
    result = measure_latency(model, batch_size=3, threads=1, warmup=1, repeats=4)
    assert result["median_ms"] > 0
    assert result["batch_size"] == 3 and result["threads"] == 1 and result["device"] == "cpu"
    assert len(result["times_ms"]) == 4 and all(t > 0 for t in result["times_ms"])
    assert min(result["times_ms"]) <= result["median_ms"] <= max(result["times_ms"])
    assert model.training, "measure_latency must not switch the caller's model to eval"


def test_measure_latency_times_a_deployed_model_as_given():
    model = build_model("small_cnn").train()
    deployed = deployment_form(model)
    result = measure_latency(deployed.train(), batch_size=2, deploy=False, warmup=0, repeats=2)
    assert len(result["times_ms"]) == 2
    assert deployed.training, "the mode of the timed model is restored"


@pytest.mark.parametrize(
    "kwargs", [{"batch_size": 0}, {"batch_size": 2, "repeats": 0}, {"batch_size": 2, "warmup": -1}, {"batch_size": 2, "threads": 0}]
)
def test_measure_latency_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="measure_latency"):
        measure_latency(build_model("small_cnn"), **kwargs)


# --- accuracy ---------------------------------------------------------------------------------


class _Logits(nn.Module):
    """Returns its input: each scored 'image' is the row of logits we want evaluated."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))  # evaluate reads the device from a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _ce(row: list[float], label: int) -> float:
    return math.log(sum(math.exp(v) for v in row)) - row[label]


def test_evaluate_top1_top5_and_loss_by_hand():
    rows = [
        [5.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # label 0 ranked 1st: top-1 and top-5 hit
        [1.0, 3.0, 2.0, 0.0, 0.0, 0.0],  # label 2 ranked 2nd: top-5 hit only
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # label 0 ranked 6th: miss
        [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # label 3 ranked 4th: top-5 hit only
    ]
    labels = [0, 2, 0, 3]
    x, y = torch.tensor(rows), torch.tensor(labels)
    result = evaluate(_Logits(), [(x[:2], y[:2]), (x[2:], y[2:])])  # two batches add up
    assert result["n"] == 4
    assert result["top1"] == pytest.approx(1 / 4)
    assert result["top5"] == pytest.approx(3 / 4)
    assert result["loss"] == pytest.approx(sum(map(_ce, rows, labels)) / 4, rel=1e-6)


def test_evaluate_class_subset_scores_among_the_subset_only():
    rows = [
        [9.0, 1.0, 0.0, 2.0, 0.0, 0.0],  # label 3: wrong over all classes, right among {1, 3, 4}
        [0.0, 1.0, 0.0, 0.0, 2.0, 0.0],  # label 1: wrong among {1, 3, 4} too (4 wins)
        [5.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 0: not in the subset, skipped
    ]
    x, y = torch.tensor(rows), torch.tensor([3, 1, 0])
    full = evaluate(_Logits(), [(x, y)])
    assert full["top1"] == pytest.approx(1 / 3)  # only the third row is right over all classes
    sub = evaluate(_Logits(), [(x, y)], classes=[4, 1, 3])
    assert sub["n"] == 2
    assert sub["top1"] == pytest.approx(1 / 2)
    assert sub["top5"] == pytest.approx(1.0)  # k = 3 subset classes: every label is in the top k
    cols = [1, 3, 4]
    expected = (_ce([rows[0][c] for c in cols], 1) + _ce([rows[1][c] for c in cols], 0)) / 2
    assert sub["loss"] == pytest.approx(expected, rel=1e-6)


def test_evaluate_rejects_a_subset_with_no_image():
    x, y = torch.zeros(2, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="no image"):
        evaluate(_Logits(), [(x, y)], classes=[3])
