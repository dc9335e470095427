"""ResNets from "Deep Residual Learning for Image Recognition" (He et al. 2016): ResNet-20 for
CIFAR (Sec. 4.2: 3 stages of 3 basic blocks, 16/32/64 channels, option-A zero-padding shortcuts by
default) and ResNet-18 (Table 1: 4 stages of 2 basic blocks, 64..512 channels, 1x1 projection
shortcuts). Differs: a ``width`` multiplier, and ResNet-18 swaps its 7x7/2 stem and max-pool for
a 3x3/1 stem on inputs smaller than 64 px (the usual CIFAR adaptation).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from qflax.models._common import (
    BN_EPSILON,
    BN_MOMENTUM,
    ConvFactory,
    LinearFactory,
    check_image_shape,
    check_positive_int,
    check_width,
    scaled_channels,
)
from qflax.numerics import check_choice

SHORTCUTS = ("pad", "projection")
# ResNet-18 uses the ImageNet stem (7x7 stride-2 conv + 3x3 stride-2 max-pool) from this size up.
IMAGENET_STEM_MIN_SIZE = 64

_PAD1 = ((1, 1), (1, 1))  # PyTorch's padding=1 (also for stride 2, unlike "SAME")


def _batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)


class BasicBlock(nnx.Module):
    """``relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x))`` with 3x3 convolutions.

    When the stride is not 1 or the channel count changes, the shortcut is either
    ``"pad"`` (option A: subsample ``x[:, ::s, ::s]`` and zero-pad channels evenly on both sides;
    no parameters) or ``"projection"`` (option B: 1x1 convolution ``shortcut`` with stride ``s``
    followed by ``shortcut_norm``). Otherwise it is the identity.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        *,
        shortcut: str,
        conv: ConvFactory = nnx.Conv,
        rngs: nnx.Rngs,
    ):
        check_choice(shortcut, "shortcut", SHORTCUTS)
        self.stride = stride
        self.conv1 = conv(
            in_channels,
            out_channels,
            (3, 3),
            strides=(stride, stride),
            padding=_PAD1,
            use_bias=False,
            rngs=rngs,
        )
        self.norm1 = _batch_norm(out_channels, rngs)
        self.conv2 = conv(
            out_channels,
            out_channels,
            (3, 3),
            strides=(1, 1),
            padding=_PAD1,
            use_bias=False,
            rngs=rngs,
        )
        self.norm2 = _batch_norm(out_channels, rngs)
        resize = stride != 1 or in_channels != out_channels
        channel_pad, projection, projection_norm = None, None, None
        if resize and shortcut == "pad":
            if out_channels < in_channels:
                raise ValueError(
                    f"shortcut='pad' cannot shrink {in_channels} to {out_channels} channels; "
                    "allowed: shortcut='projection'"
                )
            low = (out_channels - in_channels) // 2
            channel_pad = (low, out_channels - in_channels - low)
        elif resize:
            projection = conv(
                in_channels,
                out_channels,
                (1, 1),
                strides=(stride, stride),
                padding="VALID",
                use_bias=False,
                rngs=rngs,
            )
            projection_norm = _batch_norm(out_channels, rngs)
        # Channels zero-padded below/above the input on an option-A shortcut; None: no padding.
        self.channel_pad = channel_pad
        self.shortcut = projection
        self.shortcut_norm = projection_norm

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        use_running_average = not train
        y = jax.nn.relu(self.norm1(self.conv1(x), use_running_average=use_running_average))
        y = self.norm2(self.conv2(y), use_running_average=use_running_average)
        if self.shortcut is not None:
            x = self.shortcut_norm(self.shortcut(x), use_running_average=use_running_average)
        elif self.channel_pad is not None:
            x = x[:, :: self.stride, :: self.stride, :]
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), self.channel_pad))
        return jax.nn.relu(y + x)


def _make_stages(
    in_channels: int,
    stage_channels: Sequence[int],
    blocks_per_stage: int,
    *,
    shortcut: str,
    conv: ConvFactory,
    rngs: nnx.Rngs,
) -> nnx.List:
    """``stages[i][j]`` is block ``j`` of stage ``i``; stages after the first start at stride 2."""
    stages = []
    for i, channels in enumerate(stage_channels):
        blocks = []
        for j in range(blocks_per_stage):
            stride = 2 if i > 0 and j == 0 else 1
            blocks.append(
                BasicBlock(in_channels, channels, stride, shortcut=shortcut, conv=conv, rngs=rngs)
            )
            in_channels = channels
        stages.append(nnx.List(blocks))
    return nnx.List(stages)


