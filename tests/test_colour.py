"""Coloured Fashion-MNIST, small_alexnet, the colour indices and the colour report."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.colors import rgb_to_hsv
from torch import nn

import data._fashion_mnist as fmnist
from data import coloured_channel_stats, dataset_options, get_data
from data._coloured import colourise
from trainables.core.models import build_model
from trainables.core.surgery import describe_units
from trainables.experiments.colour import (
    colour_threshold,
    greyscale,
    luminance_colour_index,
    response_colour_index,
)

CFM = "coloured_fashion_mnist"


@pytest.fixture
def no_fallback(monkeypatch, tmp_path):
    monkeypatch.setattr(fmnist, "FALLBACK_DIRS", (tmp_path / "no-debian-here",))


# ---------------------------------------------------------------- the data set


def test_coloured_splits_have_rgb_images_and_fashion_mnist_classes(tiny_fmnist):
    s = get_data(CFM, tiny_fmnist, val_size=100)
    grey = get_data("fashion_mnist", tiny_fmnist, val_size=100)
    assert (len(s.train), len(s.val), len(s.test)) == (500, 100, 200)
    assert s.train.images.shape == (500, 3, 28, 28) and s.train.images.dtype == torch.float32
    assert s.input_shape == (3, 28, 28) and s.num_classes == 10 and s.class_names == list(fmnist.CLASS_NAMES)
    # The same items in the same split order as the grey set: train from train, test from test.
    assert torch.equal(s.train.targets, grey.train.targets) and torch.equal(s.test.targets, grey.test.targets)
    # Normalised per channel with the train split's statistics (val is carved from train).
    pooled = torch.cat([s.train.images, s.val.images])
    assert torch.allclose(pooled.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(pooled.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)
    assert dataset_options(CFM) == {"colour": ("random", "label")} and dataset_options("fashion_mnist") == {}


def test_coloured_data_is_seeded_and_the_splits_are_coloured_apart(tiny_fmnist):
    a = get_data(CFM, tiny_fmnist, val_size=100, seed=3)
    b = get_data(CFM, tiny_fmnist, val_size=100, seed=3)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
    # Test images are coloured with their own draws, not the train split's first 200.
    raw = fmnist.read_idx(next(tiny_fmnist.glob("t10k-images*")))
    labels = fmnist.read_idx(next(tiny_fmnist.glob("t10k-labels*")))
    mean, std = coloured_channel_stats(tiny_fmnist)
    expected = (torch.from_numpy(colourise(raw, labels, "random", 20_240_902)).float() / 255
                - torch.tensor(mean).view(1, 3, 1, 1).float()) / torch.tensor(std).view(1, 3, 1, 1).float()
    assert torch.allclose(a.test.images, expected, atol=1e-5)
    assert not torch.allclose(a.test.images[:10], a.train.images[:10])


def _hue_of_ink(images: np.ndarray) -> np.ndarray:
    """Hue of the foreground: an all-ink image (255) is the foreground colour itself."""
    rgb = images[:, :, 0, 0].astype(np.float64) / 255  # (N, 3)
    return rgb_to_hsv(rgb)[:, 0]


def test_random_hue_ignores_the_label_and_label_hue_names_it():
    n = 400
    ink = np.full((n, 28, 28), 255, dtype=np.uint8)
    labels = np.arange(n) % 10
    shuffled = np.random.default_rng(0).permutation(labels)
    # random: the colours do not depend on the labels at all (same draws, other labels, same images)
    assert np.array_equal(colourise(ink, labels, "random", 1), colourise(ink, shuffled, "random", 1))
    # label: each class's hue lies in its own band [c/10 + 0.01, c/10 + 0.09] (8-bit rounding aside)
    hue = _hue_of_ink(colourise(ink, labels, "label", 1))
    centre = (labels + 0.5) / 10
    dist = np.abs((hue - centre + 0.5) % 1 - 0.5)  # circular distance
    assert dist.max() <= 0.04 + 0.01
    # random hues spread over the circle: every band is hit
    bands = np.floor(_hue_of_ink(colourise(ink, labels, "random", 1)) * 10).astype(int) % 10
    assert set(bands) == set(range(10))


def test_variants_share_everything_but_the_foreground_hue():
    n = 50
    empty = np.zeros((n, 28, 28), dtype=np.uint8)  # background only
    labels = np.arange(n) % 10
    back_r, back_l = colourise(empty, labels, "random", 5), colourise(empty, labels, "label", 5)
    assert np.array_equal(back_r, back_l)
    assert (rgb_to_hsv(back_r[:, :, 0, 0].astype(np.float64) / 255)[:, 2] <= 0.3 + 1 / 255).all()  # dark
    ink = np.full((n, 28, 28), 255, dtype=np.uint8)
    value = rgb_to_hsv(colourise(ink, labels, "label", 5)[:, :, 0, 0].astype(np.float64) / 255)[:, 2]
    assert (value >= 0.75 - 1 / 255).all()  # bright foreground: the item stands out


def test_colour_variant_changes_the_images_not_the_labels(tiny_fmnist):
    r = get_data(CFM, tiny_fmnist, val_size=100)
    lab = get_data(CFM, tiny_fmnist, val_size=100, options={"colour": "label"})
    assert torch.equal(r.train.targets, lab.train.targets)
    assert not torch.allclose(r.train.images, lab.train.images)


@pytest.mark.parametrize("name, options, message", [
    (CFM, {"colour": "blue"}, "data.colour must be one of random, label, but got 'blue'"),
    (CFM, {"hue": "random"}, "data.hue must be a setting of coloured_fashion_mnist (colour), but got 'hue'"),
    ("fashion_mnist", {"colour": "label"}, "data.colour must be a setting of fashion_mnist (none), but got 'colour'"),
])
def test_bad_options_are_refused_before_any_file_is_read(tmp_path, no_fallback, name, options, message):
    with pytest.raises(ValueError) as info:
        get_data(name, tmp_path / "nothing-here", options=options)
    assert str(info.value) == message


def test_run_config_passes_the_colour_and_keys_the_base_model_by_it():
    from trainables.cli.compose import base_data_args, data_args, load_run_config

    cfg = load_run_config(["data=coloured_fashion_mnist", "model=small_alexnet", "data.colour=label"])
    assert data_args(cfg)["options"] == {"colour": "label"} and base_data_args(cfg)["options"] == {"colour": "label"}
    grey = load_run_config([])
    assert "options" not in data_args(grey)  # other data sets' keys (and cached models) unchanged
    with pytest.raises(ValueError, match=r"^data.colour must be one of random, label, but got 'blue'$"):
        load_run_config(["data=coloured_fashion_mnist", "data.colour=blue"])


# ---------------------------------------------------------------- the model


def test_small_alexnet_has_64_rgb_first_filters_and_prunable_units():
    model = build_model("small_alexnet").eval()
    assert model.input_shape == (3, 28, 28) and model.head_name == "classifier"
    first = model.features[0]
    assert isinstance(first, nn.Conv2d) and first.in_channels == 3 and first.out_channels >= 64
    units = describe_units(model)
    assert units[0].name == "features.0" and len(units) == 4
    x = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    assert model(x).shape == (4, 10)


# ---------------------------------------------------------------- first-layer index


def test_luminance_index_of_hand_made_filters():
    g = torch.Generator().manual_seed(0)
    shape = torch.randn(1, 1, 5, 5, generator=g)
    luminance = shape.repeat(1, 3, 1, 1)  # the same pattern in R, G and B
    red_green = torch.cat([shape, -shape, torch.zeros_like(shape)], dim=1)  # R - G
    blue_yellow = torch.cat([-shape, -shape, 2 * shape], dim=1)  # B - (R + G)/2, channels sum to 0
    red_only = torch.cat([shape, torch.zeros_like(shape), torch.zeros_like(shape)], dim=1)
    zero = torch.zeros(1, 3, 5, 5)
    idx = luminance_colour_index(torch.cat([luminance, red_green, blue_yellow, red_only, zero]))
    assert idx[0].item() == pytest.approx(0, abs=1e-6)
    assert idx[1].item() == pytest.approx(1, abs=1e-6) and idx[2].item() == pytest.approx(1, abs=1e-6)
    assert idx[3].item() == pytest.approx(2 / 3, abs=1e-6)  # one channel: a third of it is brightness
    assert idx[4].item() == 0
    # scale-free, and a mix moves it monotonically from 0 to 1
    assert torch.allclose(luminance_colour_index(7.5 * red_only), idx[3:4])
    mixes = luminance_colour_index(torch.cat([luminance + t * red_green for t in (0.0, 0.3, 1.0, 3.0)]))
    assert (mixes.diff() > 0).all()


def test_threshold_is_the_untrained_quantile_and_seeded():
    t = colour_threshold((5, 5))
    assert t == colour_threshold((5, 5))  # seeded
    # Gaussian weights give Beta(P, P/2) with P = 25: mean 2/3, sd 0.076; uniform weights are close.
    assert 2 / 3 + 0.08 < t < 2 / 3 + 0.2
    # Over fresh untrained conv layers about 5% of filters pass it (the definition, checked out of sample).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)  # nn.Conv2d initialises from the global generator
        convs = [nn.Conv2d(3, 64, 5) for _ in range(40)]
    passed = torch.cat([luminance_colour_index(c.weight) for c in convs]).gt(t).float().mean().item()
    assert 0.03 < passed < 0.07
    # Larger kernels average over more positions: a tighter null, a lower threshold.
    assert colour_threshold((11, 11)) < t < colour_threshold((3, 3))


# ---------------------------------------------------------------- second-layer index


def test_greyscale_is_colourless_and_keeps_grey_images():
    mean, std = (0.2, 0.3, 0.4), (0.5, 0.6, 0.7)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 8, 8, generator=g)
    pixels = greyscale(x, mean, std) * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    assert torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-6) and torch.allclose(pixels[:, 1], pixels[:, 2], atol=1e-6)
    grey_pixels = torch.rand(2, 1, 8, 8, generator=g).repeat(1, 3, 1, 1)
    normalised = (grey_pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(greyscale(normalised, mean, std), normalised, atol=1e-6)


class _TwoUnits(nn.Module):
    """Unit 0 reads R - G (colour only); unit 1 reads R + G + B (brightness only)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [1.0, 1.0, 1.0]]).view(2, 3, 1, 1))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x)).mean(dim=(2, 3))


