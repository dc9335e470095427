"""PACT (Choi et al. 2018; METHODS.md 2) on the Fashion-MNIST CNN,
the fixed-bit baseline GDNSQ is compared with.

``experiments/mnist5k/pact.py`` (the same budget as GDNSQ: student initialised from the float
CNN, Jeffreys distillation from it, batch 32, cosine decay, stem and head in float), 10 epochs
from the Fashion-MNIST teacher (``_base.py``).

    qflax train --config experiments/fashion_mnist/pact.py --config.target_bits=2 \\
        --config.teacher.mode=checkpoint --config.teacher.path=runs/fashion_mnist/fp-s0 \\
        --workdir runs/fashion_mnist/pact-w2a2-s0

Expected: W4A4 within ~0.5 points of the fine-tuned float reference (``fp_ft.py:kd``), W2A2
within ~2 points; GDNSQ at least as good at W2A2 (issue 17's goal). Measured (3 seeds,
2026-12-06): W4A4 89.35 ± 0.09 (−0.27), W2A2 84.85 ± 0.23 (−4.77: its 2-bit DoReFa weights,
beyond the expected ~2); experiments/fashion_mnist/README.md.
"""

from experiments.fashion_mnist import _base
from experiments.mnist5k import pact


def get_config(variant: str | None = None):
    """pact at ``target_bits`` (default 4); ``"smoke"``: digits, 2 epochs."""
    return _base.student(pact.get_config, variant)
