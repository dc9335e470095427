"""Deterministic minibatch iteration over in-memory numpy arrays."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["batches"]


def _check_int(value: Any, field: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{field}={value!r} is not an integer; allowed: integers >= {lo}")
    if value < lo:
        raise ValueError(f"{field}={value!r} is out of range; allowed: integers >= {lo}")
    return int(value)


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_last: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(x_batch, y_batch)`` minibatches in an order fixed by ``(seed, epoch)``.

    The permutation is drawn from ``np.random.default_rng((seed, epoch))``: the same seed and
    epoch give the same order on every run and machine, and each epoch a different one. Arguments
    are checked before the first batch is requested.

    Args:
      x: inputs, shape (N, ...).
      y: targets, shape (N, ...).
      batch_size: examples per batch, >= 1.
      seed: non-negative int seed of the shuffle.
      epoch: non-negative epoch index, mixed into the seed.
      shuffle: False keeps the stored order (seed and epoch are then unused).
      drop_last: drop the final batch when it is smaller than ``batch_size``.
      shard: ``(index, count)``: yield only part ``index`` of ``count`` equal, contiguous parts
        of every batch (several processes: each indexes, so reads, only its rows of the same
        global batch); ``batch_size`` must divide by ``count``.

    Returns:
      An iterator over ``N // batch_size`` batches (``ceil(N / batch_size)`` without drop_last).

    >>> x, y = np.arange(10), np.arange(10) * 10
    >>> [b[0].tolist() for b in batches(x, y, 4, seed=0, epoch=0, shuffle=False)]
    [[0, 1, 2, 3], [4, 5, 6, 7]]
    """
    batch_size = _check_int(batch_size, "batch_size", 1)
    seed = _check_int(seed, "seed", 0)
    epoch = _check_int(epoch, "epoch", 0)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}; they must match")
    index, count = shard
    count = _check_int(count, "shard count", 1)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index >= count:
        raise ValueError(f"shard={shard!r}; allowed: (index, count) with 0 <= index < count")
    _check_int(index, "shard index", 0)
    if count > 1 and not drop_last:
        raise ValueError(f"shard={shard!r} with drop_last=False; allowed: drop_last=True")
    if batch_size % count:
        raise ValueError(
            f"batch_size={batch_size} does not split into {count} shards; allowed: a multiple "
            f"of {count}"
        )
    n = len(x)
    order = np.random.default_rng((seed, epoch)).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    return _iterate(x, y, order, batch_size, stop, int(index), count)


def _iterate(x, y, order, batch_size, stop, part, count):
    size = batch_size // count
    for start in range(0, stop, batch_size):
        index = order[start : min(start + batch_size, stop)][part * size : (part + 1) * size]
        yield x[index], y[index]
