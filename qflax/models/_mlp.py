"""Multi-layer perceptron on flattened inputs: ``stem`` -> ReLU -> ``blocks`` -> ``head``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from flax import nnx

from qflax.models._common import (
    ACTIVATIONS,
    ConvFactory,
    LayerStep,
    LinearFactory,
    check_activation,
    check_input,
    check_positive_int,
    check_shape,
)


class MLP(nnx.Module):
    """Fully connected classifier with ReLU (or hardtanh) between layers.

    Module paths: ``stem`` (``prod(input_shape) -> hidden[0]``), ``blocks/i``
    (``hidden[i] -> hidden[i+1]``), ``head`` (``hidden[-1] -> num_classes``); all with bias.

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> model = MLP((8, 8, 1), 10, hidden=(16,), rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 8, 8, 1))).shape
      (2, 10)
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (28, 28, 1),
        num_classes: int = 10,
        *,
        hidden: Sequence[int] = (256, 256),
        activation: str = "relu",
        linear: LinearFactory = nnx.Linear,
        conv: ConvFactory = nnx.Conv,
        rngs: nnx.Rngs,
    ):
        """Builds the layers.

        Args:
          input_shape: per-example input shape (any rank; flattened).
          num_classes: number of output logits.
          hidden: widths of the hidden layers; at least one (the first is ``stem``).
          activation: hidden nonlinearity, ``"relu"`` or ``"hardtanh"`` (binary activations).
          linear: dense-layer factory.
          conv: unused (accepted so every model takes the same factories).
          rngs: random streams for initialisation.
        """
        del conv  # an MLP has no convolutions
        self.input_shape = check_shape(input_shape, "input_shape")
        self.activation = check_activation(activation)
        num_classes = check_positive_int(num_classes, "num_classes")
        hidden = tuple(hidden)
        if not hidden:
            raise ValueError("hidden=() is not allowed; allowed: one or more positive integers")
        widths = [check_positive_int(h, "hidden") for h in hidden]
        self.stem = linear(math.prod(self.input_shape), widths[0], use_bias=True, rngs=rngs)
        self.blocks = nnx.List(
            [
                linear(a, b, use_bias=True, rngs=rngs)
                for a, b in zip(widths[:-1], widths[1:], strict=True)
            ]
        )
        self.head = linear(widths[-1], num_classes, use_bias=True, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Maps ``(batch, *input_shape)`` to logits ``(batch, num_classes)`` (``train`` unused)."""
        del train  # no batch statistics or dropout
        check_input(x, self.input_shape, "MLP")
        act = ACTIVATIONS[self.activation]
        x = act(self.stem(x.reshape(x.shape[0], -1)))
        for layer in self.blocks:
            x = act(layer(x))
        return self.head(x)

    def layer_sequence(self) -> tuple[LayerStep, ...]:
        """The forward as a chain of linear layers (:class:`~qflax.models.LayerStep`): the
        input flattened before ``stem``, the activation after every layer but ``head``."""
        layers = [("stem", self.stem)] + [(f"blocks.{i}", b) for i, b in enumerate(self.blocks)]
        steps = tuple(
            LayerStep(path, layer, "dense", activation=self.activation, flatten=i == 0)
            for i, (path, layer) in enumerate(layers)
        )
        return (*steps, LayerStep("head", self.head, "dense"))
