"""DBSSQ bit-shifting quantization on the Fashion-MNIST CNN (METHODS.md 5), trained as its
authors do: SGD with momentum 0.9, activations evaluated with running statistics.

``experiments/mnist5k/dbssq.py`` (weights normalised per output channel and quantized to
shift levels, rescaled by the pretrained channel spread; the blend ε annealed from 1 to 0 by
the paper's schedule stretched over the run; cross-entropy; stem and head in float; the exact
ε = 0 model evaluated at the end), 10 epochs fine-tuned from the float teacher, with the
optimizer of the authors' code (zia-badar/DBSSQ ``train/train.py``: SGD, momentum 0.9, peak
learning rate 1e-2) and their BatchNorm's running statistics at evaluation. Differs: one
warm-up epoch and a cosine decay in place of their per-epoch rates (1e-3, then 1e-2 ×6,
then 1e-3 ×8), batch 128 (theirs 256). Variants: none (weights shift-2, 3 bits: four
magnitudes and a sign; activations float), ``w1a1`` (1-bit weights and activations).

    qflax train --config experiments/fashion_mnist/dbssq.py \\
        --config.teacher.mode=checkpoint --config.teacher.path=runs/fashion_mnist/fp-s0 \\
        --workdir runs/fashion_mnist/dbssq-w-s0

Expected: weight-only shift-2 within ~1 point of the fine-tuned float reference
(``fp_ft.py:sgd``; the paper: ResNet-18 on ImageNet within ~1% weight-only); W1A1 several
points below. Measured (3 seeds, 2026-12-06): shift-2 89.06 ± 0.09 (−0.37), W1A1 85.68 ± 0.16
(−3.75); experiments/fashion_mnist/README.md.
"""

from experiments.fashion_mnist import _base
from experiments.mnist5k import dbssq


def sgd(config):
    """The authors' optimizer: SGD with momentum 0.9, 1e-2 after one warm-up epoch, cosine."""
    config.optimizer.name = "sgd"
    config.optimizer.momentum = 0.9
    config.optimizer.learning_rate = 1e-2
    config.optimizer.warmup_epochs = 1.0
    config.optimizer.schedule = "cosine"
    return config


def get_config(variant: str | None = None):
    """Weight-only shift-2 DBSSQ; ``"w1a1"``; ``"smoke"`` / ``"w1a1-smoke"``: digits."""
    base = _base.base_variant(variant)
    if base not in (None, "smoke", "w1a1"):
        raise ValueError(
            f"variant={variant!r} is not known; allowed: 'w1a1', 'smoke', 'w1a1-smoke' or none"
        )
    smoke = _base.smoke(variant)
    config = sgd(dbssq.get_config(base if base == "w1a1" else None))
    if smoke:
        config.dataset, config.epochs = "digits", 2
        config.optimizer.warmup_epochs = 0.0
    return _base.fashion(config, student=True, smoke_run=smoke)
