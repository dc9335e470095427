"""Post-training quantization of a float run: accuracy, integer inference, files, bad input."""

import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from qflax import data
from qflax.export import (
    FloatLayer,
    IntegerLayer,
    export_integer,
    integer_forward,
    load_ptq,
    ptq,
)
from qflax.train import default_config, train_and_evaluate


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    """A float CNN trained for 2 epochs on the 8x8 digits (a few seconds)."""
    config = default_config()
    config.dataset = "digits"
    config.model = "cnn"
    config.epochs = 2
    config.batch_size = 64
    config.optimizer.learning_rate = 3e-3
    config.progress_bar = False
    workdir = tmp_path_factory.mktemp("ptq") / "fp"
    _, summary = train_and_evaluate(config, workdir)
    assert summary["test_accuracy"] > 0.8
    return workdir, summary


def _test_predictions(model, config_dataset="digits"):
    dataset = data.load(config_dataset, seed=0)
    logits = nnx.jit(lambda model, x: model(x))(model, dataset.test_x)
    return np.asarray(logits).argmax(-1), np.asarray(dataset.test_y)


def test_ptq_w8a8_matches_float_and_integer_equals_fake_quant(float_run, tmp_path):
    workdir, float_summary = float_run
    out = tmp_path / "w8a8"
    summary = ptq(workdir, out, weight_bits=8, act_bits=8, calibration="mse", num_batches=4)
    assert summary["fp_test_accuracy"] == pytest.approx(float_summary["test_accuracy"])
    assert abs(summary["test_accuracy"] - summary["fp_test_accuracy"]) <= 0.005
    assert summary["integer_test_accuracy"] == summary["test_accuracy"]
    assert summary["differing_predictions"] == 0
    assert summary["bits"] == {"weight": 8, "act": 8} and summary["calibration"] == "mse"
    # int8 codes + scales + float biases: ~4x smaller than float32
    assert 3.0 < summary["float32_bytes"] / summary["model_bytes"] < 4.0
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "packed").is_dir()

    # The saved checkpoint rebuilds the same fake-quant model.
    predictions, labels = _test_predictions(load_ptq(out))
    assert np.mean(predictions == labels) == pytest.approx(summary["test_accuracy"])


def test_ptq_w4a4_first_last_float_runs_mixed_integer(float_run, tmp_path):
    workdir, _ = float_run
    out = tmp_path / "w4a4"
    summary = ptq(
        workdir,
        out,
        weight_bits=4,
        act_bits=4,
        calibration="percentile",
        num_batches=2,
        first_last_float=True,
    )
    assert summary["differing_predictions"] == 0
    assert summary["integer_test_accuracy"] == summary["test_accuracy"] > 0.5
    model = load_ptq(out)
    program = export_integer(model)
    assert [type(layer) for layer in program.layers] == [
        FloatLayer,
        IntegerLayer,
        IntegerLayer,
        FloatLayer,
    ]
    dataset = data.load("digits", seed=0)
    integer = np.asarray(jax.jit(integer_forward)(program, dataset.test_x)).argmax(-1)
    assert np.mean(integer == dataset.test_y) == pytest.approx(summary["integer_test_accuracy"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weight_bits": 9}, "weight_bits=9 is out of range; allowed: integers 2..8"),
        ({"act_bits": 1}, "act_bits=1 is out of range; allowed: integers 2..8"),
        ({"calibration": "kl"}, "calibration='kl' is not allowed; allowed: 'absmax', 'minmax'"),
        ({"num_batches": 0}, "num_batches=0 is not allowed; allowed: integers >= 1"),
        ({"first_last_float": "yes"}, "first_last_float='yes' is not allowed"),
    ],
)
def test_bad_options_fail_before_any_work(float_run, tmp_path, kwargs, message):
    workdir, _ = float_run
    with pytest.raises(ValueError, match=message):
        ptq(workdir, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_bad_workdirs_fail_before_any_work(float_run, tmp_path):
    workdir, _ = float_run
    with pytest.raises(ValueError, match=r"workdir='.*nope' does not exist; allowed: the direc"):
        ptq(tmp_path / "nope", tmp_path / "out")
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    config = json.loads((pathlib.Path(workdir) / "config.json").read_text())
    config["quant"]["recipe"] = "learned_step"
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"is not a float run \(quant.recipe='learned_step'"):
        ptq(quantized, tmp_path / "out")
    config["quant"]["recipe"] = "none"
    config["model"] = "resnet20"
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model='resnet20'; allowed for PTQ.*'mlp', 'cnn'"):
        ptq(quantized, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a PTQ result"):
        ptq(workdir, tmp_path / "done")
    with pytest.raises(ValueError, match="holds no PTQ result"):
        load_ptq(tmp_path / "nope")


def test_a_bad_or_busy_out_fails_before_any_work(float_run, tmp_path):
    from qflax.runs import DirInUseError, lock_dir

    workdir, _ = float_run
    file = tmp_path / "file.txt"
    file.write_text("mine")
    with pytest.raises(ValueError, match=r"out='.*file.txt' is an existing file"):
        ptq(workdir, file)
    with pytest.raises(ValueError, match=r"out='' is empty"):
        ptq(workdir, "")
    (tmp_path / "out").mkdir()
    with lock_dir(tmp_path / "out", option="out"):
        with pytest.raises(DirInUseError, match=r"out '.*out' is in use by another qflax run"):
            ptq(workdir, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".lock"]
