"""Models with a latent code: a convolutional autoencoder (rate–distortion studies of latent
quantizers) and a split classifier (a CNN cut after its second block, the cut compressed).

Both put a :class:`qflax.layers.Latent` where the code is — the identity in float — so a latent
quantizer is chosen by a rule on its path (``latent``, ``split``), as any other quantizer."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from qflax.layers import Latent
from qflax.models._cnn import MIN_POOL_SIZE
from qflax.models._common import (
    BN_EPSILON,
    BN_MOMENTUM,
    ConvFactory,
    LinearFactory,
    check_image_shape,
    check_input,
    check_positive_int,
)


def _upsample(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2× upsampling of ``(N, H, W, C)``."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _two_ints(value: Sequence[int], field: str) -> tuple[int, int]:
    value = tuple(value)
    if len(value) != 2:
        raise ValueError(f"{field}={value!r} is not allowed; allowed: two positive integers")
    return tuple(check_positive_int(v, field) for v in value)  # type: ignore[return-value]


class ConvAutoencoder(nnx.Module):
    """conv 3×3/2 → ReLU → conv 3×3/2 → ReLU → conv 1×1 → **latent** → conv 1×1 → ReLU → up 2×
    → conv 3×3 → ReLU → up 2× → conv 3×3 → sigmoid.

    Images ``(H, W, C)`` with ``H`` and ``W`` divisible by 4 (28×28 → a 7×7 grid of latent
    vectors; 8×8 digits → 2×2), each vector ``latent_dim`` channels. Trained on the
    ``"reconstruct"`` task (squared error against the input, PSNR; images in [0, 1]).
    ``num_classes`` is accepted for the registry's uniform signature and unused.

    Module paths: ``stem``, ``enc2``, ``to_latent``, ``latent`` (a :class:`~qflax.layers.Latent`;
    the rule that quantizes the code matches ``^latent$``), ``from_latent``, ``dec1``, ``head``
    (its output channels are the image's).

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> model = ConvAutoencoder((8, 8, 1), rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 8, 8, 1))).shape, model.latent_shape
      ((2, 8, 8, 1), (2, 2, 4))
    """

    task = "reconstruct"

    def __init__(
        self,
        input_shape: Sequence[int] = (28, 28, 1),
        num_classes: int = 10,
        *,
        channels: Sequence[int] = (32, 64),
        latent_dim: int = 4,
        linear: LinearFactory = nnx.Linear,
        conv: ConvFactory = nnx.Conv,
        rngs: nnx.Rngs,
    ):
        """Builds the layers.

        Args:
          input_shape: ``(height, width, channels)``, height and width divisible by 4.
          num_classes: unused (the registry passes it to every model).
          channels: output channels of the two encoder convolutions (the decoder mirrors them).
          latent_dim: channels of one latent vector.
          linear: dense-layer factory (unused; the registry passes it to every model).
          conv: convolution factory.
          rngs: random streams for initialisation.
        """
        del num_classes, linear
        self.input_shape = check_image_shape(input_shape)
        height, width, in_channels = self.input_shape
        if height % 4 or width % 4:
            raise ValueError(
                f"input_shape={self.input_shape} is not allowed for ConvAutoencoder; allowed: "
                "height and width divisible by 4"
            )
        c1, c2 = _two_ints(channels, "channels")
        latent_dim = check_positive_int(latent_dim, "latent_dim")
        self.latent_shape = (height // 4, width // 4, latent_dim)

        def make(cin, cout, size, stride=1):
            return conv(
                cin,
                cout,
                (size, size),
                strides=(stride, stride),
                padding="SAME",
                use_bias=True,
                rngs=rngs,
            )

        self.stem = make(in_channels, c1, 3, 2)
        self.enc2 = make(c1, c2, 3, 2)
        self.to_latent = make(c2, latent_dim, 1)
        self.latent = Latent(latent_dim)
        self.from_latent = make(latent_dim, c2, 1)
        self.dec1 = make(c2, c1, 3)
        self.head = make(c1, in_channels, 3)

    def encode(self, x: jax.Array) -> jax.Array:
        """The latent vectors before the quantizer: ``(batch, H/4, W/4, latent_dim)``."""
        check_input(x, self.input_shape, "ConvAutoencoder")
        x = jax.nn.relu(self.stem(x))
        x = jax.nn.relu(self.enc2(x))
        return self.to_latent(x)

    def decode(self, z: jax.Array) -> jax.Array:
        """Images in [0, 1] from (quantized) latent vectors."""
        x = jax.nn.relu(self.from_latent(z))
        x = jax.nn.relu(self.dec1(_upsample(x)))
        return jax.nn.sigmoid(self.head(_upsample(x)))

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """The reconstruction of ``x`` through the (quantized) latent code."""
        return self.decode(self.latent(self.encode(x), train=train))


class SplitCNN(nnx.Module):
    """The CNN (``qflax.models.CNN``: two conv blocks, dense, head) cut after its second block,
    where a split-learning system sends the activations from one device to the other: each
    position's ``channels[1]`` features go down to ``split_dim`` (``split_down``, linear), through
    the **cut** (``split``: a :class:`~qflax.layers.Latent`, where the compressing quantizer goes),
    and back up (``split_up``), then on to ``dense`` and ``head``.

    Module paths: ``stem``, ``stem_norm``, ``conv2``, ``conv2_norm``, ``split_down``, ``split``,
    ``split_up``, ``dense``, ``head``. ``cut_shape``: the shape of one example's transmitted
    tensor, ``(H', W', split_dim)``.

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> model = SplitCNN((8, 8, 1), 10, split_dim=4, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 8, 8, 1))).shape, model.cut_shape
      ((2, 10), (2, 2, 4))
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (28, 28, 1),
        num_classes: int = 10,
        *,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        split_dim: int = 16,
        linear: LinearFactory = nnx.Linear,
        conv: ConvFactory = nnx.Conv,
        rngs: nnx.Rngs,
    ):
        """Builds the layers (``channels``, ``hidden`` as the CNN's; ``split_dim``: features per
        position sent across the cut)."""
        self.input_shape = check_image_shape(input_shape)
        num_classes = check_positive_int(num_classes, "num_classes")
        hidden = check_positive_int(hidden, "hidden")
        c1, c2 = _two_ints(channels, "channels")
        split_dim = check_positive_int(split_dim, "split_dim")
        height, width, in_channels = self.input_shape

        def conv3x3(cin, cout):
            return conv(
                cin, cout, (3, 3), strides=(1, 1), padding="SAME", use_bias=False, rngs=rngs
            )

        def norm(features):
            return nnx.BatchNorm(features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)

        self.stem, self.stem_norm = conv3x3(in_channels, c1), norm(c1)
        self.conv2, self.conv2_norm = conv3x3(c1, c2), norm(c2)
        pools = []
        for _ in range(2):
            pool = min(height, width) >= MIN_POOL_SIZE
            pools.append(pool)
            if pool:
                height, width = height // 2, width // 2
        self.pools = tuple(pools)
        self.cut_shape = (height, width, split_dim)
        self.split_down = linear(c2, split_dim, use_bias=True, rngs=rngs)
        self.split = Latent(split_dim)
        self.split_up = linear(split_dim, c2, use_bias=True, rngs=rngs)
        self.dense = linear(height * width * c2, hidden, use_bias=True, rngs=rngs)
        self.head = linear(hidden, num_classes, use_bias=True, rngs=rngs)

    def front(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """The sender's part: the features at the cut before compression ``(batch, *cut)``."""
        check_input(x, self.input_shape, "SplitCNN")
        for layer, bn, pool in (
            (self.stem, self.stem_norm, self.pools[0]),
            (self.conv2, self.conv2_norm, self.pools[1]),
        ):
            x = jax.nn.relu(bn(layer(x), use_running_average=not train))
            if pool:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        return self.split_down(x)

    def back(self, z: jax.Array) -> jax.Array:
        """The receiver's part: logits from the (decompressed) features at the cut."""
        x = self.split_up(z)
        x = jax.nn.relu(self.dense(x.reshape(x.shape[0], -1)))
        return self.head(x)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Logits ``(batch, num_classes)`` through the (compressed) cut."""
        return self.back(self.split(self.front(x, train=train), train=train))
