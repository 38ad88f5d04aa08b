"""The ImageNet-style data path: per-rank sharding before decoding, loader workers, pinned memory.

A tiny class-folder data set of real JPEG files is written by the tests. Decodes are counted by
a spy on torchvision's image loader that appends each path it opens to a file, so reads made
in forked loader workers are counted too. No GPU here: pinned memory is checked by recording
what the loader is asked for, with CUDA's availability mocked.
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.folder as tv_folder
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from data import DataSplits, InMemoryDataset, get_data, iterate_batches
from trainables.protocol.config import FinetuneConfig
from trainables.protocol.finetune import Finetuner

CLASSES, PER_CLASS = ("ant", "bee", "cow"), 16  # 48 training images


@pytest.fixture(autouse=True)
def one_thread():
    """Per-image transforms on 2 busy cores run ~20x slower with two intra-op threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """train/<class>/*.jpg and val/<class>/*.jpg: small seeded noise images saved as JPEG."""
    root = tmp_path_factory.mktemp("tiny_imagenet")
    rng = np.random.default_rng(0)
    for split, n in (("train", PER_CLASS), ("val", 2)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{c}_{i:02d}.jpg", quality=90)
    return root


@pytest.fixture
def decodes(monkeypatch, tmp_path):
    """Every image path torchvision's loader opens, in this process or a forked worker."""
    log = tmp_path / "decoded.txt"
    real = tv_folder.default_loader

    def spy(path: str):
        with open(log, "a") as f:  # one short append per read: safe across worker processes
            f.write(path + "\n")
        return real(path)

    monkeypatch.setattr(tv_folder, "default_loader", spy)

    def read_and_clear() -> list[str]:
        paths = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return paths

    return read_and_clear


@pytest.fixture(scope="module")
def splits(folder) -> DataSplits:
    return get_data("image_folder", folder, val_size=0, seed=0)


class Indexed(Dataset):
    """Item i is (tensor([i]), i % 3): batches name the indices that were read."""

    def __init__(self, n: int):
        self.n, self.reads = n, Counter()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.reads[i] += 1
        return torch.tensor([i]), i % 3


def old_full_epoch(ds: Dataset, batch_size: int, seed: int, drop_last: bool) -> list[list[int]]:
    """The batches before sharding existed: one seeded full-epoch DataLoader on every rank."""
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
    )
    return [x.view(-1).tolist() for x, _ in loader]


def ids(batches) -> list[list[int]]:
    return [x.view(-1).tolist() for x, _ in batches]


# ---------------------------------------------------------------- sharding before decoding


@pytest.mark.parametrize(
    ("batch_size", "drop_last"), [(4, True), (6, False), (5, False), (7, True), (7, False)]
)
def test_each_rank_decodes_only_its_share_of_the_epoch(splits, decodes, batch_size, drop_last):
    per_rank = {}
    for rank in (0, 1):
        batches = list(
            iterate_batches(
                splits.train, batch_size, shuffle=True, seed=3, drop_last=drop_last, shard=(rank, 2)
            )
        )
        per_rank[rank] = decodes()
        assert len(per_rank[rank]) == sum(len(y) for _, y in batches)  # nothing decoded and dropped
    list(iterate_batches(splits.train, batch_size, shuffle=True, seed=3, drop_last=drop_last))
    whole = decodes()  # one worker: the full epoch, as before sharding
    assert len(set(whole)) == len(whole)
    # The ranks' batches are the single worker's batches dealt round-robin, less an incomplete
    # last round (both DDP ranks must take the same number of steps).
    batches = [whole[k : k + batch_size] for k in range(0, len(whole), batch_size)]
    rounds = len(batches) // 2
    for rank in (0, 1):
        assert per_rank[rank] == [p for batch in batches[rank : 2 * rounds : 2] for p in batch]
    assert not set(per_rank[0]) & set(per_rank[1])
    if len(splits.train) % (2 * batch_size) == 0:  # whole rounds: together exactly one epoch
        assert sorted(per_rank[0] + per_rank[1]) == sorted(p for p, _ in splits.train.base.samples)


