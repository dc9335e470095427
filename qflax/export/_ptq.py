"""Post-training quantization of a finished float run — Jacob et al. 2018 (CVPR), Sec. 3 with the
PTQ calibration of METHODS.md §1: BatchNorm folded into the layer before it (eval mode),
symmetric weights per output channel, static activation scales from a few training batches
(absmax, minmax, percentile or MSE of :mod:`qflax.calibration`), integer inference through
:func:`~qflax.export.export_integer`. Differs: no training of any kind (no quantization-aware
fine-tuning, no bias correction); activations are signed symmetric codes (no zero point: the
integer path is symmetric), so ``minmax`` is the symmetric grid covering ``[min, max]``.

The quantized model is a ``learned_step`` model (static scales held as parameters) so that its
fake-quant forward is the model itself, its packed export carries every scale, and
:func:`load_ptq` rebuilds it from the saved checkpoint.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qflax.export._evaluate import _training_batches, float32_bytes, predict
from qflax.export._export import (
    export_model,
    import_model,
    load_packed,
    packed_model_bytes,
    save_packed,
)
from qflax.export._fold import fold_model_batchnorm
from qflax.export.integer import (
    CALIBRATIONS,
    INTEGER_MODELS,
    export_integer,
    integer_forward,
    static_act_scales,
)
from qflax.numerics import check_choice

__all__ = ["PTQ_KEYS", "load_ptq", "ptq", "ptq_config"]

# The keys of `qflax ptq --config.KEY=VALUE` (the keyword arguments of `ptq`), with defaults.
PTQ_KEYS = {
    "weight_bits": 8,
    "act_bits": 8,
    "calibration": "absmax",
    "num_batches": 8,
    "first_last_float": False,
}
PACKED_DIR = "packed"
SUMMARY_FILE = "summary.json"


def ptq_config():
    """The ``qflax ptq`` options as a locked ``ConfigDict`` (:data:`PTQ_KEYS`), so that
    ``--config.KEY=VALUE`` overrides parse as ``qflax train``'s do."""
    import ml_collections

    config = ml_collections.ConfigDict(dict(PTQ_KEYS))
    config.lock()
    return config


