"""IDX files and the fashion_mnist dataset, through tiny IDX files each test writes (the real
files, where the Debian package is installed, are checked by their counts only)."""

from __future__ import annotations

import gzip
import pathlib
import struct

import numpy as np
import pytest

from qflax import data
from qflax.data import _idx
from qflax.train import default_config, validate_config


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.asarray(array, np.uint8)
    return (
        struct.pack(">BBBB", 0, 0, 8, array.ndim)
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.tobytes()
    )


def write_set(folder: pathlib.Path, n_train=40, n_test=20, gz=True, seed=0) -> dict:
    """Four tiny IDX files (6×5 images, labels 0..9 in turn); returns the arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 6, 5)),
        "train_y": np.arange(n_train) % 10,
        "test_x": rng.integers(0, 256, (n_test, 6, 5)),
        "test_y": (np.arange(n_test) * 3) % 10,
    }
    for key, name in _idx.FILES.items():
        raw = idx_bytes(arrays[key])
        if gz:
            (folder / name).write_bytes(gzip.compress(raw))
        else:
            (folder / name.removesuffix(".gz")).write_bytes(raw)
    return arrays


def test_read_idx_gzipped_and_raw(tmp_path):
    x = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(x))
    (tmp_path / "b.gz").write_bytes(gzip.compress(idx_bytes(x)))
    for name in ("a", "b.gz"):
        got = _idx.read_idx(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (2, 3, 4)
        np.testing.assert_array_equal(got, x)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"ab", "not an IDX file"),
        (b"\x00\x00\x0d\x01" + struct.pack(">I", 2) + b"abcdefgh", "type code 0x0d"),
        (b"\x00\x00\x08\x02" + struct.pack(">I", 2), "truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"ab", "holds 2 data bytes; its header"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"ab", "holds 2 data bytes; its header"),
        (b"\x1f\x8bnot gzip", "not a readable gzip file"),
    ],
)
def test_read_idx_refuses_malformed_files_naming_them(tmp_path, raw, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=message) as info:
        _idx.read_idx(path)
    assert str(path) in str(info.value)


def test_fashion_mnist_from_a_folder(tmp_path):
    arrays = write_set(tmp_path / "fm")
    d = data.load("fashion_mnist", data_dir=tmp_path / "fm")
    assert (d.name, d.kind, d.num_classes, d.input_shape) == (
        "fashion_mnist",
        "image",
        10,
        (6, 5, 1),
    )
    assert d.train_x.dtype == np.float32 and d.train_y.dtype == np.int32
    np.testing.assert_array_equal(d.train_x[..., 0], arrays["train_x"].astype(np.float32) / 255)
    np.testing.assert_array_equal(d.test_y, arrays["test_y"])
    assert 0.0 <= d.train_x.min() and d.train_x.max() <= 1.0
    # Uncompressed files are read too.
    write_set(tmp_path / "raw", gz=False)
    assert data.load("fashion_mnist", data_dir=tmp_path / "raw").train_x.shape == (40, 6, 5, 1)


def test_train_size_is_a_stratified_seeded_subset_and_the_test_set_is_whole(tmp_path):
    arrays = write_set(tmp_path / "fm", n_train=100)
    a = data.load("fashion_mnist", data_dir=tmp_path / "fm", train_size=30, seed=1)
    b = data.load("fashion_mnist", data_dir=tmp_path / "fm", train_size=30, seed=2)
    assert len(a.train_y) == 30 and np.all(np.bincount(a.train_y, minlength=10) == 3)
    assert not np.array_equal(a.train_x, b.train_x)
    assert len(a.test_y) == 20  # the official test split, never subsampled
    # Each kept image is the training image of its index.
    rows = {bytes(r) for r in arrays["train_x"].astype(np.uint8).reshape(100, -1)}
    kept = (a.train_x[..., 0] * 255).round().astype(np.uint8).reshape(30, -1)
    assert all(bytes(r) in rows for r in kept)
    with pytest.raises(ValueError, match=r"train_size=0 is not allowed; allowed: None"):
        data.load("fashion_mnist", data_dir=tmp_path / "fm", train_size=0)
    with pytest.raises(ValueError, match=r"train_size=101 is not allowed.*\[1, 100\]"):
        data.load("fashion_mnist", data_dir=tmp_path / "fm", train_size=101)


def test_missing_files_name_the_folders_and_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(_idx, "DEBIAN_DIR", tmp_path / "nowhere")
    monkeypatch.delenv(_idx.DATA_DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=r"not in .*nowhere; install them with `make data"):
        data.load("fashion_mnist", seed=7)
    write_set(tmp_path / "partial")
    (tmp_path / "partial" / _idx.FILES["test_y"]).unlink()
    with pytest.raises(FileNotFoundError, match="QFLAX_DATA_DIR"):
        data.load("fashion_mnist", data_dir=tmp_path / "partial")


def test_the_environment_variable_and_its_subfolder(tmp_path, monkeypatch):
    monkeypatch.setattr(_idx, "DEBIAN_DIR", tmp_path / "nowhere")
    write_set(tmp_path / "root" / "fashion-mnist", n_train=50)
    monkeypatch.setenv(_idx.DATA_DIR_ENV, str(tmp_path / "root"))
    assert _idx.fashion_mnist_dir() == tmp_path / "root" / "fashion-mnist"
    assert len(data.load("fashion_mnist", seed=3).train_y) == 50


def test_inconsistent_sets_are_refused(tmp_path):
    write_set(tmp_path / "fm")
    (tmp_path / "fm" / _idx.FILES["train_y"]).write_bytes(
        gzip.compress(idx_bytes(np.zeros(39, np.uint8)))
    )
    with pytest.raises(ValueError, match="train images .* and labels .* do not match"):
        data.load("fashion_mnist", data_dir=tmp_path / "fm")
    write_set(tmp_path / "labels")
    (tmp_path / "labels" / _idx.FILES["test_y"]).write_bytes(
        gzip.compress(idx_bytes(np.full(20, 12, np.uint8)))
    )
    with pytest.raises(ValueError, match=r"test label 12 is out of range; allowed: 0..9"):
        data.load("fashion_mnist", data_dir=tmp_path / "labels")


def test_configs_accept_the_name():
    config = default_config()
    config.dataset = "fashion_mnist"
    config.dataset_kwargs.train_size = 1000
    validate_config(config)
    assert "fashion_mnist" in data.DATASETS


@pytest.mark.skipif(
    not all((_idx.DEBIAN_DIR / n).is_file() for n in _idx.FILES.values()),
    reason="the Debian package dataset-fashion-mnist is not installed (make data)",
)
def test_the_installed_files_have_the_official_counts():
    d = data.load("fashion_mnist", train_size=600, seed=0)
    assert d.test_x.shape == (10_000, 28, 28, 1) and len(d.train_y) == 600
    assert np.all(np.bincount(d.test_y, minlength=10) == 1000)
