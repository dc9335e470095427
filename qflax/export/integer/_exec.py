"""Running an :class:`~qflax.export.IntegerProgram`: the input's codes (:func:`quantize_input`),
each layer's product (integer, XNOR/popcount or float32) and its :class:`Epilogue`
(:func:`apply_epilogue`), :func:`integer_forward`. Depends on the program types and the
arithmetic only."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from qflax.export.integer._arith import (
    CONV_DIMS,
    code_dtype,
    im2col,
    max_pool,
    max_pool_elementwise,
    requantize,
    threshold_bits,
    xnor_dot,
)
from qflax.export.integer._program import (
    BinaryLayer,
    Epilogue,
    FloatLayer,
    IntegerLayer,
    IntegerProgram,
)

__all__ = ["apply_epilogue", "integer_forward", "quantize_input"]

_ACT_FNS = {"relu": jax.nn.relu, "hardtanh": jax.nn.hard_tanh}


def quantize_input(program: IntegerProgram, x: jax.Array) -> jax.Array:
    """The input codes ``clip(round(x / s_in), qmin, qmax)`` (the uniform quantizer's codes), or
    the input signs ``x ≥ 0`` as uint8 bits when the first layer is binary."""
    x = jnp.asarray(x, jnp.float32)
    if program.input_bits:
        return (x >= 0).astype(jnp.uint8)
    if program.input_scale is None:
        raise ValueError(
            "the program's first layer is float, so its input is not quantized; allowed: a "
            "program whose first layer is quantized"
        )
    codes = jnp.round(x / jnp.float32(program.input_scale))
    codes = jnp.clip(codes, program.input_min, program.input_max)
    return codes.astype(code_dtype(program.input_min, program.input_max))


def apply_epilogue(epilogue: Epilogue, acc: jax.Array) -> jax.Array:
    """What follows a layer's product ``acc``: requantization, thresholds or float32 ops, as
    :class:`Epilogue` describes them."""
    e = epilogue
    if e.threshold is not None:
        return threshold_bits(acc, e.direction, e.threshold, e.pool)
    if e.multiplier is not None:
        return _requantize_epilogue(e, acc)
    y = acc if e.scale is None else acc.astype(jnp.float32) * e.scale
    if e.bias is not None:
        y = y + e.bias
    if e.norm_mean is not None:  # flax's eval-mode BatchNorm, operation for operation
        mul = lax.rsqrt(e.norm_var + e.norm_epsilon) * e.norm_scale
        y = (y - e.norm_mean) * mul + e.norm_bias
    if e.activation is not None:
        y = _ACT_FNS[e.activation](y)
    if e.pool:  # before signs: one elementwise pass with them
        y = max_pool_elementwise(y) if e.output == "bits" else max_pool(y)
    if e.output == "bits":
        return (y >= 0).astype(jnp.uint8)
    if e.output == "float":
        return y
    codes = jnp.clip(jnp.round(y / e.out_scale), e.out_min, e.out_max)
    return codes.astype(e.out_dtype)


def _requantize_epilogue(e: Epilogue, acc: jax.Array) -> jax.Array:
    if e.negate is not None:
        acc = jnp.where(e.negate, -acc, acc)
    if e.acc_shift:
        acc = lax.shift_left(acc, jnp.int32(e.acc_shift))
    out = requantize(acc + e.acc_bias, e.multiplier, e.shift)
    out = jnp.clip(out, e.out_min, e.out_max)
    if e.activation == "relu" and e.output == "codes":
        out = jnp.maximum(out, 0)
    out = out.astype(e.out_dtype)
    return max_pool(out) if e.pool else out


def _apply_op(
    layer: IntegerLayer | FloatLayer, h: jax.Array, kernel: jax.Array | None = None, **kwargs: Any
) -> jax.Array:
    kernel = layer.kernel if kernel is None else kernel
    if kernel.dtype != h.dtype:  # equal operand dtypes (int16 codes or kernel: widen the other)
        # the wider of the two (explicit: strict promotion has no int8 → int16 path)
        dtype = max(kernel.dtype, h.dtype, key=lambda d: jnp.dtype(d).itemsize)
        kernel, h = kernel.astype(dtype), h.astype(dtype)
    if layer.op == "dense":
        if h.shape[0] == 1 and jnp.issubdtype(h.dtype, jnp.integer):
            # XLA:CPU runs an integer matrix-vector product (one row) as int32 × int32, widening
            # the whole kernel at every call; two rows take its int8 matrix kernel
            two = jnp.concatenate([h, jnp.zeros_like(h)])
            return lax.dot_general(two, kernel, (((h.ndim - 1,), (0,)), ((), ())), **kwargs)[:1]
        return lax.dot_general(h, kernel, (((h.ndim - 1,), (0,)), ((), ())), **kwargs)
    if jnp.issubdtype(h.dtype, jnp.integer):
        # XLA:CPU: the integer convolution as one integer matrix product of its patches
        # (im2col, the kernel's (kh, kw, c_in) order; exact: int32 accumulation either way)
        patches = im2col(h, kernel.shape[:2], layer.strides, layer.padding)
        rows = patches.reshape(-1, patches.shape[-1])
        flat = kernel.reshape(rows.shape[-1], kernel.shape[-1])
        acc = lax.dot_general(rows, flat, (((1,), (0,)), ((), ())), **kwargs)
        return acc.reshape(*patches.shape[:-1], kernel.shape[-1])
    return lax.conv_general_dilated(
        h, kernel, layer.strides, layer.padding, dimension_numbers=CONV_DIMS, **kwargs
    )


def _accumulate(layer: IntegerLayer, h: jax.Array) -> jax.Array:
    """The int32 accumulator: one integer product, for pow2 weights the shifted sum of one
    ternary product per exponent ``Σ_j op(h, mask_j) << shifts[j]``, for dead-zone / zero-point
    weights the weighted sum of the planes' products (and ``input_sum·Σx``)."""
    if layer.coefficients:
        acc = None
        for j, c in enumerate(layer.coefficients):
            part = _apply_op(layer, h, layer.kernel[j], preferred_element_type=jnp.int32)
            if c != 1:
                part = part * jnp.int32(c)
            acc = part if acc is None else acc + part
        if layer.input_sum is not None:  # Σ x over each output's window: one product with ones
            ones = jnp.ones((*layer.kernel.shape[1:-1], 1), jnp.int8)
            total = _apply_op(layer, h, ones, preferred_element_type=jnp.int32)
            acc = acc + total * layer.input_sum
        return acc
    if not layer.shifts:
        return _apply_op(layer, h, preferred_element_type=jnp.int32)
    acc = None
    for j, s in enumerate(layer.shifts):
        part = _apply_op(layer, h, layer.kernel[j], preferred_element_type=jnp.int32)
        if s:
            part = lax.shift_left(part, jnp.int32(s))
        acc = part if acc is None else acc + part
    return acc


def _product(layer: IntegerLayer | BinaryLayer | FloatLayer, h: jax.Array) -> jax.Array:
    if isinstance(layer, IntegerLayer):
        return _accumulate(layer, h)
    if isinstance(layer, BinaryLayer):
        return xnor_dot(h, layer.kernel, layer.kernel_shape, layer.op, layer.strides, layer.padding)
    return _apply_op(layer, h)


def integer_forward(program: IntegerProgram, x: jax.Array) -> jax.Array:
    """Runs an :class:`IntegerProgram`: the logits of ``x``.

    Quantized layers run ``lax.dot_general`` on integer codes with
    ``preferred_element_type=jnp.int32`` (convolutions on their im2col patches, which XLA:CPU
    runs faster than an integer ``conv_general_dilated``; one example on two rows, the second
    zeros, which XLA:CPU runs as an int8 product where it widens a one-row product to int32;
    pow2 layers: one product per exponent, combined by left shifts), add the int32 bias,
    requantize with :func:`requantize` (integer multiply and rounding shift), clip to the next
    layer's codes, apply ReLU as ``max(q, 0)`` (hardtanh: the clip) and max-pool the codes.
    Binary layers run XNOR/popcount on packed bits and integer thresholds. Float layers run in
    float32. The float input is quantized once (:func:`quantize_input`) when the first layer is
    quantized or binary.

    Returns:
      int32 logits (real value ``program.logit_scale·logits``) when the last layer is an
      :class:`IntegerLayer`; float32 logits otherwise.
    """
    if program.input_bits or program.input_scale is not None:
        h = quantize_input(program, x)
    else:
        h = jnp.asarray(x, jnp.float32)
    for layer in program.layers:
        if layer.flatten:
            h = h.reshape(h.shape[0], -1)
        h = apply_epilogue(layer.epilogue, _product(layer, h))
    return h
