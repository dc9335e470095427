"""Splits read on demand from a random-access source (a TFDS ``array_record`` data source)
instead of held in memory: ``x[index]`` decodes only the examples a batch needs, so a process
reads only the rows it trains on (several processes: its share of each global batch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["StreamedArray", "streamed_split"]


class _Split:
    """The records of one split, decoded per request; the labels of the last request are
    kept so ``x[index]`` then ``y[index]`` decodes each record once."""

    def __init__(
        self,
        source: Any,
        x_key: str,
        y_key: str,
        to_x: Callable,
        to_y: Callable,
        example_fn: Callable | None = None,
    ):
        self.source, self.x_key, self.y_key = source, x_key, y_key
        self.to_x, self.to_y = to_x, to_y
        self.example_fn = example_fn or np.asarray
        self._last: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.source)

    def records(self, index: np.ndarray) -> list[dict]:
        getitems = getattr(self.source, "__getitems__", None)
        ids = [int(i) for i in index]
        return getitems(ids) if getitems else [self.source[i] for i in ids]

    def read(self, index: np.ndarray, key: str) -> np.ndarray:
        if key == self.y_key and self._last is not None and np.array_equal(self._last[0], index):
            return self._last[1]
        records = self.records(index)
        labels = self.to_y(np.asarray([r[self.y_key] for r in records]))
        self._last = (np.array(index, copy=True), labels)
        if key == self.y_key:
            return labels
        return self.to_x(np.stack([self.example_fn(r[self.x_key]) for r in records]))


class StreamedArray:
    """A read-only, array-like view of one field of a streamed split: ``len``, ``shape``,
    ``dtype`` and indexing by an integer, a slice or an integer array (returning numpy arrays
    of the decoded examples). It is never materialized as a whole (``np.asarray`` of it raises:
    index it)."""

    def __init__(self, split: _Split, key: str, example_shape: tuple[int, ...], dtype: Any):
        self._split, self._key = split, key
        self.shape = (len(split), *example_shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, item: Any) -> np.ndarray:
        n = len(self)
        if isinstance(item, (int, np.integer)):
            if not -n <= item < n:
                raise IndexError(f"index {item} is out of range for {n} examples")
            return self._split.read(np.asarray([item % n]), self._key)[0]
        if isinstance(item, slice):
            index = np.arange(n)[item]
        else:
            index = np.asarray(item)
            if index.dtype == bool or not np.issubdtype(index.dtype, np.integer):
                raise IndexError(f"a streamed split is indexed by integers; got {index.dtype}")
            index = np.where(index < 0, index + n, index)
            if index.size and (index.min() < 0 or index.max() >= n):
                raise IndexError(f"indices out of range for {n} examples")
        if index.size == 0:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        return self._split.read(index, self._key)

    def __array__(self, dtype=None, copy=None):
        raise TypeError(
            f"a streamed split of {len(self)} examples is not loaded into memory; index it "
            "(x[indices]) to read the examples a batch needs"
        )

    def __repr__(self) -> str:
        return f"StreamedArray(shape={self.shape}, dtype={self.dtype})"


def streamed_split(
    source: Any,
    x_key: str,
    y_key: str,
    example_shape: tuple[int, ...],
    to_x: Callable[[np.ndarray], np.ndarray],
    x_dtype: Any,
    example_fn: Callable[[Any], np.ndarray] | None = None,
) -> tuple[StreamedArray, StreamedArray]:
    """``(x, y)`` views of ``source`` (records ``{x_key: ..., y_key: ...}``): ``x[index]`` is
    ``to_x`` of the stacked examples (each through ``example_fn`` first, e.g. a resize; dtype
    ``x_dtype``), ``y[index]`` the int32 labels."""
    split = _Split(source, x_key, y_key, to_x, lambda y: y.astype(np.int32), example_fn)
    return (
        StreamedArray(split, x_key, example_shape, x_dtype),
        StreamedArray(split, y_key, (), np.int32),
    )
