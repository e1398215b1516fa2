"""data=fashion_mnist: the IDX reader, the data module on the real files of Debian's package
`dataset-fashion-mnist` (.ci/run installs it: these tests fail, not skip, without it), the
one-line error when the files are missing or malformed, and a tiny training run."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from q8.lit.data import (
    FashionMNISTDataModule,
    IdxFormatError,
    read_idx,
    read_idx_header,
    stratified_order,
)
from q8.lit.errors import DatasetNotFoundError, UsageError
from tests.conftest import ROOT

FILES = FashionMNISTDataModule.FILES
INSTALL = "apt-get install -y dataset-fashion-mnist"
IDX_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype("i2"): 0x0B,
             np.dtype("i4"): 0x0C, np.dtype("f4"): 0x0D, np.dtype("f8"): 0x0E}


def write_idx(path: Path, array: np.ndarray) -> Path:
    """`array` as an IDX file (gzipped if `path` ends in .gz), written independently of q8."""
    header = bytes([0, 0, IDX_CODES[array.dtype], array.ndim])
    header += b"".join(d.to_bytes(4, "big") for d in array.shape)
    return write_bytes(path, header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data, compresslevel=1) if path.suffix == ".gz" else data)
    return path


# ---------------------------------------------------------------- the IDX reader


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
def test_read_idx_returns_what_was_written(tmp_path: Path, name: str, dtype: str) -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal((3, 5, 2)) * 1000 if dtype[0] == "f" else rng.integers(
        np.iinfo(dtype).min, np.iinfo(dtype).max, (3, 5, 2), endpoint=True)
    array = values.astype(dtype)
    path = write_idx(tmp_path / name, array)
    assert read_idx_header(path) == (np.dtype(dtype).newbyteorder(">"), (3, 5, 2))
    got = read_idx(path)
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative and got.shape == (3, 5, 2)
    np.testing.assert_array_equal(got, array)
    assert got.flags.writeable  # torch.from_numpy warns on a read-only buffer


HEADER = bytes([0, 0, 0x08, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"is not an IDX file: its magic number is missing"),
        (b"\x00\x00", r"is not an IDX file: its magic number is 0000,"),
        (b"\x1f\x8b\x08\x03" + bytes(20), r"is not an IDX file: its magic number is 1f8b0803"),
        (b"\x00\x01\x08\x01" + bytes(8), r"magic number is 00010801"),
        (b"\x00\x00\x07\x01" + bytes(8), r"magic number is 00000701, expected 0000 \+ a type"),
        (b"\x00\x00\x08\x00", r"magic number is 00000800.* dimensions \(>= 1\)"),
        (HEADER[:9], r"IDX header truncated: 2 dimensions announced, 1 present"),
        (HEADER + bytes(5), r"IDX body is 5 bytes, but its header announces 2x3 uint8 = 6"),
        (HEADER + bytes(7), r"IDX body is 7 bytes, but its header announces 2x3 uint8 = 6"),
    ],
)
@pytest.mark.parametrize("name", ["bad.idx", "bad.idx.gz"])
def test_read_idx_refuses_a_malformed_file(tmp_path: Path, name: str, data: bytes,
                                           message: str) -> None:
    path = write_bytes(tmp_path / name, data)
    with pytest.raises(IdxFormatError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, UsageError) and isinstance(info.value, ValueError)
    if "body" not in message:  # the header alone says so
        with pytest.raises(IdxFormatError, match=message):
            read_idx_header(path)


@pytest.mark.parametrize("data", [b"not gzip at all", gzip.compress(HEADER + bytes(6))[:-9]])
def test_read_idx_refuses_a_corrupt_gzip_file(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad.gz"
    path.write_bytes(data)
    with pytest.raises(IdxFormatError, match=rf"cannot read {path}: (BadGzipFile|EOFError)"):
        read_idx(path)


def test_stratified_order_keeps_every_prefix_in_class_proportion() -> None:
    rng = np.random.default_rng(0)
    for seed in range(20):
        n_classes = int(rng.integers(2, 12))
        labels = rng.integers(0, n_classes, size=int(rng.integers(20, 2000)))
        labels[rng.random(len(labels)) < 0.3] = 0  # unbalanced
        order = stratified_order(labels, seed)
        assert sorted(order.tolist()) == list(range(len(labels)))
        np.testing.assert_array_equal(order, stratified_order(labels, seed))
        classes, counts = np.unique(labels, return_counts=True)
        seen = (labels[order][:, None] == classes).cumsum(0)
        expected = np.arange(1, len(labels) + 1)[:, None] * counts / len(labels)
        assert np.abs(seen - expected).max() <= 2, seed
    balanced = np.repeat(np.arange(10), 50)
    order = stratified_order(balanced, 0)
    assert not np.array_equal(order, stratified_order(balanced, 1))
    for n in range(1, len(balanced) + 1):  # equal counts: in rounds of one image per class
        assert set(np.bincount(balanced[order[:n]], minlength=10)) <= {n // 10, -(-n // 10)}


# ---------------------------------------------------------------- files missing or malformed


def _run_cli(*overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def _fake_root(root: Path, n_train: int = 60_000, n_test: int = 10_000, label: int = 0) -> Path:
    """A folder of four well-formed IDX files of blank images, all labelled `label`."""
    root.mkdir()
    for split, n in (("train", n_train), ("test", n_test)):
        write_idx(root / f"{FILES[f'{split}_images']}.gz", np.zeros((n, 28, 28), np.uint8))
        write_idx(root / f"{FILES[f'{split}_labels']}.gz", np.full(n, label, np.uint8))
    return root


@pytest.mark.parametrize("case", ["missing", "malformed"])
def test_missing_or_malformed_files_are_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    root = tmp_path / "nonexistent"
    if case == "malformed":
        _fake_root(root)
        write_bytes(root / f"{FILES['test_labels']}.gz", b"\x00\x00\x08")
    result = _run_cli("data=fashion_mnist", f"data.root={root}", "logger=csv",
                      f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    if case == "missing":
        assert lines[0].startswith(
            f"error: Fashion-MNIST not found: looked for {root / FILES['train_images']}.gz"), lines
        assert INSTALL in lines[0], lines
    else:
        assert lines[0].startswith(f"error: {root / FILES['test_labels']}.gz is not an IDX file")


def test_missing_package_names_the_apt_command(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(FashionMNISTDataModule, "PACKAGE_DIR", str(tmp_path / "share"))
    with pytest.raises(DatasetNotFoundError, match=rf"install it with `{INSTALL}`"):
        FashionMNISTDataModule()


@pytest.mark.parametrize(
    ("counts", "message"),
    [((60_000, 9_999), r"hold 60000 and 9999 images, not Fashion-MNIST's 60000 and 10000"),
     ((100, 10_000), r"hold 100 and 10000 images")],
)
def test_files_of_other_sizes_are_refused(tmp_path: Path, counts: tuple, message: str) -> None:
    root = _fake_root(tmp_path / "fm", *counts)
    with pytest.raises(IdxFormatError, match=message):
        FashionMNISTDataModule(root=str(root))
    write_idx(root / f"{FILES['test_labels']}.gz", np.zeros(counts[1] + 1, np.uint8))
    with pytest.raises(IdxFormatError, match=r"are not Fashion-MNIST: images \(\d+, 28, 28\), "):
        FashionMNISTDataModule(root=str(root))


def test_labels_out_of_range_are_refused(tmp_path: Path) -> None:
    dm = FashionMNISTDataModule(root=str(_fake_root(tmp_path / "fm", label=10)))
    with pytest.raises(IdxFormatError, match=r"labels 0\.\.9, got uint8 pixels and labels "
                                             r"up to 10$"):
        dm.setup()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"val_size": 9}, r"data\.val_size=9 is invalid: it must be an integer in 10\.\.59990"),
     ({"val_size": 0.1}, r"data\.val_size=0\.1 is invalid"),
     ({"train_size": 55_001}, r"data\.train_size=55001 .* in 10\.\.55000 or null"),
     ({"val_size": 59_000, "train_size": 2000}, r"train_size=2000 .* in 10\.\.1000 or null"),
     ({"image_size": 0}, r"data\.image_size=0 is invalid")],
)
def test_sizes_out_of_range_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        FashionMNISTDataModule(root=str(tmp_path), **kwargs)


# ---------------------------------------------------------------- the real files


@pytest.fixture(scope="module")
def real() -> FashionMNISTDataModule:
    """The default data module on the installed package's files, set up."""
    folder = Path(FashionMNISTDataModule.PACKAGE_DIR)
    if not folder.is_dir():
        pytest.fail(f"{folder} is missing: `{INSTALL}` (.ci/run installs it)")
    dm = FashionMNISTDataModule()
    dm.setup()
    return dm


