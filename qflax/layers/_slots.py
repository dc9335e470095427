"""Places in a model where a latent quantizer may go."""

from __future__ import annotations

import jax
from flax import nnx

__all__ = ["Latent"]


class Latent(nnx.Module):
    """Where a latent code sits in a model (an autoencoder's bottleneck, the cut of a split
    model): the identity in float. ``quantize_model`` replaces it by a quantized latent layer when
    a rule with a latent recipe matches its path. ``dim``: the channels of one code vector (the
    last axis of the tensor it receives).

    Example:
      >>> import jax.numpy as jnp
      >>> Latent(4)(jnp.ones((2, 3, 3, 4))).shape
      (2, 3, 3, 4)
    """

    def __init__(self, dim: int):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim={dim!r} is not allowed; allowed: a positive integer")
        self.dim = dim

    def __call__(self, z: jax.Array, *, train: bool = False) -> jax.Array:
        if z.shape[-1] != self.dim:
            raise ValueError(
                f"a latent of shape {z.shape} does not match Latent(dim={self.dim}); "
                f"allowed: last axis {self.dim}"
            )
        return z
