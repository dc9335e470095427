"""IDX files (LeCun's MNIST format, also Fashion-MNIST's) and the ``fashion_mnist`` dataset.

An IDX file is a big-endian header — two zero bytes, a type code (``0x08``: unsigned bytes, the
only type these data sets use), the number of dimensions — then one uint32 size per dimension
and the data; the four Fashion-MNIST files come gzipped (``*.gz``) as the Debian package
``dataset-fashion-mnist`` installs them in ``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

import gzip
import os
import pathlib

import numpy as np

from qflax.data._dataset import Dataset

__all__ = ["FASHION_MNIST_CLASSES", "fashion_mnist_dir", "load_fashion_mnist", "read_idx"]

# Where the Debian package installs the files; `make data` installs it.
DEBIAN_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
# The environment variable naming a folder with the files (or with a fashion-mnist/ folder).
DATA_DIR_ENV = "QFLAX_DATA_DIR"
INSTALL_HINT = "make data (as root: apt-get install dataset-fashion-mnist)"
# The four files, each also accepted without ".gz".
FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array of an IDX file of unsigned bytes (gzipped or not), shape from its header.

    Raises:
      ValueError: the header is not an IDX header of unsigned bytes, or the data is shorter or
        longer than the header's sizes say (naming the file and both counts).

    >>> import tempfile, struct
    >>> path = os.path.join(tempfile.mkdtemp(), "tiny-idx1-ubyte")
    >>> _ = open(path, "wb").write(struct.pack(">BBBBI", 0, 0, 8, 1, 3) + bytes([7, 0, 9]))
    >>> read_idx(path).tolist()
    [7, 0, 9]
    """
    path = pathlib.Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise ValueError(f"{path}: not a readable gzip file ({error})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (its first two bytes are not zero)")
    if raw[2] != _UBYTE:
        raise ValueError(
            f"{path}: IDX type code 0x{raw[2]:02x} is not supported; allowed: 0x08 (unsigned bytes)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path}: IDX header of {ndim} dimensions is truncated or empty")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise ValueError(
            f"{path}: holds {len(raw) - header} data bytes; its header {shape} says {size}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _find(folder: pathlib.Path, name: str) -> pathlib.Path | None:
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def fashion_mnist_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The folder holding the four Fashion-MNIST IDX files: ``data_dir`` when given, else
    ``$QFLAX_DATA_DIR`` (or its ``fashion-mnist`` / ``fashion_mnist`` subfolder), else the
    Debian package's ``/usr/share/datasets/fashion-mnist``.

    Raises:
      FileNotFoundError: no candidate folder holds all four files; the message names the
        folders searched, the files and the install command.
    """
    if data_dir is not None:
        candidates = [pathlib.Path(data_dir)]
    else:
        candidates = []
        env = os.environ.get(DATA_DIR_ENV)
        if env:
            base = pathlib.Path(env)
            candidates += [base, base / "fashion-mnist", base / "fashion_mnist"]
        candidates.append(DEBIAN_DIR)
    for folder in candidates:
        if all(_find(folder, name) for name in FILES.values()):
            return folder
    searched = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"fashion_mnist: the IDX files ({', '.join(FILES.values())}) are not in {searched}; "
        f"install them with `{INSTALL_HINT}` or set {DATA_DIR_ENV} to a folder holding them"
    )


def _check_train_size(train_size, available: int | None = None) -> int | None:
    """``train_size`` as an int (None stays None); ValueError unless 1 <= it <= available."""
    if train_size is None:
        return None
    top = "60000" if available is None else str(available)
    if (
        isinstance(train_size, bool)
        or not isinstance(train_size, (int, np.integer))
        or not 1 <= train_size <= (available or train_size)
    ):
        raise ValueError(
            f"train_size={train_size!r} is not allowed; allowed: None (all {top}) or an "
            f"integer in [1, {top}]"
        )
    return int(train_size)


def _stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """``size`` indices, each class in proportion (largest remainders), in seeded random order."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (size / len(labels))
    take = np.floor(quota).astype(np.int64)
    extra = size - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:extra]] += 1
    shuffled = labels[order]
    chosen = [order[shuffled == c][:k] for c, k in zip(classes, take, strict=True)]
    return rng.permutation(np.concatenate(chosen))


def load_fashion_mnist(
    *, seed: int, data_dir: str | os.PathLike | None = None, train_size: int | None = None
) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 training and 10,000 test images, 28×28 grey,
    10 classes (:data:`FASHION_MNIST_CLASSES`), from the four IDX files
    (:func:`fashion_mnist_dir` says where they are looked for).

    The test split is always the full official 10,000 images. ``train_size``: a stratified
    subset of the training images (every class in proportion), drawn with ``seed``; None: all
    60,000 in the files' order (the seed is then unused). Pixels are float32 in [0, 1], shape
    (28, 28, 1); labels int32.

    Raises:
      FileNotFoundError: the files are missing (the message says how to install them).
      ValueError: a file is malformed, the counts of images and labels differ, or a label is
        outside 0..9.
    """
    _check_train_size(train_size)  # before reading anything
    folder = fashion_mnist_dir(data_dir)
    arrays = {key: read_idx(_find(folder, name)) for key, name in FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"fashion_mnist in {folder}: {split} images {x.shape} and labels {y.shape} do "
                "not match; allowed: (N, H, W) images and (N,) labels"
            )
        if y.size and int(y.max()) >= len(FASHION_MNIST_CLASSES):
            raise ValueError(
                f"fashion_mnist in {folder}: {split} label {int(y.max())} is out of range; "
                f"allowed: 0..{len(FASHION_MNIST_CLASSES) - 1}"
            )
    train_x, train_y = arrays["train_x"], arrays["train_y"]
    size = _check_train_size(train_size, len(train_y))
    if size is not None and size < len(train_y):
        keep = _stratified_subset(train_y, size, seed)
        train_x, train_y = train_x[keep], train_y[keep]

    def images(x: np.ndarray) -> np.ndarray:
        return (x.astype(np.float32) / 255.0)[..., None]

    return Dataset(
        name="fashion_mnist",
        train_x=images(train_x),
        train_y=train_y.astype(np.int32),
        test_x=images(arrays["test_x"]),
        test_y=arrays["test_y"].astype(np.int32),
        num_classes=len(FASHION_MNIST_CLASSES),
        input_shape=(*arrays["test_x"].shape[1:], 1),
        kind="image",
    )