def test_the_package_holds_fashion_mnist(real: FashionMNISTDataModule) -> None:
    for split, n in (("train", 60_000), ("test", 10_000)):
        images, labels = (read_idx(real.paths[f"{split}_{k}"]) for k in ("images", "labels"))
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.uint8
        assert np.bincount(labels).tolist() == [n // 10] * 10  # 10 balanced classes
    assert len(FashionMNISTDataModule.CLASSES) == real.num_classes == 10


def test_the_split_is_stratified_disjoint_and_seeded(real: FashionMNISTDataModule) -> None:
    sets = {"train": real.train_set, "val": real.val_set, "test": real.test_set}
    for name, n in (("train", 55_000), ("val", 5000), ("test", 10_000)):
        x, y = sets[name].tensors
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32, name
        assert y.shape == (n,) and y.dtype == torch.int64, name
        assert torch.bincount(y).tolist() == [n // 10] * 10, name  # balanced, as the files
    train, val = real.split["train"], real.split["val"]
    assert len(np.intersect1d(train, val)) == 0 and len(np.union1d(train, val)) == 60_000
    labels = read_idx(real.paths["train_labels"])
    np.testing.assert_array_equal(np.sort(stratified_order(labels, 0)[:5000]), val)
    other = np.sort(stratified_order(labels, 1)[:5000])
    assert len(np.intersect1d(other, val)) < 1000  # 5000 of 60000: about 417 in common
    images = read_idx(real.paths["train_images"])[val[:100]]
    expected = (images / 255.0 - real.MEAN) / real.STD
    np.testing.assert_allclose(real.val_set.tensors[0][:100, 0].numpy(), expected, atol=1e-5)


def test_a_train_subset_is_stratified_nested_and_leaves_val_alone(
        real: FashionMNISTDataModule) -> None:
    small = FashionMNISTDataModule(train_size=1234, image_size=32)
    small.setup()
    np.testing.assert_array_equal(small.split["val"], real.split["val"])
    assert len(small.split["train"]) == 1234
    assert np.isin(small.split["train"], real.split["train"]).all()
    assert set(torch.bincount(small.train_set.tensors[1]).tolist()) == {123, 124}
    assert small.train_set.tensors[0].shape == (1234, 1, 32, 32)
    assert small.test_set.tensors[0].shape == (10_000, 1, 32, 32)


def test_mean_and_std_are_fashion_mnists(real: FashionMNISTDataModule) -> None:
    """MEAN and STD are the pixel statistics of all 60,000 training images, rounded to 5
    decimals; each split, normalised with them, has mean 0 and mean square 1 up to the sampling
    error of its image count (5 standard errors, from the spread of per-image statistics)."""
    raw = read_idx(real.paths["train_images"]).reshape(60_000, -1)
    sums = raw.sum(1, dtype=np.int64), (raw.astype(np.uint32) ** 2).sum(1, dtype=np.int64)
    mean = sums[0].sum() / raw.size / 255  # exact sums: no rounding but the division's
    std = math.sqrt(sums[1].sum() / raw.size / 255**2 - mean**2)
    assert abs(mean - real.MEAN) <= 0.5e-5 and abs(std - real.STD) <= 0.5e-5
    m, s = real.MEAN, real.STD
    p1, p2 = sums[0] / 784 / 255, sums[1] / 784 / 255**2  # per image: pixel mean, mean square
    population = [(p1 - m) / s, (p2 - 2 * m * p1 + m**2) / s**2]  # the same, normalised
    big_n = 60_000
    for name, n, fpc in (("train", 55_000, True), ("val", 5000, True), ("test", 10_000, False)):
        x = getattr(real, f"{name}_set").tensors[0].flatten(1)
        for stat, per_image in zip((x.mean(1), (x * x).mean(1)), population):
            # a subset of the 60,000 (without replacement), or t10k: a sample of its own
            var = per_image.var() / n * ((big_n - n) / (big_n - 1) if fpc else 1 + n / big_n)
            assert abs(stat.double().mean().item() - per_image.mean()) <= 5 * math.sqrt(var)
    # the constants are off by 0.5e-5 at most: the normalised mean by r = 0.5e-5 / STD, the mean
    # square (1 + r)^2 + r^2 - 1
    r = 0.5e-5 / s
    assert abs(population[0].mean()) <= r and abs(population[1].mean() - 1) <= 2 * r + 2 * r**2


def test_augmentation_flips_training_batches_only(real: FashionMNISTDataModule) -> None:
    x, y = real.val_set.tensors[0][:64], real.val_set.tensors[1][:64]
    real.affine = (0.0, 0.0, 0.0)  # the identity transform, up to grid_sample's rounding
    try:
        real.trainer = SimpleNamespace(training=False)
        assert real.on_after_batch_transfer((x, y), 0)[0] is x
        real.trainer = SimpleNamespace(training=True)
        out, labels = real.on_after_batch_transfer((x, y), 0)
    finally:
        real.trainer, real.affine = None, (0.0, 0.1, 0.0)
    assert labels is y
    same = (out - x).abs().flatten(1).amax(1) < 1e-4
    flipped = (out - x.flip(-1)).abs().flatten(1).amax(1) < 1e-4
    assert (same | flipped).all() and same.any() and flipped.any()  # 2 * 2^-64 to fail


# ---------------------------------------------------------------- training


def test_a_tiny_run_trains_on_fashion_mnist(tiny_config, tmp_path: Path) -> None:
    from train import train

    run_dir = tmp_path / "run"
    metrics = train(tiny_config("data=fashion_mnist", "data.batch_size=16", run_dir=run_dir))
    assert metrics["global_step"] == 2 and metrics["data"] == "fashion_mnist"
    for key in ("train/loss", "val/loss", "test/loss"):
        assert 0 <= metrics[key] < float("inf"), key
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert 0 <= saved["test/acc"] <= 1 and saved["quant"] == "q8_bifurcated"
