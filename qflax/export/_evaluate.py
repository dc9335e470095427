"""Evaluating a run through integer inference (``qflax eval --integer``), with the pieces PTQ
shares: predictions over a test split in fixed-size batches, and the model's bytes at rest."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qflax.export._export import export_model, packed_model_bytes
from qflax.export.integer import (
    INTEGER_MODELS,
    FloatLayer,
    export_integer,
    fake_quant_forward,
    integer_forward,
    static_act_scales,
)

__all__ = ["evaluate_integer", "float32_bytes", "model_forward", "predict"]

# Training batches whose layer inputs calibrate the static scales of absmax activations.
CALIBRATION_BATCHES = 8


def predict(
    forward: Callable[[Any, jax.Array], jax.Array],
    args: Any,
    x: np.ndarray,
    batch_size: int,
) -> np.ndarray:
    """``argmax(forward(args, x_batch))`` over ``x`` in batches of ``batch_size`` (one compile:
    the last batch is padded)."""
    batch_size = max(1, min(batch_size, len(x)))
    jitted = jax.jit(forward)
    out = []
    for start in range(0, len(x), batch_size):
        xb = np.asarray(x[start : start + batch_size])
        n = len(xb)
        if n < batch_size:
            xb = np.concatenate([xb, np.zeros((batch_size - n, *xb.shape[1:]), xb.dtype)])
        out.append(np.asarray(jitted(args, jnp.asarray(xb))).argmax(-1)[:n])
    return np.concatenate(out)


def float32_bytes(model: nnx.Module) -> int:
    """4 bytes per parameter (quantizer parameters left out), as ``summary.json`` counts."""
    from qflax.layers import QuantParam

    weights = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.OfType(QuantParam))))
    return 4 * int(sum(np.size(x) for x in jax.tree.leaves(weights)))


def model_forward(model: nnx.Module, act_scales: dict[str, float] | None = None):
    """``(forward, state)``: ``forward(state, x)`` is ``model``'s fake-quant forward pass
    (:func:`~qflax.export.fake_quant_forward` with the static ``act_scales``; None: the
    model's own activation quantizers), a pure function of its ``nnx`` state for
    :func:`predict` and ``jax.jit``. It is the reference ``qflax eval --integer`` compares the
    integer program with."""
    graphdef, state = nnx.split(model)

    def forward(state, xb):
        return fake_quant_forward(nnx.merge(graphdef, state), xb, act_scales)

    return forward, state


def _training_batches(config, dataset, num_batches: int) -> Iterator[np.ndarray]:
    from qflax import data

    batch_size = min(config.batch_size, len(dataset.train_x))
    for i, (xb, _) in enumerate(
        data.batches(dataset.train_x, dataset.train_y, batch_size, seed=config.seed, epoch=0)
    ):
        if i >= num_batches:
            break
        yield xb


def evaluate_integer(workdir: str | os.PathLike) -> dict[str, Any]:
    """Evaluates the latest checkpoint of a quantized run through integer inference.

    The model is loaded with :func:`qflax.runs.load_model`, turned into an
    :class:`~qflax.export.IntegerProgram` (:func:`~qflax.export.export_integer`: float layers in
    float32; uniform layers (absmax / learned_step / lsq / pact / dorefa / gdnsq, ternary and
    codeq weights) on int8 codes with int32 accumulation;
    power-of-two weights (``pow2`` with ``act_levels="uniform"``) as shifts of int8 products;
    binary layers (``binary`` recipes with a sign forward, ``activation="hardtanh"`` models) as
    XNOR/popcount on packed bits with integer thresholds), and run on the test split.
    Its reference is the fake-quant model with the same static activation scales
    (learned_step: the model's own scales, so the reference is ``qflax eval``; absmax:
    scales calibrated on the first 8 training batches by
    :func:`~qflax.export.static_act_scales`; binary inputs need no scale).

    Returns:
      ``{"test_accuracy"`` (integer inference), ``"fake_quant_test_accuracy"``,
      ``"differing_predictions"`` (test examples whose integer and fake-quant predictions
      differ), ``"test_examples"``, ``"model_bytes"`` (the packed export, as
      :func:`~qflax.export.save_packed` stores it), ``"float32_bytes"``, ``"compression"``,
      ``"integer": True``, ``"integer_layers"`` and ``"float_layers"`` (how many layers run
      on codes or bits, and in float32), ``"step"``, ``"epoch"``, ``"dataset"``, ``"model"``,
      ``"recipe"}``.

    Raises:
      ValueError: no run or no checkpoint in ``workdir``, a float run (nothing quantized, also
        when every layer's bit-widths are 32, which means float), or
        a layer whose recipe integer inference cannot run (naming the layer, the recipe and
        what is supported).
    """
    from qflax import data
    from qflax.runs import load_config, load_model

    workdir = pathlib.Path(workdir)
    config = load_config(workdir)
    recipe = config.quant.recipe
    if recipe == "none" and not config.quant.rules:
        raise ValueError(
            f"{workdir} is a float run (quant.recipe='none'): it has no integer codes; allowed: "
            "a quantized run (quant.recipe absmax, learned_step, lsq, pact, dorefa, gdnsq, "
            "codeq, pow2 with recipe_kwargs.act_levels='uniform', or binary in a hardtanh "
            f"model), or `qflax ptq --workdir {workdir} --out DIR` to quantize it first"
        )
    if config.model not in INTEGER_MODELS:
        raise ValueError(
            f"{workdir}: model={config.model!r} is not supported by integer inference; allowed: "
            f"{', '.join(map(repr, INTEGER_MODELS))}"
        )
    model, config, meta = load_model(workdir)
    try:
        export_integer(model, {})  # checks every layer before any calibration or evaluation
    except ValueError as error:
        if "act_scales has no scale" not in str(error):
            raise ValueError(f"{workdir} (quant.recipe={recipe!r}): {error}") from error
    dataset = data.load(config.dataset, seed=config.seed, **dict(config.dataset_kwargs))
    scales = static_act_scales(model, _training_batches(config, dataset, CALIBRATION_BATCHES))
    program = export_integer(model, scales)
    on_codes = sum(not isinstance(layer, FloatLayer) for layer in program.layers)
    if not on_codes:
        raise ValueError(
            f"{workdir} (quant.recipe={recipe!r}, weight_bits={config.quant.weight_bits}, "
            f"act_bits={config.quant.act_bits}) keeps every layer float (a bit-width of 32 "
            "means float): integer inference would run nothing on integers; allowed: a "
            "run with at least one layer quantized to 8 bits or fewer"
        )
    batch = config.eval_batch_size
    reference_fn, state = model_forward(model, scales)
    reference = predict(reference_fn, state, dataset.test_x, batch)
    integer = predict(integer_forward, program, dataset.test_x, batch)
    labels = np.asarray(dataset.test_y)
    packed = packed_model_bytes(export_model(model))
    floats = float32_bytes(model)
    return {
        "test_accuracy": float(np.mean(integer == labels)),
        "fake_quant_test_accuracy": float(np.mean(reference == labels)),
        "differing_predictions": int(np.sum(integer != reference)),
        "test_examples": int(len(labels)),
        "model_bytes": int(packed),
        "float32_bytes": int(floats),
        "compression": floats / packed if packed else 1.0,
        "integer": True,
        "integer_layers": int(on_codes),
        "float_layers": int(len(program.layers) - on_codes),
        "step": int(meta.get("step", -1)),
        "epoch": int(meta.get("epoch", -1)),
        "dataset": config.dataset,
        "model": config.model,
        "recipe": recipe,
    }
