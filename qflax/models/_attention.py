"""Multi-head self-attention and pre-norm transformer blocks built from a ``linear`` factory.

Attention is "Attention Is All You Need" (Vaswani et al. 2017), Eq. 1 (scaled dot-product) with
separate q/k/v/out projections so each can be quantized on its own; the blocks are pre-norm
(LayerNorm before attention and before the MLP, as in ViT, Dosovitskiy et al. 2021, Eq. 2-3).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from qflax.models._common import LinearFactory, check_positive_int

LAYER_NORM_EPSILON = 1e-6


class SelfAttention(nnx.Module):
    """Multi-head self-attention whose projections ``query``/``key``/``value``/``out`` are built
    by ``linear`` (each ``dim -> dim``, with bias).

    The score and value products go through ``einsum`` (``jnp.einsum`` unless a quantized einsum
    is given): ``scores = einsum("bqhd,bkhd->bhqk", q, k) / sqrt(head_dim)``, masked entries get
    the dtype's most negative value before the softmax (in float32), and
    ``y = out(einsum("bhqk,bkhd->bqhd", softmax(scores), v))``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        linear: LinearFactory = nnx.Linear,
        einsum: Callable[..., jax.Array] = jnp.einsum,
        rngs: nnx.Rngs,
    ):
        """Builds the four projections.

        Args:
          dim: model width (input and output features).
          num_heads: number of heads; must divide ``dim``.
          linear: dense-layer factory for the projections.
          einsum: the function computing the two attention products.
          rngs: random streams for initialisation.
        """
        dim = check_positive_int(dim, "dim")
        num_heads = check_positive_int(num_heads, "num_heads")
        if dim % num_heads:
            raise ValueError(
                f"num_heads={num_heads} does not divide dim={dim}; allowed: a divisor of dim"
            )
        self.dim = dim
        self.num_heads = num_heads
        self.einsum = einsum
        self.query = linear(dim, dim, use_bias=True, rngs=rngs)
        self.key = linear(dim, dim, use_bias=True, rngs=rngs)
        self.value = linear(dim, dim, use_bias=True, rngs=rngs)
        self.out = linear(dim, dim, use_bias=True, rngs=rngs)

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Attends over the sequence axis.

        Args:
          x: ``(batch, length, dim)``.
          mask: optional boolean array broadcastable to ``(batch, heads, length, length)``;
            ``True`` where query position ``q`` may attend to key position ``k``.

        Returns:
          ``(batch, length, dim)``.
        """
        batch, length, _ = x.shape
        head_dim = self.dim // self.num_heads

        def split_heads(y: jax.Array) -> jax.Array:
            return y.reshape(batch, length, self.num_heads, head_dim)

        q = split_heads(self.query(x))
        k = split_heads(self.key(x))
        v = split_heads(self.value(x))
        scores = self.einsum("bqhd,bkhd->bhqk", q, k) * (head_dim**-0.5)
        scores = scores.astype(jnp.float32)
        if mask is not None:
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        y = self.einsum("bhqk,bkhd->bqhd", weights, v)
        return self.out(y.reshape(batch, length, self.dim))


class FeedForward(nnx.Module):
    """Transformer MLP ``fc2(gelu(fc1(x)))``; ``fc1: dim -> hidden``, ``fc2: hidden -> dim``."""

    def __init__(
        self, dim: int, hidden: int, *, linear: LinearFactory = nnx.Linear, rngs: nnx.Rngs
    ):
        self.fc1 = linear(dim, hidden, use_bias=True, rngs=rngs)
        self.fc2 = linear(hidden, dim, use_bias=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class TransformerBlock(nnx.Module):
    """Pre-norm block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        *,
        linear: LinearFactory = nnx.Linear,
        rngs: nnx.Rngs,
    ):
        mlp_dim = check_positive_int(mlp_dim, "mlp_dim")
        self.norm1 = nnx.LayerNorm(dim, epsilon=LAYER_NORM_EPSILON, rngs=rngs)
        self.attn = SelfAttention(dim, num_heads, linear=linear, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=LAYER_NORM_EPSILON, rngs=rngs)
        self.mlp = FeedForward(dim, mlp_dim, linear=linear, rngs=rngs)

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))