class _ResNet(nnx.Module):
    """Shared forward pass: stem, stem_norm, ReLU, [max-pool], stages, global average, head."""

    stem_pool: bool

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Maps images ``(batch, height, width, channels)`` to logits ``(batch, num_classes)``.

        Any spatial size works (global average pooling). ``train=True`` normalises with batch
        statistics and updates BatchNorm's running averages.
        """
        if x.ndim != 4 or x.shape[-1] != self.input_shape[-1]:
            raise ValueError(
                f"{type(self).__name__} got input of shape {tuple(x.shape)}; allowed: "
                f"(batch, height, width, {self.input_shape[-1]})"
            )
        x = self.stem_norm(self.stem(x), use_running_average=not train)
        x = jax.nn.relu(x)
        if self.stem_pool:
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=_PAD1)
        for stage in self.stages:
            for block in stage:
                x = block(x, train=train)
        return self.head(jnp.mean(x, axis=(1, 2)))


class ResNet20(_ResNet):
    """CIFAR ResNet-20 (6n+2 layers, n = ``blocks_per_stage`` = 3): 269,722 parameters by default.

    Module paths: ``stem`` (3x3 conv), ``stem_norm``, ``stages/i/j/{conv1,norm1,conv2,norm2}``
    (plus ``shortcut``, ``shortcut_norm`` with ``shortcut="projection"``), ``head``.
    Convolutions have no bias; the head has one.

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> model = ResNet20(num_classes=10, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 32, 32, 3))).shape
      (2, 10)
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (32, 32, 3),
        num_classes: int = 10,
        *,
        width: float = 1.0,
        blocks_per_stage: int = 3,
        shortcut: str = "pad",
        linear: LinearFactory = nnx.Linear,
        conv: ConvFactory = nnx.Conv,
        rngs: nnx.Rngs,
    ):
        """Builds the layers.

        Args:
          input_shape: ``(height, width, channels)`` of one example (channels are what matters).
          num_classes: number of output logits.
          width: channel multiplier (16/32/64 times ``width``).
          blocks_per_stage: basic blocks per stage (3 for ResNet-20, 5 for ResNet-32, ...).
          shortcut: ``"pad"`` (option A, parameter-free) or ``"projection"`` (1x1 conv + BN).
          linear: dense-layer factory (the head).
          conv: convolution factory.
          rngs: random streams for initialisation.
        """
        self.input_shape = check_image_shape(input_shape)
        num_classes = check_positive_int(num_classes, "num_classes")
        width = check_width(width)
        blocks_per_stage = check_positive_int(blocks_per_stage, "blocks_per_stage")
        check_choice(shortcut, "shortcut", SHORTCUTS)
        channels = [scaled_channels(c, width) for c in (16, 32, 64)]
        self.stem_pool = False
        self.stem = conv(
            self.input_shape[-1],
            channels[0],
            (3, 3),
            strides=(1, 1),
            padding=_PAD1,
            use_bias=False,
            rngs=rngs,
        )
        self.stem_norm = _batch_norm(channels[0], rngs)
        self.stages = _make_stages(
            channels[0], channels, blocks_per_stage, shortcut=shortcut, conv=conv, rngs=rngs
        )
        self.head = linear(channels[-1], num_classes, use_bias=True, rngs=rngs)


class ResNet18(_ResNet):
    """ResNet-18: 4 stages of 2 basic blocks (64/128/256/512 channels times ``width``).

    Inputs of at least 64 px (the smaller side of ``input_shape``) get the ImageNet stem: 7x7
    stride-2 conv (padding 3) + 3x3 stride-2 max-pool; smaller inputs a 3x3 stride-1 conv.
    Down-sampling blocks use 1x1 projection shortcuts (option B).

    Module paths: ``stem``, ``stem_norm``, ``stages/i/j/{conv1,norm1,conv2,norm2}``,
    ``stages/i/0/{shortcut,shortcut_norm}`` for i >= 1, ``head``.

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> small = ResNet18((32, 32, 3), 10, width=0.125, rngs=nnx.Rngs(0))
      >>> small.stem.kernel_size, small.stem_pool, small.stages[3][1].conv2.out_features
      ((3, 3), False, 64)
      >>> nnx.eval_shape(lambda: ResNet18(rngs=nnx.Rngs(0))).stem.kernel_size  # 224 px default
      (7, 7)
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (224, 224, 3),
        num_classes: int = 1000,
        *,
        width: float = 1.0,
        linear: LinearFactory = nnx.Linear,
        conv: ConvFactory = nnx.Conv,
        rngs: nnx.Rngs,
    ):
        """Builds the layers.

        Args:
          input_shape: ``(height, width, channels)`` of one example; picks the stem.
          num_classes: number of output logits.
          width: channel multiplier (tests use e.g. 0.125 -> 8/16/32/64 channels).
          linear: dense-layer factory (the head).
          conv: convolution factory.
          rngs: random streams for initialisation.
        """
        self.input_shape = check_image_shape(input_shape)
        num_classes = check_positive_int(num_classes, "num_classes")
        width = check_width(width)
        channels = [scaled_channels(c, width) for c in (64, 128, 256, 512)]
        self.stem_pool = min(self.input_shape[:2]) >= IMAGENET_STEM_MIN_SIZE
        if self.stem_pool:
            kernel, stride, padding = (7, 7), (2, 2), ((3, 3), (3, 3))
        else:
            kernel, stride, padding = (3, 3), (1, 1), _PAD1
        self.stem = conv(
            self.input_shape[-1],
            channels[0],
            kernel,
            strides=stride,
            padding=padding,
            use_bias=False,
            rngs=rngs,
        )
        self.stem_norm = _batch_norm(channels[0], rngs)
        self.stages = _make_stages(
            channels[0], channels, 2, shortcut="projection", conv=conv, rngs=rngs
        )
        self.head = linear(channels[-1], num_classes, use_bias=True, rngs=rngs)