def _check_bits(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 2 <= value <= 8:
        raise ValueError(
            f"{field}={value!r} is out of range; allowed: integers 2..8 (integer inference "
            "runs signed symmetric codes in int8)"
        )
    return int(value)


def _check_args(
    workdir: pathlib.Path,
    out: pathlib.Path,
    weight_bits: Any,
    act_bits: Any,
    calibration: Any,
    num_batches: Any,
    first_last_float: Any,
):
    """Every check that needs no model: raises ValueError naming the bad value."""
    from qflax.runs import load_config

    _check_bits(weight_bits, "weight_bits")
    _check_bits(act_bits, "act_bits")
    check_choice(calibration, "calibration", CALIBRATIONS)
    if isinstance(num_batches, bool) or not isinstance(num_batches, (int, np.integer)):
        raise ValueError(f"num_batches={num_batches!r} is not allowed; allowed: integers >= 1")
    if num_batches < 1:
        raise ValueError(f"num_batches={num_batches!r} is not allowed; allowed: integers >= 1")
    if not isinstance(first_last_float, (bool, np.bool_)):
        raise ValueError(
            f"first_last_float={first_last_float!r} is not allowed; allowed: True, False"
        )
    if not workdir.is_dir():
        raise ValueError(
            f"workdir={str(workdir)!r} does not exist; allowed: the directory of a finished "
            "float run (`qflax train` with quant.recipe='none')"
        )
    config = load_config(workdir)
    if config.quant.recipe != "none" or config.quant.rules:
        raise ValueError(
            f"workdir={str(workdir)!r} is not a float run (quant.recipe="
            f"{config.quant.recipe!r}, quant.rules={list(config.quant.rules)!r}); allowed: a "
            "run trained with quant.recipe='none' and no rules"
        )
    if config.model not in INTEGER_MODELS:
        raise ValueError(
            f"workdir={str(workdir)!r} holds model={config.model!r}; allowed for PTQ with "
            f"integer inference: {', '.join(map(repr, INTEGER_MODELS))}"
        )
    _check_no_result(out)
    return config


def _check_no_result(out: pathlib.Path) -> None:
    if (out / PACKED_DIR).exists() or (out / SUMMARY_FILE).exists():
        raise ValueError(
            f"out={str(out)!r} already holds a PTQ result ({PACKED_DIR}/ or {SUMMARY_FILE}); "
            "allowed: a new or empty directory"
        )


def _rules(weight_bits: int, act_bits: int, first_last_float: bool, kind: str) -> list:
    from qflax import layers as ql

    recipe = ql.RECIPES[kind](weight_bits, act_bits)
    if first_last_float:
        return list(ql.first_last_float_rules(recipe))
    return [ql.Rule(".*", recipe)]


def _quantized(folded: nnx.Module, settings: dict[str, Any]) -> nnx.Module:
    """The learned_step model of a folded float model (scales still the init ones)."""
    from qflax import layers as ql

    rules = _rules(
        settings["weight_bits"],
        settings["act_bits"],
        settings["first_last_float"],
        "learned_step",
    )
    model, _ = ql.quantize_model(folded, rules)
    return model


def _set_scales(
    model: nnx.Module, act_scales: dict[str, float], calibration: str
) -> list[dict[str, Any]]:
    """Writes the weight scales (absmax per output channel; ``mse``: the per-channel MSE
    search) and the static activation scales into the learned_step layers."""
    from qflax import calibration as cal
    from qflax.export._export import quant_layers

    rows = []
    for path, layer in quant_layers(model):
        name = ".".join(path)
        config = layer.recipe.weight.config
        kernel = layer.inner.kernel[...]
        estimator = cal.mse if calibration == "mse" else cal.absmax
        scale, _ = estimator(
            kernel,
            bits=config.bits,
            signed=config.signed,
            narrow_range=config.narrow_range,
            granularity="channel",
            axis=-1,
        )
        layer.weight_scale[...] = jnp.asarray(scale, jnp.float32).reshape(-1)
        layer.act_scale[...] = jnp.asarray(act_scales[name], jnp.float32).reshape(())
        rows.append({"name": name, "act_scale": float(act_scales[name])})
    return rows


def ptq(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    weight_bits: int = 8,
    act_bits: int = 8,
    calibration: str = "absmax",
    num_batches: int = 8,
    first_last_float: bool = False,
) -> dict[str, Any]:
    """Post-training quantization of the float run in ``workdir``, saved into ``out``.

    Steps: load the latest checkpoint (:func:`qflax.runs.load_model`); fold every eval-mode
    BatchNorm into the conv/dense before it (:func:`~qflax.export.fold_model_batchnorm`);
    calibrate one static scale per layer input on the first ``num_batches`` training batches
    (the inputs of the absmax fake-quant model, :func:`~qflax.export.static_act_scales` with
    ``calibration``); quantize every layer (``first_last_float``: all but ``stem`` and
    ``head``) with symmetric ``weight_bits`` weights per output channel (absmax scales; MSE
    search with ``calibration="mse"``) and ``act_bits`` inputs at those scales; evaluate the
    float, fake-quant and integer models on the test split; save the packed export.

    Files in ``out``: ``packed/`` (:func:`~qflax.export.save_packed` of
    :func:`~qflax.export.export_model`; :func:`load_ptq` rebuilds the model) and
    ``summary.json`` (the returned dict).

    Args:
      workdir: a finished float run (``qflax train`` with ``quant.recipe='none'``) of an MLP
        or CNN.
      out: the output directory (created; must not hold a PTQ result yet).
      weight_bits: bits of the weights, 2..8.
      act_bits: bits of the layer inputs, 2..8.
      calibration: the activation range estimator: one of ``absmax``, ``minmax``,
        ``percentile`` (99.99th percentile of ``|x|``), ``mse``
        (:func:`~qflax.export.estimate_scale`).
      num_batches: training batches to calibrate on, >= 1.
      first_last_float: keep the first and last layers float.

    Returns:
      ``{"test_accuracy"`` (fake-quant), ``"integer_test_accuracy"``, ``"fp_test_accuracy"``,
      ``"differing_predictions"`` (integer vs fake-quant), ``"model_bytes"`` (the packed
      export), ``"float32_bytes"`` (the float model, 4 per parameter), ``"compression"``,
      ``"calibration"``, ``"num_batches"``, ``"bits": {"weight", "act"}``, ``"weight_bits"``,
      ``"act_bits"``, ``"first_last_float"``, ``"source"`` (workdir), ``"step"``,
      ``"layers"`` (name, act_scale), ``"wall_seconds"}``.

    Raises:
      ValueError: before any work, for bad bits, an unknown calibration, a bad
        ``num_batches``, a missing workdir, a run that is not a float MLP/CNN run, or an
        ``out`` that is empty (``""``), a file, not writable or already holds a result;
        :class:`~qflax.runs.DirInUseError` when another ``ptq`` writes ``out`` now
        (``out/.lock``).
    """
    from qflax.runs import check_output_dir, lock_dir

    start = time.perf_counter()
    out = check_output_dir(out, option="out")
    workdir = pathlib.Path(workdir)
    _check_args(workdir, out, weight_bits, act_bits, calibration, num_batches, first_last_float)
    settings = dict(
        weight_bits=int(weight_bits),
        act_bits=int(act_bits),
        calibration=calibration,
        num_batches=int(num_batches),
        first_last_float=bool(first_last_float),
    )
    out.mkdir(parents=True, exist_ok=True)
    with lock_dir(out, option="out"):  # one writer per out directory
        _check_no_result(out)
        return _quantize_and_save(workdir, out, settings, start)


def _quantize_and_save(
    workdir: pathlib.Path, out: pathlib.Path, settings: dict[str, Any], start: float
) -> dict[str, Any]:
    """:func:`ptq` once its arguments are checked and ``out`` is locked."""
    weight_bits, act_bits = settings["weight_bits"], settings["act_bits"]
    calibration = settings["calibration"]
    from qflax import data
    from qflax.export._evaluate import model_forward
    from qflax.runs import load_model

    model, config, meta = load_model(workdir)
    dataset = data.load(config.dataset, seed=config.seed, **dict(config.dataset_kwargs))
    batch = config.eval_batch_size
    labels = np.asarray(dataset.test_y)
    float_fn, float_state = model_forward(model, None)
    fp_accuracy = float(np.mean(predict(float_fn, float_state, dataset.test_x, batch) == labels))

    folded = fold_model_batchnorm(model, remove=True)
    from qflax import layers as ql

    dynamic, _ = ql.quantize_model(
        folded, _rules(weight_bits, act_bits, settings["first_last_float"], "absmax")
    )
    act_scales = static_act_scales(
        dynamic,
        _training_batches(config, dataset, settings["num_batches"]),
        calibration=calibration,
    )
    quantized = _quantized(folded, settings)
    rows = _set_scales(quantized, act_scales, calibration)

    q_fn, q_state = model_forward(quantized, None)
    fake = predict(q_fn, q_state, dataset.test_x, batch)
    program = export_integer(quantized)
    integer = predict(integer_forward, program, dataset.test_x, batch)

    tree = export_model(quantized)
    save_packed(tree, out / PACKED_DIR)
    packed, floats = packed_model_bytes(tree), float32_bytes(model)
    summary = {
        "test_accuracy": float(np.mean(fake == labels)),
        "integer_test_accuracy": float(np.mean(integer == labels)),
        "fp_test_accuracy": fp_accuracy,
        "differing_predictions": int(np.sum(fake != integer)),
        "test_examples": int(len(labels)),
        "model_bytes": int(packed),
        "float32_bytes": int(floats),
        "compression": floats / packed if packed else 1.0,
        "bits": {"weight": settings["weight_bits"], "act": settings["act_bits"]},
        **settings,
        "source": str(workdir.absolute()),
        "step": int(meta.get("step", -1)),
        "dataset": config.dataset,
        "model": config.model,
        "layers": rows,
        "wall_seconds": time.perf_counter() - start,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_ptq(out: str | os.PathLike) -> nnx.Module:
    """Rebuilds the quantized model saved by :func:`ptq` in ``out`` (from ``summary.json``, the
    source run's config and ``packed/``); its forward is the fake-quant model of the summary.

    Raises:
      ValueError: ``out`` holds no PTQ result, or the source run is gone.
    """
    from qflax import data
    from qflax.runs import build_model, load_config

    out = pathlib.Path(out)
    path = out / SUMMARY_FILE
    if not path.is_file() or not (out / PACKED_DIR).is_dir():
        raise ValueError(
            f"out={str(out)!r} holds no PTQ result ({SUMMARY_FILE} and {PACKED_DIR}/); "
            "allowed: a directory written by `qflax ptq`"
        )
    summary = json.loads(path.read_text())
    config = load_config(summary["source"])
    dataset = data.load(config.dataset, seed=config.seed, **dict(config.dataset_kwargs))
    model, _ = build_model(config, dataset, calibrate=False)
    settings = {k: summary[k] for k in PTQ_KEYS}
    quantized = _quantized(fold_model_batchnorm(model, remove=True), settings)
    return import_model(quantized, load_packed(out / PACKED_DIR))
