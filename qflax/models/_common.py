"""Shared pieces of the reference models: layer-factory protocols and argument checks."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any, Protocol

import jax
from flax import nnx

# BatchNorm settings shared by the convolutional models: PyTorch's momentum 0.1 is Flax's 0.9.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# Hidden-layer nonlinearities of the MLP and CNN (``activation=``). Binary-activation networks
# (BNN and the ProxConnect++ pairs) need ``"hardtanh"``: the sign of a ReLU output is +1
# everywhere (``sign(0) = +1``), so a binarized input after a ReLU carries no information.
ACTIVATIONS = MappingProxyType({"relu": jax.nn.relu, "hardtanh": jax.nn.hard_tanh})


@dataclasses.dataclass(frozen=True)
class LayerStep:
    """One linear layer of a model whose forward is a chain of them, and what follows it.

    A model that is such a chain (MLP, CNN) describes its eval-mode forward as a tuple of these
    (``model.layer_sequence()``), in execution order: ``flatten`` the input to ``(batch, -1)``
    (if set), the layer (``op``: ``"dense"`` or ``"conv"``), ``norm`` (an eval-mode BatchNorm,
    or None), ``activation`` (a name of :data:`ACTIVATIONS`, None after the last layer), then a
    2x2/stride-2 max-pool (if ``pool``). Readers of the chain (integer inference) need no
    knowledge of the model's class.
    """

    path: str  # the layer's module path ("stem", "blocks.0", ...)
    layer: Any  # the dense layer or convolution (a float or quant layer)
    op: str  # "dense" | "conv"
    norm: Any = None
    activation: str | None = None
    pool: bool = False
    flatten: bool = False


class LinearFactory(Protocol):
    """Builds a dense layer; ``nnx.Linear`` is one. Models call it with exactly these arguments."""

    def __call__(
        self, in_features: int, out_features: int, *, use_bias: bool, rngs: nnx.Rngs
    ) -> nnx.Module: ...


class ConvFactory(Protocol):
    """Builds a convolution; ``nnx.Conv`` is one. Models call it with exactly these arguments.

    ``kernel_size`` and ``strides`` are tuples (one entry per spatial axis), ``padding`` is
    ``"SAME"``, ``"VALID"`` or a tuple of ``(low, high)`` pairs, as ``nnx.Conv`` takes them.
    """

    def __call__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: tuple[int, ...],
        *,
        strides: tuple[int, ...],
        padding: Any,
        use_bias: bool,
        rngs: nnx.Rngs,
    ) -> nnx.Module: ...


class EmbedFactory(Protocol):
    """Builds a token embedding; ``nnx.Embed`` is one."""

    def __call__(self, num_embeddings: int, features: int, *, rngs: nnx.Rngs) -> nnx.Module: ...


def check_positive_int(value: Any, field: str) -> int:
    """Returns ``value`` as an int, or raises ValueError naming the field and what is allowed."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field}={value!r} is not allowed; allowed: integers >= 1")
    return int(value)


def check_shape(value: Any, field: str, ndim: int | None = None) -> tuple[int, ...]:
    """Returns ``value`` as a tuple of positive ints (``ndim`` of them when given), else raises."""
    allowed = f"a tuple of {ndim} positive integers" if ndim else "a tuple of positive integers"
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ValueError(f"{field}={value!r} is not allowed; allowed: {allowed}")
    shape = tuple(value)
    ok = all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
    if not ok or not shape or (ndim is not None and len(shape) != ndim):
        raise ValueError(f"{field}={value!r} is not allowed; allowed: {allowed}")
    return shape


def check_image_shape(value: Any) -> tuple[int, int, int]:
    """Checks a per-example image shape ``(height, width, channels)`` (channels last)."""
    height, width, channels = check_shape(value, "input_shape", ndim=3)
    return height, width, channels


def check_input(x: Any, expected: tuple[int, ...], model: str) -> None:
    """Raises ValueError at trace time when ``x.shape[1:]`` is not the model's input shape."""
    if tuple(x.shape[1:]) != tuple(expected):
        raise ValueError(
            f"{model} got input of shape {tuple(x.shape)}; allowed: (batch, *{tuple(expected)})"
        )


def scaled_channels(base: int, width: float) -> int:
    """``base * width`` rounded to an int, at least 1 (the width multiplier of a model)."""
    return max(1, int(round(base * width)))


def check_width(width: Any) -> float:
    """Returns a positive finite width multiplier, else raises ValueError naming it."""
    if isinstance(width, bool) or not isinstance(width, (int, float)):
        raise ValueError(f"width={width!r} is not allowed; allowed: a number > 0")
    if not (math.isfinite(width) and width > 0):
        raise ValueError(f"width={width!r} is not allowed; allowed: a number > 0")
    return float(width)


def check_activation(value: Any) -> str:
    """Returns ``value`` if it names one of :data:`ACTIVATIONS`, else raises ValueError."""
    if not isinstance(value, str) or value not in ACTIVATIONS:
        raise ValueError(
            f"activation={value!r} is not allowed; allowed: {', '.join(map(repr, ACTIVATIONS))}"
        )
    return value
