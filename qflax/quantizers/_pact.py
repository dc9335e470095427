"""PACT — Choi et al. 2018 (arXiv:1805.06085), eqs. (1)–(3); METHODS.md §2.

Differs from the paper: nothing in the quantizer; the initial clipping level is a config field
(the paper starts at α = 10; ``init_alpha=None`` takes the data maximum instead).

Forward, with one learnable clipping level ``α`` (a scalar per call) and ``n = 2^b − 1`` steps::

    y  = clip(x, 0, α)
    ŷ  = round(y · n / α) · α / n        (round = round-half-to-even)

Backward (straight-through round, explicit masks; ``g`` is the cotangent)::

    ∂L/∂x = g · 1[0 ≤ x < α]
    ∂L/∂α = Σ g · 1[x ≥ α]

so an element exactly at ``x = α`` sends its gradient to ``α``, not to ``x``; an element at
``x = 0`` sends it to ``x``. The α-dependence of the step ``α/n`` is ignored, as in the paper.
The L2 regulariser on α is :func:`pact_l2`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from qflax.numerics import check_bits
from qflax.quantizers._base import sum_to_shape
from qflax.quantizers._family import (
    InputLowering,
    NotExportable,
    QuantizerFamily,
    register_family,
)

__all__ = ["PACTConfig", "pact", "pact_init", "pact_l2"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PACTConfig:
    """Configuration of the PACT activation quantizer (hashable; validated at construction)."""

    # Bit-width b: the output takes 2^b levels {0, α/n, ..., α}, n = 2^b - 1; 1..24.
    bits: int = 4
    # The α that pact_init returns (the paper uses 10); None: the maximum of the data.
    init_alpha: float | None = 10.0

    def __post_init__(self):
        check_bits(self.bits, "bits", 1, 24)
        if self.init_alpha is not None:
            if isinstance(self.init_alpha, bool) or not isinstance(
                self.init_alpha, (int, float, np.floating, np.integer)
            ):
                raise ValueError(
                    f"init_alpha={self.init_alpha!r} is not a number; allowed: a float > 0, None"
                )
            if not float(self.init_alpha) > 0:
                raise ValueError(
                    f"init_alpha={self.init_alpha!r} is not positive; allowed: a float > 0, None"
                )

    @property
    def levels(self) -> int:
        """``n = 2^b − 1``: the number of steps on ``[0, α]``."""
        return 2**self.bits - 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pact(config: PACTConfig, x: jax.Array, alpha: jax.Array) -> jax.Array:
    n = float(config.levels)
    y = jnp.clip(x, 0.0, alpha)
    return jnp.round(y * n / alpha) * alpha / n


def _pact_fwd(config, x, alpha):
    return _pact(config, x, alpha), (x, alpha)


def _pact_bwd(config, residuals, g):
    x, alpha = residuals
    zero = jnp.zeros_like(g)
    dx = jnp.where((x >= 0) & (x < alpha), g, zero)
    dalpha = sum_to_shape(jnp.where(x >= alpha, g, zero), alpha.shape)
    return dx, dalpha


_pact.defvjp(_pact_fwd, _pact_bwd)


def pact_init(x: ArrayLike, config: PACTConfig) -> dict[str, jax.Array]:
    """``{"alpha": α}`` (float32, shape ``()``): ``config.init_alpha``, or ``max(max x, tiny)``."""
    if config.init_alpha is not None:
        return {"alpha": jnp.asarray(config.init_alpha, jnp.float32)}
    top = jnp.max(jnp.asarray(x).astype(jnp.float32))
    return {"alpha": jnp.maximum(top, float(jnp.finfo(jnp.float32).tiny))}


def pact(
    x: ArrayLike,
    params: Mapping[str, ArrayLike],
    config: PACTConfig,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    """Clips ``x`` to ``[0, α]`` and quantizes it uniformly with ``2^b − 1`` steps.

    Args:
      x: a floating array.
      params: ``{"alpha": α}`` with α of shape ``()`` (see :func:`pact_init`), α > 0.
      config: the quantizer's config.
      key: unused (deterministic).

    Returns:
      ``ŷ`` with the shape and dtype of ``x``.

    >>> pact(jnp.array([-1.0, 0.4, 1.0, 3.0]), {"alpha": jnp.asarray(2.0)}, PACTConfig(bits=2))
    Array([0.       , 0.6666667, 1.3333334, 2.       ], dtype=float32)
    """
    del key
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating array, got dtype {x.dtype}")
    if not isinstance(params, Mapping) or set(params) != {"alpha"}:
        got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"params={got!r} is not allowed; allowed: a dict with the key 'alpha'")
    if jnp.shape(params["alpha"]) != ():
        raise ValueError(
            f"params['alpha'] has shape {jnp.shape(params['alpha'])}; allowed: shape () "
            "(one clipping level per tensor)"
        )
    dtype = x.dtype if jnp.finfo(x.dtype).bits >= 32 else jnp.float32
    alpha = jnp.asarray(params["alpha"]).astype(dtype)
    return _pact(config, x.astype(dtype), alpha).astype(x.dtype)


def pact_l2(params: Mapping[str, ArrayLike], weight: float) -> jax.Array:
    """The paper's L2 regulariser on the clipping level: ``weight · Σ α²``."""
    return weight * jnp.sum(jnp.square(jnp.asarray(params["alpha"])))


# ---------------------------------------------------------------------------------- family


class PACTFamily(QuantizerFamily):
    """``"pact"``: :func:`pact` (learned activation clip ``α``, tagged ``"clip"``: the
    optimizer's ``quant.clip_decay`` is its L2 term)."""

    name = "pact"
    config_types = (PACTConfig,)

    def roles(self, spec):
        return ("act",)

    def learnable(self, spec) -> bool:
        return True

    def param_tags(self, spec):
        return {"alpha": ("clip",)}

    def init(self, spec, x):
        return pact_init(x, spec.config)

    def placeholder(self, spec, shape):
        return pact_init(jnp.ones(()), spec.config)

    def apply(self, spec, x, params, *, key=None, stats=None):
        return pact(x, params, spec.config)

    def codes(self, spec, x, params, stats):
        from qflax.quantizers._qarray import quantize_pact

        return quantize_pact(x, params, spec.config)

    def check_int8(self, spec) -> None:
        if spec.config.levels > 127:
            raise NotExportable(
                f"pact with bits={spec.config.bits} (codes 0..{spec.config.levels}): an int8 "
                "operand needs codes <= 127 (bits <= 7)"
            )

    def int8_scale(self, spec, x, params, stats):
        # levels {0, α/n, ..., α}: x̂ = c·α/n up to the last ulp (c·α is rounded before /n)
        alpha = jax.lax.stop_gradient(jnp.asarray(params["alpha"], jnp.float32))
        return alpha / float(spec.config.levels)

    def input_lowering(self, spec, params, stats):
        # levels {0, α/n, ..., α}: codes round(clip(x, 0, α)·n/α)
        n = spec.config.levels
        alpha = float(np.asarray(params["alpha"], np.float32).reshape(()))
        return InputLowering("codes", 0, n, alpha / n)


register_family(PACTFamily())
