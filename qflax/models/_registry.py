"""Model registry: names used by configs and the CLI -> model classes."""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

from flax import nnx

from qflax.models._char_transformer import CharTransformer
from qflax.models._cnn import CNN
from qflax.models._codec import ConvAutoencoder, SplitCNN
from qflax.models._mlp import MLP
from qflax.models._resnet import ResNet18, ResNet20
from qflax.models._vit import ViT

# Read-only mapping of model name -> class; every class takes input_shape, num_classes, rngs,
# and the linear/conv factories as keywords.
MODELS: MappingProxyType[str, type[nnx.Module]] = MappingProxyType(
    {
        "mlp": MLP,
        "cnn": CNN,
        "resnet20": ResNet20,
        "resnet18": ResNet18,
        "vit": ViT,
        "char_transformer": CharTransformer,
        "conv_autoencoder": ConvAutoencoder,
        "split_cnn": SplitCNN,
    }
)


def build_model(
    name: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    rngs: nnx.Rngs,
    **kwargs: Any,
) -> nnx.Module:
    """Builds the model registered under ``name``.

    Args:
      name: one of ``MODELS`` ("mlp", "cnn", "resnet20", "resnet18", "vit", "char_transformer",
        "conv_autoencoder", "split_cnn").
      input_shape: per-example input shape, channels last (``(seq_len,)`` for the char LM).
      num_classes: number of logits (the vocabulary size for the char LM).
      rngs: random streams for initialisation.
      **kwargs: model knobs and factories (``linear=``, ``conv=``, ``width=``, ...).

    Returns:
      The model.

    Raises:
      ValueError: ``name`` is not registered, or a knob is invalid.

    Example:
      >>> from flax import nnx
      >>> model = build_model("mlp", input_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0))
      >>> type(model).__name__
      'MLP'
    """
    if name not in MODELS:
        raise ValueError(f"model={name!r} is not known; allowed: {', '.join(map(repr, MODELS))}")
    return MODELS[name](input_shape=input_shape, num_classes=num_classes, rngs=rngs, **kwargs)