def test_ranks_get_the_batches_the_old_full_epoch_loader_kept():
    # Before: every rank built the full seeded epoch and kept batches rank, rank+W, ...
    ds = Indexed(50)
    for world, batch_size, drop_last in ((2, 4, True), (3, 5, False), (2, 7, False), (4, 3, True)):
        old = old_full_epoch(ds, batch_size, seed=11, drop_last=drop_last)
        keep = len(old) // world
        for rank in range(world):
            ds.reads.clear()
            new = ids(
                iterate_batches(
                    ds, batch_size, shuffle=True, seed=11, drop_last=drop_last, shard=(rank, world)
                )
            )
            assert new == old[rank : keep * world : world]
            assert sum(ds.reads.values()) == sum(map(len, new))  # only those items were read


def test_one_worker_sees_the_same_numbers_as_before_sharding():
    ds = Indexed(23)
    for seed, batch_size, drop_last in (
        (0, 5, False),
        (4, 5, True),
        (9, 23, False),
        (9, 30, False),
    ):
        assert ids(
            iterate_batches(ds, batch_size, shuffle=True, seed=seed, drop_last=drop_last)
        ) == old_full_epoch(ds, batch_size, seed, drop_last)
    in_memory = InMemoryDataset(torch.arange(50.0).view(50, 1, 1, 1), torch.arange(50) % 3)
    # In-memory sets: one randperm from a fresh generator, cut into slices.
    order = torch.randperm(50, generator=torch.Generator().manual_seed(2)).tolist()
    assert ids(iterate_batches(in_memory, 8, shuffle=True, seed=2)) == [
        order[i : i + 8] for i in range(0, 50, 8)
    ]


def test_in_memory_ranks_deal_the_same_epoch():
    ds = InMemoryDataset(torch.arange(50.0).view(50, 1, 1, 1), torch.arange(50) % 3)
    whole = ids(iterate_batches(ds, 6, shuffle=True, seed=5, drop_last=True))
    ranks = [
        ids(iterate_batches(ds, 6, shuffle=True, seed=5, drop_last=True, shard=(r, 3)))
        for r in range(3)
    ]
    assert [len(r) for r in ranks] == [2, 2, 2]  # 8 batches, dealt in 2 whole rounds of 3
    for r in range(3):
        assert ranks[r] == whole[r:6:3]
    assert sorted(i for r in ranks for batch in r for i in batch) == sorted(
        i for batch in whole[:6] for i in batch
    )


def test_same_seed_same_order_other_seed_other_order(splits, decodes):
    def labels_and_paths(seed: int, rank: int) -> tuple[list[int], list[str]]:
        labels = [
            y
            for _, ys in iterate_batches(splits.train, 4, shuffle=True, seed=seed, shard=(rank, 2))
            for y in ys.tolist()
        ]
        return labels, decodes()

    first = labels_and_paths(7, 1)
    assert labels_and_paths(7, 1) == first
    assert labels_and_paths(8, 1)[1] != first[1]
    assert labels_and_paths(7, 0)[1] != first[1]


def test_skip_leaves_batches_unread(splits, decodes):
    full = list(iterate_batches(splits.train, 4, shuffle=True, seed=1, shard=(1, 2)))
    all_paths = decodes()
    rest = list(iterate_batches(splits.train, 4, shuffle=True, seed=1, shard=(1, 2), skip=2))
    assert decodes() == all_paths[8:]  # the first two batches were never opened
    assert [y.tolist() for _, y in rest] == [y.tolist() for _, y in full[2:]]
    assert list(iterate_batches(splits.train, 4, shuffle=True, seed=1, shard=(1, 2), skip=99)) == []


@pytest.mark.parametrize("shard", [(2, 2), (-1, 2), (0, 0), [0, 1], (0.0, 1), (True, 2)])
def test_bad_shard_is_refused(shard):
    with pytest.raises(
        ValueError, match=r"^shard must be \(rank, world\) with 0 <= rank < world, but got"
    ):
        next(iterate_batches(Indexed(4), 2, shuffle=False, shard=shard))


def test_bad_skip_is_refused():
    with pytest.raises(ValueError, match="^skip must be an integer >= 0, but got -1$"):
        next(iterate_batches(Indexed(4), 2, shuffle=False, skip=-1))


