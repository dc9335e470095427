"""TFDS datasets read through random-access ``array_record`` data sources (no TensorFlow needed).

``tfds.data_source`` / ``builder.as_data_source`` return a ``Sequence`` of decoded numpy examples
that grain reads directly (``grain.MapDataset.source(source)``); nothing here imports TensorFlow.

What works without TensorFlow:

* reading a dataset already prepared in ``array_record`` format under ``data_dir`` (even when
  the builder's code is not importable: TFDS then reads the stored metadata), and
* preparing a builder whose features encode without TensorFlow (``tfds.features.Tensor``,
  ``ClassLabel``, ``Image`` given already-encoded PNG/JPEG bytes).

Preparing catalogue datasets whose images arrive as arrays (e.g. ``mnist``) needs TensorFlow for
the PNG encoding: prepare them once on a machine with TensorFlow
(``tfds build mnist --file_format=array_record --data_dir=DIR``) and pass ``data_dir=DIR``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from qflax.data._dataset import Dataset
from qflax.data._stream import streamed_split

__all__ = ["tfds_source", "load_tfds"]

ARRAY_RECORD = "array_record"
_CHUNK = 1024  # examples decoded per batched read when materializing a split


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - tfds is a declared dependency
        raise ImportError(
            "'tfds:<name>' datasets need tensorflow-datasets (pip install tensorflow-datasets)"
        ) from e
    return tfds


def _builder(name: str, data_dir: str | os.PathLike | None, download: bool = True):
    """The TFDS builder of ``name`` (registered or found prepared under ``data_dir``), prepared."""
    tfds = _import_tfds()
    if not name:
        raise ValueError("dataset name 'tfds:' is empty; allowed: 'tfds:<name>', e.g. 'tfds:mnist'")
    data_dir = None if data_dir is None else os.fspath(data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format=ARRAY_RECORD)
    except tfds.core.registered.DatasetNotFoundError as e:
        where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
        raise ValueError(
            f"'tfds:{name}' was not found: {name!r} is neither a registered TFDS builder nor "
            f"prepared under data_dir={where!r}; allowed: any TFDS dataset name (see "
            "tfds.list_builders()) or one prepared in array_record format under data_dir"
        ) from e
    if not isinstance(builder, tfds.core.read_only_builder.ReadOnlyBuilder):
        if not builder.is_prepared():
            if not download:
                root = str(builder.data_dir_root)
                raise ValueError(
                    f"'tfds:{name}' is not prepared under data_dir={root!r} and "
                    "download=False; allowed: a data_dir holding it in array_record format, or "
                    "download=True (needs network)"
                )
            try:
                builder.download_and_prepare(file_format=ARRAY_RECORD)
            except ModuleNotFoundError as e:
                if "tensorflow" not in str(e) or "tensorflow_datasets" in str(e):
                    raise
                raise ImportError(
                    f"preparing 'tfds:{name}' needs TensorFlow, which is not installed. Prepare "
                    f"it once where TensorFlow is available (`tfds build {name} "
                    "--file_format=array_record --data_dir=DIR`) and pass data_dir=DIR"
                ) from e
    return builder


def tfds_source(
    name: str, split: str, data_dir: str | os.PathLike | None = None, *, download: bool = True
) -> Any:
    """A random-access source of decoded examples for streaming a (large) TFDS split.

    The source is a ``Sequence`` of feature dicts of numpy arrays (e.g. ``{"image": uint8
    (H, W, C), "label": int}``) that grain reads without loading the split into memory::

        source = tfds_source("imagenet2012", "train", data_dir="/data/tfds")
        ds = grain.MapDataset.source(source).shuffle(seed=0).map(my_preprocess).batch(256)

    Prepares the dataset (``array_record`` format) when it is registered but not yet on disk,
    which needs network access (and TensorFlow for image datasets given as arrays).

    Args:
      name: TFDS dataset name, optionally with config and version (``"mnist:3.0.1"``).
      split: a TFDS split string, e.g. ``"train"``, ``"test"`` or ``"train[:90%]"``.
      data_dir: TFDS data directory (default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      download: False raises ValueError at once when the data is not on disk, instead of
        downloading (offline, a download fails only after minutes of retries).

    Returns:
      The TFDS ``ArrayRecordDataSource`` (``len`` and ``[index]`` / ``__getitems__``).
    """
    return _builder(name, data_dir, download).as_data_source(split=split)


def _supervised_keys(info) -> tuple[str, str]:
    keys = info.supervised_keys
    if keys is not None and len(keys) >= 2 and all(isinstance(k, str) for k in keys[:2]):
        return keys[0], keys[1]
    features = list(info.features.keys())
    if "image" in features and "label" in features:
        return "image", "label"
    raise ValueError(
        f"'tfds:{info.name}' declares no (input, label) supervised keys and has no 'image' and "
        f"'label' features (features: {features}); allowed: image classification datasets"
    )


def _to_images(x: np.ndarray) -> np.ndarray:
    """Maps stacked image examples to float32 NHWC; integer pixels scaled to [0, 1]."""
    if x.ndim == 3:  # (N, H, W): add the channel axis
        x = x[..., None]
    if np.issubdtype(x.dtype, np.integer):
        return x.astype(np.float32) / np.float32(np.iinfo(x.dtype).max)
    return x.astype(np.float32)


# "Resize 256, crop 224": the shorter side is scaled to image_size / CROP, then the centre
# image_size × image_size is kept (ImageNet's usual evaluation transform).
CROP = 0.875


def fit_image(image: Any, size: int) -> np.ndarray:
    """An image ``(H, W[, C])`` of any size as ``(size, size, C)``: the shorter side resized to
    ``size / CROP`` (bilinear, PIL), then the centre crop; the dtype is kept."""
    import PIL.Image

    array = np.asarray(image)
    squeeze = array.ndim == 3 and array.shape[-1] == 1
    pil = PIL.Image.fromarray(array[..., 0] if squeeze else array)
    height, width = array.shape[:2]
    scale = size / CROP / min(height, width)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    pil = pil.resize(new, PIL.Image.BILINEAR)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    out = np.asarray(pil.crop((left, top, left + size, top + size)))
    return out[..., None] if out.ndim == 2 else out


def _read_split(
    source, x_key: str, y_key: str, shape: tuple[int, ...], np_dtype, example_fn=np.asarray
):
    """Decodes a whole split into (x, y) numpy arrays with batched random-access reads."""
    n = len(source)
    xs, ys = [np.zeros((0, *shape), dtype=np_dtype)], [np.zeros((0,), dtype=np.int64)]
    getitems = getattr(source, "__getitems__", None)
    for start in range(0, n, _CHUNK):
        indices = list(range(start, min(start + _CHUNK, n)))
        records = getitems(indices) if getitems else [source[i] for i in indices]
        xs.append(np.stack([example_fn(r[x_key]) for r in records]))
        ys.append(np.asarray([r[y_key] for r in records], dtype=np.int64))
    return _to_images(np.concatenate(xs)), np.concatenate(ys).astype(np.int32)


def load_tfds(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    train_split: str = "train",
    test_split: str | None = None,
    download: bool = True,
    stream: bool = False,
    image_size: int = 0,
) -> Dataset:
    """Loads a TFDS image-classification dataset entirely into numpy (or, ``stream=True``, as
    splits read on demand).

    Images become float32 NHWC (integer pixels scaled to [0, 1]), labels int32; ``num_classes``
    and ``input_shape`` come from the builder's info. Reading the whole split into memory suits
    small datasets (MNIST, CIFAR); stream large ones with :func:`tfds_source` and grain.

    Args:
      name: TFDS dataset name (without the ``tfds:`` prefix).
      data_dir: TFDS data directory.
      train_split: TFDS split string of the training data.
      test_split: TFDS split string of the test data; default ``"test"``, or ``"validation"``
        when the dataset has no test split.
      download: False raises ValueError at once when the data is not on disk.
      stream: True reads nothing up front: ``train_x``/``test_x``/``*_y`` are
        :class:`~qflax.data.StreamedArray` views that decode only the examples indexed (a batch;
        with several processes, each process's rows of it), for sets too large for memory.
      image_size: > 0: every image resized and centre-cropped to ``image_size`` square
        (:func:`fit_image`: "resize 256, crop 224" at 224), which variable-size sets such as
        ImageNet need; 0: the images as stored (fixed-size sets only).
    """
    builder = _builder(name, data_dir, download)
    info = builder.info
    x_key, y_key = _supervised_keys(info)
    x_feature, y_feature = info.features[x_key], info.features[y_key]
    num_classes = getattr(y_feature, "num_classes", None)
    if num_classes is None:
        raise ValueError(
            f"'tfds:{name}' label feature {y_key!r} is {type(y_feature).__name__}; allowed: a "
            "ClassLabel (image classification datasets)"
        )
    shape = tuple(x_feature.shape)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 0:
        raise ValueError(f"image_size={image_size!r} is not allowed; allowed: integers >= 0")
    example_fn = np.asarray
    if image_size and len(shape) in (2, 3):
        shape = (image_size, image_size, *shape[2:])
        example_fn = functools.partial(fit_image, size=image_size)
    if len(shape) not in (2, 3) or any(d is None for d in shape):
        raise ValueError(
            f"'tfds:{name}' input feature {x_key!r} has shape {shape}; allowed: fixed-size "
            "images (H, W) or (H, W, C), or image_size > 0 to resize variable-size ones"
        )
    if test_split is None:
        available = list(info.splits.keys())
        for candidate in ("test", "validation"):
            if candidate in available:
                test_split = candidate
                break
        else:
            raise ValueError(
                f"'tfds:{name}' has no 'test' or 'validation' split (splits: {available}); "
                "pass test_split=<a TFDS split string>, e.g. 'train[90%:]'"
            )
    if not isinstance(stream, bool):
        raise ValueError(f"stream={stream!r} is not allowed; allowed: True, False")
    arrays = {}
    image_shape = shape if len(shape) == 3 else (*shape, 1)
    for role, split in (("train", train_split), ("test", test_split)):
        source = builder.as_data_source(split=split)
        if stream:
            arrays[role] = streamed_split(
                source, x_key, y_key, image_shape, _to_images, np.float32, example_fn
            )
        else:
            arrays[role] = _read_split(source, x_key, y_key, shape, x_feature.np_dtype, example_fn)
    (train_x, train_y), (test_x, test_y) = arrays["train"], arrays["test"]
    return Dataset(
        name=f"tfds:{name}",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=int(num_classes),
        input_shape=train_x.shape[1:],
        kind="image",
    )
