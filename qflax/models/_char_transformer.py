"""Character-level causal transformer language model (GPT-style decoder, Radford et al. 2018):
token embedding + learned positions, pre-norm blocks with causally masked self-attention, final
LayerNorm, linear head to the vocabulary. Differs: small defaults, untied head, no dropout.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from qflax.models._attention import LAYER_NORM_EPSILON, TransformerBlock
from qflax.models._common import (
    ConvFactory,
    EmbedFactory,
    LinearFactory,
    check_positive_int,
    check_shape,
)

POSITION_INIT_STDDEV = 0.02


def _resolve(value: int | None, alias: int | None, field: str, alias_field: str) -> int:
    """One of two spellings of the same size (e.g. ``vocab_size`` / ``num_classes``)."""
    if value is None and alias is None:
        raise ValueError(
            f"{field}=None is not allowed; allowed: a positive integer ({field} or {alias_field})"
        )
    if value is not None and alias is not None and value != alias:
        raise ValueError(
            f"{field}={value!r} disagrees with {alias_field}={alias!r}; allowed: equal values"
        )
    return check_positive_int(value if value is not None else alias, field)


class CharTransformer(nnx.Module):
    """Causal transformer LM: int tokens ``(batch, seq)`` -> logits ``(batch, seq, vocab_size)``.

    ``vocab_size`` may be given as ``num_classes`` and ``seq_len`` as ``input_shape=(seq_len,)``,
    so ``build_model`` treats it like the classifiers. Position ``t``'s logits depend only on
    tokens ``0..t``. Sequences up to ``seq_len`` long are accepted.

    Module paths: ``stem`` (token embedding, made by ``embed``), ``pos_embed`` (a Param),
    ``blocks/i/{norm1,attn/{query,key,value,out},norm2,mlp/{fc1,fc2}}``, ``norm``, ``head``.

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> model = CharTransformer(vocab_size=20, seq_len=8, dim=16, depth=1, num_heads=2,
      ...                         rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 8), jnp.int32)).shape
      (2, 8, 20)
    """

    def __init__(
        self,
        vocab_size: int | None = None,
        seq_len: int | None = None,
        *,
        num_classes: int | None = None,
        input_shape: Sequence[int] | None = None,
        dim: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        mlp_dim: int | None = None,
        linear: LinearFactory = nnx.Linear,
        conv: ConvFactory = nnx.Conv,
        embed: EmbedFactory = nnx.Embed,
        rngs: nnx.Rngs,
    ):
        """Builds the layers.

        Args:
          vocab_size: number of token ids (also the number of logits); alias ``num_classes``.
          seq_len: longest sequence (number of learned positions); alias ``input_shape=(seq_len,)``.
          num_classes: same as ``vocab_size``.
          input_shape: ``(seq_len,)``.
          dim: token width.
          depth: number of transformer blocks.
          num_heads: attention heads (divides ``dim``).
          mlp_dim: hidden width of each block's MLP (default ``4 * dim``).
          linear: dense-layer factory (attention projections, MLPs, head).
          conv: unused (accepted so every model takes the same factories).
          embed: token-embedding factory, called as ``embed(vocab_size, dim, rngs=rngs)``.
          rngs: random streams for initialisation.
        """
        del conv  # no convolutions
        if input_shape is not None:
            (seq_alias,) = check_shape(input_shape, "input_shape", ndim=1)
        else:
            seq_alias = None
        self.vocab_size = _resolve(vocab_size, num_classes, "vocab_size", "num_classes")
        self.seq_len = _resolve(seq_len, seq_alias, "seq_len", "input_shape[0]")
        dim = check_positive_int(dim, "dim")
        depth = check_positive_int(depth, "depth")
        mlp_dim = 4 * dim if mlp_dim is None else check_positive_int(mlp_dim, "mlp_dim")
        self.stem = embed(self.vocab_size, dim, rngs=rngs)
        self.pos_embed = nnx.Param(
            POSITION_INIT_STDDEV * jax.random.normal(rngs.params(), (self.seq_len, dim))
        )
        self.blocks = nnx.List(
            [
                TransformerBlock(dim, num_heads, mlp_dim, linear=linear, rngs=rngs)
                for _ in range(depth)
            ]
        )
        self.norm = nnx.LayerNorm(dim, epsilon=LAYER_NORM_EPSILON, rngs=rngs)
        self.head = linear(dim, self.vocab_size, use_bias=True, rngs=rngs)

    def __call__(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
        """Maps int tokens ``(batch, seq)`` (``seq <= seq_len``) to logits
        ``(batch, seq, vocab_size)``; ``train`` is unused (no dropout)."""
        del train
        if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= self.seq_len:
            raise ValueError(
                f"CharTransformer got tokens of shape {tuple(tokens.shape)}; "
                f"allowed: (batch, seq) with 1 <= seq <= {self.seq_len}"
            )
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"CharTransformer got tokens of dtype {tokens.dtype}; allowed: integer dtypes"
            )
        length = tokens.shape[1]
        x = self.stem(tokens) + self.pos_embed[:length]
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
        for block in self.blocks:
            x = block(x, mask=causal)
        return self.head(self.norm(x))