def test_response_index_tells_a_colour_unit_from_a_brightness_unit():
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    images = torch.rand(200, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    csi = response_colour_index(_TwoUnits(), "act", images, lambda x: greyscale(x, mean, std), top=20)
    # R - G is zero on any grey image: fully colour-selective. Brightness: luma keeps most of it.
    assert csi[0].item() == pytest.approx(1.0, abs=1e-6)
    assert 0 <= csi[1].item() < 0.5
    assert math.isfinite(csi.sum().item())


# ---------------------------------------------------------------- the report, end to end


def _report_args(tiny_fmnist, tmp_path, seeds=("0", "1"), out="out") -> list[str]:
    # width 8: 8 first-layer and 12 second-layer filters, so greedy CAR takes seconds, not minutes
    return ["--seeds", *seeds, "--k", "3", "--score-images", "40", "--permutations", "200", "--top", "10",
            "--second-layer", "--out", str(tmp_path / out), f"data.root={tiny_fmnist}", "data.val_size=100",
            "model.pretrain.epochs=1", "+model.kwargs.width=8", f"cache_dir={tmp_path / 'cache'}", "progress=false",
            "threads=1"]


def test_report_writes_table_summary_and_figure_and_merges(tiny_fmnist, tmp_path):
    import json

    import pyarrow.parquet as pq

    from trainables.colour_report import main

    # One seed per folder (as parallel processes would run them), then merged into one report.
    for seed in ("0", "1"):
        assert main(_report_args(tiny_fmnist, tmp_path, seeds=(seed,), out=f"s{seed}")) == 0
        assert {p.name for p in (tmp_path / f"s{seed}").iterdir()} == {
            "colour_filters.parquet", "colour_summary.json", "colour_report.md", "colour_filters.png"}
    assert main(["--merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--permutations", "200",
                 "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    rows = pq.read_table(out / "colour_filters.parquet").to_pylist()
    # 2 seeds x 2 variants x (8 first-layer + 12 second-layer filters)
    assert len(rows) == 2 * 2 * (8 + 12)
    first = [r for r in rows if r["layer"] == 1 and r["seed"] == 0 and r["variant"] == "random"]
    ranks = sorted(r["car_rank"] for r in first if r["car_rank"] is not None)
    assert ranks == [0, 1, 2]  # the first k removals, each once
    assert sorted(r["l1_rank"] for r in first) == list(range(8))
    assert all(len(r["weight"]) == 3 * 5 * 5 for r in first)
    assert all(0 <= r["colour_index"] <= 1 and r["is_colour"] == (r["colour_index"] > r["threshold"]) for r in rows)
    assert {r["index_kind"] for r in rows if r["layer"] == 2} == {"response"}
    summary = json.loads((out / "colour_summary.json").read_text())["summary"]
    assert {(s["layer"], s["variant"]) for s in summary} == {(1, "random"), (1, "label"), (2, "random"), (2, "label")}
    for s in summary:
        assert s["k_total"] == 6 and 0 <= s["car_share"] <= 1 and 0 < s["p_car"] <= 1
        assert s["car_colour"] == sum(p["car_colour"] for p in s["per_seed"])
        picked = [r for r in rows if (r["layer"], r["variant"]) == (s["layer"], s["variant"])
                  and r["car_rank"] is not None and r["car_rank"] < 3]
        assert s["car_colour"] == sum(r["is_colour"] for r in picked)  # the statistics are the table's
    png = (out / "colour_filters.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert "| 1 | random | 2 |" in (out / "colour_report.md").read_text()
    # The same seed again: base models from the cache, the same table (seeded end to end).
    assert main([*_report_args(tiny_fmnist, tmp_path, seeds=("1",), out="again"), "--variants", "random"]) == 0
    assert pq.read_table(tmp_path / "again" / "colour_filters.parquet").to_pylist() == \
        [r for r in pq.read_table(tmp_path / "s1" / "colour_filters.parquet").to_pylist() if r["variant"] == "random"]


def test_permutation_p_value_is_small_only_for_an_excess_of_colour():
    from trainables.colour_report import summarise

    def rows(car_colour: int) -> list[dict]:
        # 20 colour filters (0..19) of 40; the first 10 removed: car_colour of them, then non-colour ones
        removed = list(range(car_colour)) + list(range(20, 20 + 10 - car_colour))
        return [{"seed": 0, "variant": "random", "layer": 1, "filter": f, "is_colour": f < 20,
                 "colour_index": 0.9 if f < 20 else 0.4,
                 "car_rank": removed.index(f) if f in removed else None, "l1_rank": f, "k": 10} for f in range(40)]

    high, even = summarise(rows(10), permutations=2000)[0], summarise(rows(5), permutations=2000)[0]
    assert high["car_colour"] == 10 and high["p_car"] < 0.001
    assert even["car_colour"] == 5 and 0.3 < even["p_car"] < 0.8
    assert high["l1_colour"] == 10 and high["base_rate"] == 0.5  # l1 ranks by index here: the first 10 are colour
    # threshold-free: the mean index of the first 10 and its test agree with the count here
    assert high["car_mean_index"] == pytest.approx(0.9) and high["mean_index"] == pytest.approx(0.65)
    assert high["p_car_index"] < 0.001 and even["p_car_index"] > 0.3
    assert high["car_l1_overlap"] == 10 and even["car_l1_overlap"] == 5


@pytest.mark.parametrize("args, message", [
    (["--k", "-1"], "--k must be an integer >= 0, but got -1"),
    (["--order", "l1"], "--order must be one of greedy_car, car, but got 'l1'"),
    (["--variants", "blue"], "--variants must be data.colour values (random, label), but got 'blue'"),
    (["--top", "500", "--score-images", "100"], "--top must be at most --score-images (100), but got 500"),
    (["--seeds"], "arguments must be valid options of the report"),
    (["data.colour=blue"], "data.colour must be one of random, label, but got 'blue'"),
    (["oops"], "arguments must be --options of the report or key=value overrides"),
])
def test_report_refuses_bad_input_in_one_line(capsys, tmp_path, args, message):
    from conftest import assert_refused

    from trainables.colour_report import main

    code = main([*args, "--out", str(tmp_path / "out")])
    assert_refused(capsys, code, [message])
    assert not (tmp_path / "out").exists()  # refused before any folder was written