# ---------------------------------------------------------------- loader workers


def test_worker_processes_read_the_same_share(splits, decodes):
    serial = [
        (x, y) for x, y in iterate_batches(splits.train_eval, 5, shuffle=True, seed=2, shard=(0, 2))
    ]
    serial_paths = decodes()
    workers = list(
        iterate_batches(splits.train_eval, 5, shuffle=True, seed=2, shard=(0, 2), num_workers=2)
    )
    worker_paths = decodes()
    # The same batches, in the same order, decoded in the workers (evaluation transform: no
    # randomness, so the pixels agree too); nothing outside the share was read, even prefetching.
    assert len(workers) == len(serial) == 5
    for (x0, y0), (x1, y1) in zip(serial, workers, strict=True):
        assert torch.equal(y0, y1) and torch.equal(x0, x1)
    assert sorted(worker_paths) == sorted(serial_paths) and len(worker_paths) == 25


class OneImage(Dataset):
    """The same picture n times through a random transform: batches differ only by the RNG."""

    def __init__(self, n: int, transform):
        self.n, self.transform = n, transform
        self.image = Image.fromarray(
            np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        )

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.transform(self.image), 0


def test_worker_augmentation_is_seeded_and_differs_between_ranks(splits):
    ds = OneImage(16, splits.train.base.transform)  # the ImageNet training augmentation

    def first_batch(seed: int, rank: int) -> torch.Tensor:
        return next(
            iterate_batches(ds, 4, shuffle=True, seed=seed, shard=(rank, 2), num_workers=1)
        )[0]

    assert torch.equal(first_batch(3, 1), first_batch(3, 1))  # the random crops follow the seed
    assert not torch.equal(first_batch(3, 1), first_batch(4, 1))
    # Every rank's loader draws the same worker seed from the shared epoch generator; the rank
    # salt keeps two ranks from cropping and flipping their images alike.
    assert not torch.equal(first_batch(3, 0), first_batch(3, 1))


# ---------------------------------------------------------------- pinned memory


@pytest.fixture
def loader_kwargs(monkeypatch):
    """What every DataLoader is asked for; pinning is turned off before it runs (no GPU here)."""
    asked: list[dict] = []
    real_init = DataLoader.__init__

    def spy_init(self, *args, **kwargs):
        asked.append(dict(kwargs))
        real_init(self, *args, **{**kwargs, "pin_memory": False})

    monkeypatch.setattr(DataLoader, "__init__", spy_init)
    return asked


@pytest.mark.parametrize(("device", "cuda_available", "pinned"), [
    ("cuda", True, True), (torch.device("cuda", 0), True, True), ("cuda", False, False),
    ("cpu", True, False), (None, True, False),
])  # fmt: skip
def test_pin_memory_is_requested_only_for_cuda(
    splits, loader_kwargs, monkeypatch, device, cuda_available, pinned
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_available)
    next(
        iterate_batches(
            splits.val if len(splits.val) else splits.test, 2, shuffle=False, device=device
        )
    )
    assert loader_kwargs[-1]["pin_memory"] is pinned


