"""Small convolutional classifier for 28x28 (MNIST) down to 8x8 (scikit-learn digits) inputs."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from qflax.models._common import (
    ACTIVATIONS,
    BN_EPSILON,
    BN_MOMENTUM,
    ConvFactory,
    LayerStep,
    LinearFactory,
    check_activation,
    check_image_shape,
    check_input,
    check_positive_int,
)

# A 2x2 max-pool is applied only while both spatial sides are at least this long.
MIN_POOL_SIZE = 4


class CNN(nnx.Module):
    """conv 3x3 -> [BN] -> ReLU -> pool -> conv 3x3 -> [BN] -> ReLU -> pool -> dense -> ReLU -> head

    ``activation="hardtanh"`` puts hardtanh where ReLU is (for binary activations).

    Convolutions are ``SAME``-padded; a 2x2/stride-2 max-pool follows each convolution while both
    spatial sides are >= 4 (28x28 -> 14 -> 7; 8x8 -> 4 -> 2), then the feature map is flattened.
    With ``use_bn`` the convolutions have no bias (BatchNorm's shift replaces it).

    Module paths: ``stem``, ``stem_norm`` (BN only), ``conv2``, ``conv2_norm`` (BN only),
    ``dense``, ``head``.

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> model = CNN((8, 8, 1), 10, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 8, 8, 1))).shape
      (2, 10)
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (28, 28, 1),
        num_classes: int = 10,
        *,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        use_bn: bool = True,
        activation: str = "relu",
        linear: LinearFactory = nnx.Linear,
        conv: ConvFactory = nnx.Conv,
        rngs: nnx.Rngs,
    ):
        """Builds the layers.

        Args:
          input_shape: ``(height, width, channels)`` of one example.
          num_classes: number of output logits.
          channels: output channels of the two convolutions.
          hidden: width of the dense layer before the head.
          use_bn: BatchNorm after each convolution.
          activation: hidden nonlinearity, ``"relu"`` or ``"hardtanh"`` (binary activations:
            ``sign`` of a ReLU output is always +1).
          linear: dense-layer factory.
          conv: convolution factory.
          rngs: random streams for initialisation.
        """
        self.input_shape = check_image_shape(input_shape)
        num_classes = check_positive_int(num_classes, "num_classes")
        hidden = check_positive_int(hidden, "hidden")
        channels = tuple(channels)
        if len(channels) != 2:
            raise ValueError(
                f"channels={channels!r} is not allowed; allowed: two positive integers"
            )
        c1, c2 = (check_positive_int(c, "channels") for c in channels)
        height, width, in_channels = self.input_shape
        self.use_bn = bool(use_bn)
        self.activation = check_activation(activation)

        def conv3x3(cin: int, cout: int) -> nnx.Module:
            return conv(
                cin,
                cout,
                (3, 3),
                strides=(1, 1),
                padding="SAME",
                use_bias=not self.use_bn,
                rngs=rngs,
            )

        def norm(features: int) -> nnx.Module | None:
            if not self.use_bn:
                return None
            return nnx.BatchNorm(features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)

        self.stem = conv3x3(in_channels, c1)
        self.stem_norm = norm(c1)
        self.conv2 = conv3x3(c1, c2)
        self.conv2_norm = norm(c2)
        pools = []
        for _ in range(2):
            pool = min(height, width) >= MIN_POOL_SIZE
            pools.append(pool)
            if pool:
                height, width = height // 2, width // 2
        self.pools = tuple(pools)
        self.dense = linear(height * width * c2, hidden, use_bias=True, rngs=rngs)
        self.head = linear(hidden, num_classes, use_bias=True, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Maps ``(batch, *input_shape)`` images to logits ``(batch, num_classes)``.

        ``train=True`` normalises with batch statistics and updates BatchNorm's running averages.
        """
        check_input(x, self.input_shape, "CNN")
        act = ACTIVATIONS[self.activation]
        for layer, norm, pool in (
            (self.stem, self.stem_norm, self.pools[0]),
            (self.conv2, self.conv2_norm, self.pools[1]),
        ):
            x = layer(x)
            if norm is not None:
                x = norm(x, use_running_average=not train)
            x = act(x)
            if pool:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        x = act(self.dense(x.reshape(x.shape[0], -1)))
        return self.head(x)

    def layer_sequence(self) -> tuple[LayerStep, ...]:
        """The forward as a chain of linear layers (:class:`~qflax.models.LayerStep`): each
        convolution with its BatchNorm (None without ``use_bn``), activation and pool, then the
        feature map flattened before ``dense``, and ``head``."""
        convs = (("stem", self.stem, self.stem_norm), ("conv2", self.conv2, self.conv2_norm))
        steps = tuple(
            LayerStep(path, layer, "conv", norm, self.activation, pool)
            for (path, layer, norm), pool in zip(convs, self.pools, strict=True)
        )
        dense = LayerStep("dense", self.dense, "dense", activation=self.activation, flatten=True)
        return (*steps, dense, LayerStep("head", self.head, "dense"))
