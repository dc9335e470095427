"""The float reference of integer inference and its calibration: :func:`fake_quant_forward`
(the eval-mode fake-quant forward of the planned chain, with static activation scales),
:func:`static_act_scales` and :func:`estimate_scale`. Depends on the plan and the arithmetic."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from qflax import quantizers as qz
from qflax.export.integer._arith import CONV_DIMS, max_pool
from qflax.export.integer._plan import (
    Step,
    act_spec,
    binary_weight,
    inner,
    input_grid,
    is_binary_step,
    is_float_step,
    is_quant,
    params,
    plan,
    sign_valued,
    static_input,
    stats,
)
from qflax.numerics import check_choice

__all__ = ["CALIBRATIONS", "estimate_scale", "fake_quant_forward", "post", "static_act_scales"]

_ACT_FNS = {"relu": jax.nn.relu, "hardtanh": jax.nn.hard_tanh}
# Range estimators of static activation scales (qflax.calibration), by name.
CALIBRATIONS = ("absmax", "minmax", "percentile", "mse")


def _linear_op(step: Step, x: jax.Array, kernel: jax.Array, **kwargs: Any) -> jax.Array:
    layer = inner(step.layer)
    if step.op == "dense":
        return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), **kwargs)
    padding = layer.padding
    if not isinstance(padding, str):
        padding = tuple(tuple(p) for p in padding)
    return lax.conv_general_dilated(
        x,
        kernel,
        tuple(layer.strides),
        padding,
        dimension_numbers=CONV_DIMS,
        **kwargs,
    )


def _static_act(x: jax.Array, spec, scale: float) -> jax.Array:
    config = spec.config
    return qz.uniform(x, {"scale": jnp.full((1,) * x.ndim, scale, jnp.float32)}, config)


def post(y: jax.Array, bias: Any, norm: Any, act: str | None) -> jax.Array:
    """Bias, eval-mode BatchNorm and the activation after a layer's product (the float ops the
    threshold folding of binary layers replays)."""
    if bias is not None:
        y = y + bias
    if norm is not None:
        y = norm(y, use_running_average=True)
    if act is not None:
        y = _ACT_FNS[act](y)
    return y


def fake_quant_forward(
    model: nnx.Module,
    x: jax.Array,
    act_scales: Mapping[str, float] | None = None,
    *,
    record: dict[str, jax.Array] | None = None,
) -> jax.Array:
    """The eval-mode fake-quant forward of an MLP / CNN, with static activation scales.

    Re-traces the model's forward (flatten, layers, BatchNorm in eval mode, the model's ReLU or
    hardtanh, 2x2 max-pool) with each quant layer's quantized kernel (``quantized_kernel()``)
    and its input quantized by its activation quantizer: with ``act_scales=None`` the layer's
    own (dynamic absmax: equal to ``model(x)``); with ``act_scales[path] = s`` the same uniform
    quantizer with the fixed scale ``s`` (the reference integer inference matches). Input
    quantizers that are not uniform (binary, pairs) are the layer's own either way.

    Binary layers (``±1`` inputs, ``α·(±1)`` weights) compute ``(x̂ ⊛ sign ŵ)·α``: the real
    number of the model's ``x̂ ⊛ ŵ`` with the ±1 sums exact in float32 and a single rounding
    (the model's own forward agrees up to float32 rounding of its partial sums).

    Args:
      model: an MLP or CNN (quant layers or float layers).
      x: a batch of inputs.
      act_scales: ``{path: scale}`` from :func:`static_act_scales`; None: dynamic.
      record: if given, ``record[path]`` receives each layer's float input (before quantization).

    Returns:
      Float32 logits.
    """
    x = jnp.asarray(x, jnp.float32)
    for step in plan(model):
        if step.flatten:
            x = x.reshape(x.shape[0], -1)
        if record is not None:
            record[step.path] = x
        layer, inner_layer = step.layer, inner(step.layer)
        spec = act_spec(step)
        if spec is not None:
            static = None if act_scales is None else static_input(spec, layer)
            if static and step.path in act_scales:
                x = _static_act(x, spec, act_scales[step.path])
            elif static == "required":  # a learned scale is static already
                raise ValueError(
                    f"act_scales has no scale for layer {step.path!r}; allowed: act_scales "
                    "from static_act_scales(model, batches)"
                )
            else:
                # (the forward never depends on the noise of a stochastic backward rule)
                key = jax.random.key(0) if spec.needs_key else None
                x = spec.apply(x, params(layer, "act"), key=key, stats=stats(layer, "act"))
        if is_binary_step(step):
            signs, alpha = binary_weight(layer)
            y = _linear_op(step, x, signs) * alpha
        else:
            kernel = layer.quantized_kernel() if is_quant(layer) else inner_layer.kernel[...]
            y = _linear_op(step, x, kernel)
        bias = None if inner_layer.bias is None else inner_layer.bias[...]
        y = post(y, bias, step.norm, step.act)
        if step.pool:
            y = max_pool(y)
        x = y
    return x


def _batch_inputs(batch: Any) -> jax.Array:
    if isinstance(batch, Mapping):
        batch = batch.get("image", batch.get("x"))
    elif isinstance(batch, tuple | list):
        batch = batch[0]
    return jnp.asarray(batch, jnp.float32)


def estimate_scale(x: jax.Array, config: qz.UniformConfig, calibration: str) -> float:
    """One symmetric per-tensor scale of ``x`` for the codes of ``config`` (z = 0).

    ``absmax``: ``max|x| / qmax``; ``percentile``: the 99.99th percentile of ``|x|`` instead of
    the max; ``mse``: the clip ratio minimising the squared error (64 candidates); ``minmax``:
    the smallest scale whose codes ``[qmin, qmax]`` cover ``[min(x, 0), max(x, 0)]`` (the
    symmetric grid of integer inference has no zero point, so this is ``max(max/qmax,
    min/qmin)``: absmax up to the one extra negative code) — all from :mod:`qflax.calibration`.
    """
    from qflax import calibration as cal

    check_choice(calibration, "calibration", CALIBRATIONS)
    common = dict(bits=config.bits, signed=config.signed, narrow_range=config.narrow_range)
    if calibration == "absmax":
        scale, _ = cal.absmax(x, **common)
    elif calibration == "percentile":
        scale, _ = cal.percentile(x, percentile=99.99, **common)
    elif calibration == "mse":
        scale, _ = cal.mse(x, **common)
    else:
        lo = float(jnp.minimum(jnp.min(x), 0.0))
        hi = float(jnp.maximum(jnp.max(x), 0.0))
        qmin, qmax = config.qmin, config.qmax
        candidates = [hi / qmax if qmax > 0 else 0.0, lo / qmin if qmin < 0 else 0.0]
        scale = max(*candidates, float(cal.MIN_SCALE))
    return max(float(np.asarray(scale).reshape(-1)[0]), float(np.finfo(np.float32).tiny))


def static_act_scales(
    model: nnx.Module, batches: Iterable[Any], *, calibration: str = "absmax"
) -> dict[str, float]:
    """One static activation scale per quant layer input, calibrated over ``batches``.

    The inputs are those of the model's own eval-mode forward (absmax activations: dynamic
    scales). ``calibration="absmax"`` gives ``max|x| / qmax`` over all batches (a running
    max); the other estimators (:func:`estimate_scale`) see the inputs of all batches at
    once. ``learned_step`` activation scales are already static and are returned as they are.
    Float layers and layers with binary (sign) inputs get no scale; a model with none of the
    others returns ``{}`` without running.

    Args:
      model: an MLP or CNN whose quant layers have absmax / learned_step activation quantizers
        (or sign-valued ones: binary, pairs).
      batches: arrays of inputs (or ``(x, y)`` pairs / dicts with an ``"image"`` or ``"x"`` key).
      calibration: one of :data:`CALIBRATIONS`.

    Returns:
      ``{path: scale}`` (Python floats) for every layer of the plan with a uniform input
      quantizer.
    """
    check_choice(calibration, "calibration", CALIBRATIONS)
    steps = [
        step
        for step in plan(model)
        if not is_float_step(step) and not sign_valued(act_spec(step), "act", step.layer)
    ]
    grids = {step.path: input_grid(step) for step in steps}
    if not grids:
        return {}
    graphdef, state = nnx.split(model)  # weights as arguments, not constants XLA would fold
    reduce = calibration == "absmax"
    jitted = jax.jit(lambda state, xb: _record(nnx.merge(graphdef, state), xb, reduce))
    seen: dict[str, list] = {}
    for batch in batches:
        for path, value in jitted(state, _batch_inputs(batch)).items():
            if path in grids:
                seen.setdefault(path, []).append(value)
    if not seen:
        raise ValueError("batches is empty; allowed: at least one batch of inputs")
    scales = {}
    for step in steps:
        grid = grids[step.path]
        if grid.learned_scale is not None:
            scales[step.path] = grid.learned_scale
        elif reduce:
            qmin, qmax = grid.qmin, grid.qmax
            amax = max(float(v) for v in seen[step.path])
            denominator = qmax if qmax > 0 else -qmin
            scales[step.path] = max(amax / denominator, float(np.finfo(np.float32).tiny))
        else:
            x = jnp.concatenate(seen[step.path], axis=0)
            scales[step.path] = estimate_scale(x, act_spec(step).config, calibration)
    return scales


def _record(model: nnx.Module, x: jax.Array, reduce: bool = True) -> dict[str, jax.Array]:
    record: dict[str, jax.Array] = {}
    fake_quant_forward(model, x, None, record=record)
    if not reduce:
        return record
    return {k: jnp.max(jnp.abs(v)) for k, v in record.items()}
