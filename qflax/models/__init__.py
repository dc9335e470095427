"""Reference models that take layer factories (``linear=``, ``conv=``), so any quantization
recipe applies to them, by factory or by replacing modules by path (``stem``, ``head``, ...).

Every model is called as ``model(x, *, train=False)``.
"""

from qflax.models._attention import FeedForward, SelfAttention, TransformerBlock
from qflax.models._char_transformer import CharTransformer
from qflax.models._cnn import CNN
from qflax.models._codec import ConvAutoencoder, SplitCNN
from qflax.models._common import (
    BN_EPSILON,
    BN_MOMENTUM,
    ConvFactory,
    EmbedFactory,
    LayerStep,
    LinearFactory,
)
from qflax.models._mlp import MLP
from qflax.models._registry import MODELS, build_model
from qflax.models._resnet import BasicBlock, ResNet18, ResNet20
from qflax.models._vit import ViT

__all__ = [
    "BN_EPSILON",
    "BN_MOMENTUM",
    "CNN",
    "MLP",
    "MODELS",
    "BasicBlock",
    "CharTransformer",
    "ConvAutoencoder",
    "ConvFactory",
    "EmbedFactory",
    "FeedForward",
    "LayerStep",
    "LinearFactory",
    "ResNet18",
    "ResNet20",
    "SelfAttention",
    "SplitCNN",
    "TransformerBlock",
    "ViT",
    "build_model",
]