def test_finetuner_asks_for_pinned_batches_on_cuda(splits, loader_kwargs, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = nn.Linear(1, 3)
    tuner = Finetuner(
        model,
        splits,
        FinetuneConfig(batch_size=4),
        seed=0,
        report=lambda m: None,
        progress=False,
        total_epochs=1.0,
        shard=(1, 2),
    )
    monkeypatch.setattr(Finetuner, "_device", lambda self: torch.device("cuda", 0))
    next(tuner._stream)
    assert loader_kwargs[-1]["pin_memory"] is True
    monkeypatch.setattr(Finetuner, "_device", lambda self: torch.device("cpu"))
    tuner.skip_to(0)
    next(tuner._stream)
    assert loader_kwargs[-1]["pin_memory"] is False


# ---------------------------------------------------------------- the fine-tuning stream


def test_finetuner_ranks_split_each_pass_and_resume_reads_nothing_twice(splits, decodes):
    ft = FinetuneConfig(batch_size=4)

    def stream(rank: int, start: int = 0) -> Finetuner:
        return Finetuner(
            nn.Linear(1, 1),
            splits,
            ft,
            seed=5,
            report=lambda m: None,
            progress=False,
            total_epochs=1.0,
            start_step=start,
            shard=(rank, 2),
        )

    per_pass = stream(0).steps_per_epoch
    assert per_pass == 48 // (4 * 2)
    labels, paths = {}, {}
    for rank in (0, 1):
        labels[rank] = [y.tolist() for _, y in itertools.islice(stream(rank)._stream, per_pass)]
        paths[rank] = decodes()
    assert len(paths[0]) == len(paths[1]) == 24 and not set(paths[0]) & set(paths[1])
    assert len(set(paths[0]) | set(paths[1])) == 48  # the two ranks together: one whole pass
    # Resuming rank 1 at step 2 decodes only what is left of its share.
    resumed = [y.tolist() for _, y in itertools.islice(stream(1, start=2)._stream, per_pass - 2)]
    assert resumed == labels[1][2:] and decodes() == paths[1][8:]


def test_finetuner_in_memory_ranks_deal_the_single_worker_pass():
    images = torch.arange(40.0).view(40, 1, 1, 1)
    train = InMemoryDataset(images, torch.arange(40) % 4)
    split = DataSplits(
        train=train,
        val=train,
        test=train,
        num_classes=4,
        class_names=list("abcd"),
        input_shape=(1, 1, 1),
        eval_classes=None,
    )

    def first_pass(shard: tuple[int, int]) -> list[list[int]]:
        tuner = Finetuner(
            nn.Linear(1, 1),
            split,
            FinetuneConfig(batch_size=4),
            seed=3,
            report=lambda m: None,
            progress=False,
            total_epochs=1.0,
            shard=shard,
        )
        return [
            x.view(-1).long().tolist()
            for x, _ in itertools.islice(tuner._stream, tuner.steps_per_epoch)
        ]

    whole = first_pass((0, 1))
    assert len(whole) == 10 and sorted(i for b in whole for i in b) == list(range(40))
    assert first_pass((0, 2)) == whole[0::2] and first_pass((1, 2)) == whole[1::2]


# ---------------------------------------------------------------- two DDP ranks, for real


def _ddp_rank(rank: int, root: str, port: int, out: str) -> None:
    """One gloo rank: one epoch of DDP fine-tuning on the folder, logging every image it opens."""
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    log = Path(out) / f"decoded{rank}.txt"
    real = tv_folder.default_loader

    def spy(path: str):
        with open(log, "a") as f:
            f.write(path + "\n")
        return real(path)

    tv_folder.default_loader = spy
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    split = get_data("image_folder", root, val_size=0, seed=0)
    split = DataSplits(**{**split.__dict__, "val": split.test})  # a small val: the 6 test images
    torch.manual_seed(0)  # the same initial weights on both ranks
    model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 3))
    model.input_shape = (3, 224, 224)  # what count_flops feeds it
    ft = FinetuneConfig(batch_size=4, evals_per_stage=1)
    tuner = Finetuner(
        model,
        split,
        ft,
        seed=1,
        report=lambda m: None,
        progress=False,
        total_epochs=1.0,
        shard=(rank, 2),
        wrap_ddp=True,
    )
    tuner.finetune(1.0, "recovery")  # one epoch, then one evaluation (on all of val, every rank)
    torch.save({"weights": model.state_dict(), "steps": tuner.step}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_ranks_train_in_step_on_disjoint_halves(folder, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the ranks inherit the imports (spawn would re-import torch in each, ~10 s here)
    mp.start_processes(
        _ddp_rank, args=(str(folder), port, str(tmp_path)), nprocs=2, start_method="fork"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    reads = [
        [p for p in (tmp_path / f"decoded{r}.txt").read_text().splitlines() if "/train/" in p]
        for r in (0, 1)
    ]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 48 // 8
    assert len(reads[0]) == len(reads[1]) == 24 and not set(reads[0]) & set(reads[1])
    for key, w in ranks[0]["weights"].items():  # DDP averaged the gradients: the ranks agree
        assert torch.allclose(w, ranks[1]["weights"][key], atol=1e-6), key
