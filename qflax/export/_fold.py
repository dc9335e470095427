"""BatchNorm folding — Jacob et al. 2018 (CVPR), Sec. 3.2: ``w_f = γ·w/√(σ²+ε)``,
``b_f = β − γ·μ/√(σ²+ε)`` (METHODS.md §1); here with the layer's own bias ``b`` folded too:
``b_f = β + γ·(b − μ)/√(σ²+ε)``. Differs: eval mode only (running statistics); the paper's
training-time folding (with batch statistics and a correction) is not implemented.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.typing import ArrayLike

from qflax.layers import QuantConv, QuantEinsum, QuantLinear

__all__ = ["Identity", "fold_batchnorm", "fold_model_batchnorm", "identity_variance"]

_QUANT_TYPES = (QuantLinear, QuantConv, QuantEinsum)
_NUMBERED = re.compile(r"^conv(\d+)$")


def fold_batchnorm(
    kernel: ArrayLike,
    bias: ArrayLike | None,
    bn_scale: ArrayLike | None,
    bn_bias: ArrayLike | None,
    mean: ArrayLike,
    var: ArrayLike,
    eps: float,
) -> tuple[jax.Array, jax.Array]:
    """Folds an eval-mode BatchNorm into the preceding linear layer (output channels last).

    With ``m = γ / √(σ² + ε)`` per output channel (the kernel's last axis, as in ``nnx.Linear``
    ``(in, out)`` and ``nnx.Conv`` ``(..., in, out)`` kernels)::

        w_f = w · m                 b_f = β + (b − μ) · m      (b = 0 when there is no bias)

    so that ``BN(x·w + b) = x·w_f + b_f`` (``γ = 1`` / ``β = 0`` when None).

    Returns:
      ``(w_f, b_f)`` in float32.
    """
    kernel = jnp.asarray(kernel, jnp.float32)
    channels = kernel.shape[-1]
    mean = jnp.asarray(mean, jnp.float32)
    var = jnp.asarray(var, jnp.float32)
    gamma = jnp.ones((channels,), jnp.float32) if bn_scale is None else jnp.asarray(bn_scale)
    beta = jnp.zeros((channels,), jnp.float32) if bn_bias is None else jnp.asarray(bn_bias)
    b = jnp.zeros((channels,), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    for name, value in (("mean", mean), ("var", var), ("bn_scale", gamma), ("bn_bias", beta)):
        if value.shape != (channels,):
            raise ValueError(
                f"{name} has shape {value.shape}; allowed: ({channels},), the kernel's output "
                "channels (last axis)"
            )
    m = gamma.astype(jnp.float32) * lax.rsqrt(var + jnp.float32(eps))
    return kernel * m, beta.astype(jnp.float32) + (b - mean) * m


def identity_variance(eps: float) -> np.float32:
    """The largest float32 ``v ≤ 1`` with ``float32(v + ε) == 1``: a BN with ``γ = 1``, ``β = 0``,
    ``μ = 0`` and this variance is the identity (``rsqrt(1) = 1``)."""
    one, e = np.float32(1.0), np.float32(eps)
    v = np.float32(one - e)
    while np.float32(v + e) < one:
        v = np.nextafter(v, np.float32(2.0))
    while np.float32(v + e) > one:
        v = np.nextafter(v, np.float32(0.0))
    return v


class Identity(nnx.Module):
    """Stands in for a removed BatchNorm: returns its input (any keyword arguments ignored)."""

    def __call__(self, x: jax.Array, **kwargs: Any) -> jax.Array:
        del kwargs
        return x


def _linear_of(module: Any) -> nnx.Module | None:
    """The ``nnx.Linear`` / ``nnx.Conv`` that holds the kernel (``.inner`` of a quant layer)."""
    if isinstance(module, _QUANT_TYPES):
        module = module.inner
    if isinstance(module, (nnx.Linear, nnx.Conv)):
        return module
    return None


def _norm_name(name: str) -> str | None:
    """The numbered BatchNorm paired with a layer attribute: ``convN -> normN`` (or None)."""
    match = _NUMBERED.match(name)
    return f"norm{match.group(1)}" if match else None


def fold_model_batchnorm(model: nnx.Module, *, remove: bool = False) -> nnx.Module:
    """A copy of ``model`` with every eval-mode BatchNorm folded into the layer before it.

    Pairs are found by attribute name within one module: ``X`` followed by ``X_norm`` (``stem``
    and ``stem_norm``, ``conv2`` and ``conv2_norm``, ``shortcut`` and ``shortcut_norm``) or
    ``convN`` followed by ``normN`` (ResNet blocks), where ``X`` is an ``nnx.Linear`` /
    ``nnx.Conv`` or a quant layer wrapping one. The layer gets ``w_f`` and a bias ``b_f``
    (created when it had none); the BatchNorm becomes the identity: ``γ = 1``, ``β = 0``,
    ``μ = 0``, ``σ² = identity_variance(ε)`` (so ``σ² + ε == 1`` exactly in float32), or, with
    ``remove=True``, an :class:`Identity` module.

    The folded model equals the original in eval mode (``train=False``) up to float rounding.
    In train mode a kept (identity) BatchNorm would normalise with batch statistics again, so
    use folded models for evaluation and export only. A quant layer's weight quantizer now sees
    ``w_f``: per-output-channel symmetric scales are equivariant to the positive per-channel
    factor ``γ/√(σ²+ε)`` (the codes are unchanged up to float rounding at ties; a negative ``γ``
    negates them), per-tensor scales are not (the codes change).

    Returns:
      The folded copy (``model`` is unchanged).
    """
    model = nnx.clone(model)
    parents = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)]
    for parent in parents:
        names = list(vars(parent))
        for name in names:
            layer = _linear_of(getattr(parent, name, None))
            if layer is None:
                continue
            norm_name = _norm_name(name)
            candidates = [f"{name}_norm"] + ([norm_name] if norm_name else [])
            norm = None
            for candidate in candidates:
                value = getattr(parent, candidate, None)
                if isinstance(value, nnx.BatchNorm):
                    norm, norm_name = value, candidate
                    break
            if norm is None:
                continue
            if tuple(np.atleast_1d(norm.axis).tolist()) != (-1,):
                raise ValueError(f"{norm_name}.axis={norm.axis!r} is not allowed; allowed: -1")
            w_f, b_f = fold_batchnorm(
                layer.kernel[...],
                None if layer.bias is None else layer.bias[...],
                None if norm.scale is None else norm.scale[...],
                None if norm.bias is None else norm.bias[...],
                norm.mean[...],
                norm.var[...],
                norm.epsilon,
            )
            layer.kernel[...] = w_f.astype(layer.kernel[...].dtype)
            if layer.bias is None:
                layer.bias = nnx.Param(b_f)
                layer.use_bias = True
            else:
                layer.bias[...] = b_f.astype(layer.bias[...].dtype)
            if remove:
                setattr(parent, norm_name, Identity())
                continue
            channels = norm.mean[...].shape[0]
            if norm.scale is not None:
                norm.scale[...] = jnp.ones((channels,), norm.scale[...].dtype)
            if norm.bias is not None:
                norm.bias[...] = jnp.zeros((channels,), norm.bias[...].dtype)
            norm.mean[...] = jnp.zeros((channels,), norm.mean[...].dtype)
            norm.var[...] = jnp.full((channels,), identity_variance(norm.epsilon), jnp.float32)
    return model
