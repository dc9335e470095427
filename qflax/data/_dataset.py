"""The in-memory dataset record every loader returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

__all__ = ["Dataset", "KINDS"]

KINDS = ("image", "text")


def _frozen(array: np.ndarray) -> np.ndarray:
    """Returns ``array`` made read-only, so a cached Dataset cannot be changed by a caller (a
    streamed split is read-only already and stays unread)."""
    from qflax.data._stream import StreamedArray

    if isinstance(array, StreamedArray):
        return array
    array = np.asarray(array)
    array.flags.writeable = False
    return array


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Dataset:
    """A train/test split held as numpy arrays.

    Invariants: ``len(train_x) == len(train_y)``, ``len(test_x) == len(test_y)``,
    ``train_x.shape[1:] == test_x.shape[1:] == input_shape``; labels are int32 in
    ``[0, num_classes)``. Arrays are read-only (loads are cached and shared); copy to modify.

    Image datasets: ``x`` is float32 in [0, 1], channels last (N, H, W, C); ``y`` is int32 (N,).
    Text datasets (character level): ``x`` is int32 windows (N, seq_len) of token ids into
    ``vocab``, ``y`` the next-character targets of the same shape (``y[:, t] = x[:, t + 1]``
    within the corpus); ``train_tokens`` / ``test_tokens`` hold the whole token sequences;
    ``num_classes == len(vocab)``.
    """

    name: str  # the name that `load` was given, e.g. "digits" or "tfds:mnist"
    train_x: np.ndarray  # inputs of the training split, (N_train, *input_shape)
    train_y: np.ndarray  # int32 labels (image) or next-token targets (text) of the training split
    test_x: np.ndarray  # inputs of the test split, (N_test, *input_shape)
    test_y: np.ndarray  # int32 labels or targets of the test split
    num_classes: int  # number of label classes (text: the vocabulary size)
    input_shape: tuple[int, ...]  # per-example shape, channels last for images, e.g. (28, 28, 1)
    kind: str  # "image" or "text"
    vocab: tuple[str, ...] | None = None  # text only: token id -> character, sorted
    train_tokens: np.ndarray | None = None  # text only: the training corpus as int32 token ids
    test_tokens: np.ndarray | None = None  # text only: the test corpus as int32 token ids

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not allowed; allowed: {', '.join(KINDS)}")
        for field in ("train_x", "train_y", "test_x", "test_y", "train_tokens", "test_tokens"):
            value = getattr(self, field)
            if value is not None:
                object.__setattr__(self, field, _frozen(value))
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        if self.vocab is not None:
            object.__setattr__(self, "vocab", tuple(self.vocab))
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if len(x) != len(y):
                raise ValueError(f"{split}_x has {len(x)} examples but {split}_y has {len(y)}")
            if x.shape[1:] != self.input_shape:
                raise ValueError(
                    f"{split}_x has per-example shape {x.shape[1:]}, expected "
                    f"input_shape={self.input_shape}"
                )
        if self.kind == "text" and self.vocab is None:
            raise ValueError("vocab=None is not allowed for kind='text'; allowed: a character list")

    def encode(self, text: str) -> np.ndarray:
        """Text datasets: maps a string to int32 token ids (ValueError on unknown characters)."""
        table = self._char_to_id()
        unknown = sorted(set(text) - table.keys())
        if unknown:
            raise ValueError(f"characters {unknown!r} are not in the vocabulary of {self.name!r}")
        return np.array([table[c] for c in text], dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text datasets: maps token ids back to a string."""
        if self.vocab is None:
            raise ValueError(f"dataset {self.name!r} has kind={self.kind!r}; decode needs text")
        return "".join(self.vocab[int(i)] for i in np.asarray(ids).reshape(-1))

    def _char_to_id(self) -> dict[str, int]:
        if self.vocab is None:
            raise ValueError(f"dataset {self.name!r} has kind={self.kind!r}; encode needs text")
        return {c: i for i, c in enumerate(self.vocab)}

    def __repr__(self) -> str:
        text = f", vocab_size={len(self.vocab)}" if self.vocab is not None else ""
        return (
            f"Dataset(name={self.name!r}, kind={self.kind!r}, train={self.train_x.shape}"
            f"/{self.train_x.dtype}, test={self.test_x.shape}/{self.test_x.dtype}, "
            f"num_classes={self.num_classes}, input_shape={self.input_shape}{text})"
        )
