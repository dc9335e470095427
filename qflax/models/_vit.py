"""Vision Transformer from "An Image is Worth 16x16 Words" (Dosovitskiy et al. 2021), Eq. 1-4:
patch embedding, class token, learned position embeddings, pre-norm blocks, head on the pooled
token. Differs: small defaults for 32x32 inputs, optional mean pooling, a linear head (no
pre-logits layer), no dropout.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from qflax.models._attention import LAYER_NORM_EPSILON, TransformerBlock
from qflax.models._common import (
    ConvFactory,
    LinearFactory,
    check_image_shape,
    check_input,
    check_positive_int,
)
from qflax.numerics import check_choice

POOLINGS = ("cls", "mean")
POSITION_INIT_STDDEV = 0.02


class ViT(nnx.Module):
    """Small vision transformer.

    ``stem`` is a ``patch x patch`` convolution with stride ``patch`` (the patch embedding); with
    ``pooling="cls"`` a learned ``cls_token`` is prepended and its final state classified, with
    ``"mean"`` the patch states are averaged. ``pos_embed`` is learned (``N(0, 0.02^2)``).

    Module paths: ``stem``, ``blocks/i/{norm1,attn/{query,key,value,out},norm2,mlp/{fc1,fc2}}``,
    ``norm`` (final LayerNorm), ``head``.

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> model = ViT((8, 8, 3), 10, patch=4, dim=16, depth=1, num_heads=2, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 8, 8, 3))).shape
      (2, 10)
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (32, 32, 3),
        num_classes: int = 10,
        *,
        patch: int = 4,
        dim: int = 128,
        depth: int = 6,
        num_heads: int = 4,
        mlp_dim: int | None = None,
        pooling: str = "cls",
        linear: LinearFactory = nnx.Linear,
        conv: ConvFactory = nnx.Conv,
        rngs: nnx.Rngs,
    ):
        """Builds the layers.

        Args:
          input_shape: ``(height, width, channels)``; height and width divisible by ``patch``.
          num_classes: number of output logits.
          patch: side of the square patches.
          dim: token width.
          depth: number of transformer blocks.
          num_heads: attention heads (divides ``dim``).
          mlp_dim: hidden width of each block's MLP (default ``4 * dim``).
          pooling: ``"cls"`` (class token) or ``"mean"`` (average of patch tokens).
          linear: dense-layer factory (attention projections, MLPs, head).
          conv: convolution factory (patch embedding).
          rngs: random streams for initialisation.
        """
        self.input_shape = check_image_shape(input_shape)
        num_classes = check_positive_int(num_classes, "num_classes")
        patch = check_positive_int(patch, "patch")
        dim = check_positive_int(dim, "dim")
        depth = check_positive_int(depth, "depth")
        mlp_dim = 4 * dim if mlp_dim is None else check_positive_int(mlp_dim, "mlp_dim")
        self.pooling = check_choice(pooling, "pooling", POOLINGS)
        height, width, channels = self.input_shape
        if height % patch or width % patch:
            raise ValueError(
                f"patch={patch} does not divide the image size {height}x{width}; "
                "allowed: a common divisor of height and width"
            )
        num_tokens = (height // patch) * (width // patch) + (pooling == "cls")
        self.stem = conv(
            channels,
            dim,
            (patch, patch),
            strides=(patch, patch),
            padding="VALID",
            use_bias=True,
            rngs=rngs,
        )
        self.cls_token = nnx.Param(jnp.zeros((1, 1, dim))) if pooling == "cls" else None
        self.pos_embed = nnx.Param(
            POSITION_INIT_STDDEV * jax.random.normal(rngs.params(), (1, num_tokens, dim))
        )
        self.blocks = nnx.List(
            [
                TransformerBlock(dim, num_heads, mlp_dim, linear=linear, rngs=rngs)
                for _ in range(depth)
            ]
        )
        self.norm = nnx.LayerNorm(dim, epsilon=LAYER_NORM_EPSILON, rngs=rngs)
        self.head = linear(dim, num_classes, use_bias=True, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Maps ``(batch, *input_shape)`` images to logits ``(batch, num_classes)``; ``train`` is
        unused (no dropout or batch statistics)."""
        del train
        check_input(x, self.input_shape, "ViT")
        x = self.stem(x)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        if self.cls_token is not None:
            cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls.astype(x.dtype), x], axis=1)
        x = x + self.pos_embed[...]
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        pooled = x[:, 0] if self.cls_token is not None else jnp.mean(x, axis=1)
        return self.head(pooled)
