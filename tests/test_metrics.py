"""Metrics are right when they match hand counts: FLOPs = 2 x MACs, parameters, accuracy."""

from __future__ import annotations

import copy
import math
import time

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


class _Recorder(nn.Module):
    """Records, at every forward pass, the conditions it ran under; sleeps ``sleeps_s[i]`` on call i."""

    def __init__(self, sleeps_s: tuple[float, ...] = (), fail: bool = False):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.sleeps_s, self.fail = sleeps_s, fail
        self.calls: list[dict] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append({
            "threads": torch.get_num_threads(), "training": self.training, "shape": tuple(x.shape),
            "channels_last": x.is_contiguous(memory_format=torch.channels_last), "grad": torch.is_grad_enabled(),
        })
        if self.fail:
            raise RuntimeError("forward failed")
        if len(self.calls) <= len(self.sleeps_s):
            time.sleep(self.sleeps_s[len(self.calls) - 1])
        return x * self.scale


@pytest.fixture
def two_threads():
    """torch runs with 2 intra-op threads during the test; the caller's setting is put back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_measure_latency_runs_under_the_reported_conditions_and_restores_them(two_threads):
    rec = _Recorder().train()
    result = measure_latency(rec, batch_size=3, input_shape=(2, 5, 4), threads=1, warmup=2, repeats=4, deploy=False)
    assert len(rec.calls) == 2 + 4, "warmup + repeats passes, on the model given (deploy=False: not a copy)"
    assert {c["shape"] for c in rec.calls} == {(3, 2, 5, 4)}  # batch_size images of input_shape
    assert {c["threads"] for c in rec.calls} == {1}, "the passes ran with the requested threads"
    assert not any(c["training"] or c["grad"] for c in rec.calls), "timed in eval mode, without autograd"
    assert all(c["channels_last"] for c in rec.calls)
    assert (result["batch_size"], result["threads"], result["device"]) == (3, 1, "cpu")
    assert len(result["times_ms"]) == 4
    assert torch.get_num_threads() == 2, "the caller's thread count is restored"
    assert rec.training, "the caller's mode is restored"
    # threads=None: torch's current setting is used and reported
    rec.calls.clear()
    result = measure_latency(rec, batch_size=1, input_shape=(2, 3, 3), warmup=0, repeats=1, channels_last=False, deploy=False)
    assert result["threads"] == 2 and [c["threads"] for c in rec.calls] == [2]
    assert not rec.calls[0]["channels_last"]


def test_measure_latency_restores_threads_and_mode_when_the_model_fails(two_threads):
    rec = _Recorder(fail=True).train()
    with pytest.raises(RuntimeError, match="forward failed"):
        measure_latency(rec, input_shape=(1, 3, 3), threads=1, warmup=1, repeats=1, deploy=False)
    assert torch.get_num_threads() == 2 and rec.training


def test_measure_latency_times_each_timed_pass_in_milliseconds():
    # The sleeps set a floor under each pass's time (time.sleep never returns early): the untimed
    # warmup pass sleeps nothing, then the timed passes 100 ms, 2 ms, 100 ms. A value in seconds,
    # a timed warmup or a reordered list breaks the floors; 2 ms reading above 50 ms would need the
    # scheduler to be 48 ms late, so the upper bounds have a wide margin.
    rec = _Recorder(sleeps_s=(0.0, 0.100, 0.002, 0.100))
    result = measure_latency(rec, input_shape=(1, 2, 2), warmup=1, repeats=3, deploy=False)
    t = result["times_ms"]
    assert len(t) == 3 and t[0] >= 100 and t[1] >= 2 and t[2] >= 100
    assert t[1] < 50
    assert 100 <= result["median_ms"] < 1000
    assert 2 <= result["min_ms"] < 50


def test_measure_latency_grows_with_the_work_per_pass():
    # 4x the images per pass is ~3.8x the time here; min over 9 repeats of each only rises under
    # load, so the small model's minimum would need to be disturbed in all 9 passes to fail.
    model = build_model("small_cnn")
    small = measure_latency(model, batch_size=16, threads=1, warmup=2, repeats=9)
    large = measure_latency(model, batch_size=64, threads=1, warmup=2, repeats=9)
    assert large["min_ms"] > 1.5 * small["min_ms"], (small["times_ms"], large["times_ms"])
    assert large["median_ms"] > small["median_ms"]


def test_measure_latency_leaves_the_callers_model_alone():
    model = _randomise_bn(build_model("small_cnn")).train()
    before = copy.deepcopy(model.state_dict())
    measure_latency(model, batch_size=2, warmup=1, repeats=1)  # deploy=True: folds BN in a copy
    assert model.training
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "BN folded in the caller's model"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_measure_latency_times_a_deployed_model_as_given():
    model = _randomise_bn(build_model("small_cnn"))
    deployed = deployment_form(model).train()
    calls: list[int] = []
    deployed.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    result = measure_latency(deployed, batch_size=2, deploy=False, warmup=1, repeats=2)
    assert calls == [2, 2, 2], "the given module itself ran warmup + repeats times, not a rebuilt copy"
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
