"""LSQ (Esser et al. 2020; METHODS.md 2) on the Fashion-MNIST CNN,
the fixed-bit baseline GDNSQ is compared with.

``experiments/mnist5k/lsq.py`` (the same budget as GDNSQ: student initialised from the float
CNN, Jeffreys distillation from it, batch 32, cosine decay, stem and head in float), 10 epochs
from the Fashion-MNIST teacher (``_base.py``).

    qflax train --config experiments/fashion_mnist/lsq.py --config.target_bits=2 \\
        --config.teacher.mode=checkpoint --config.teacher.path=runs/fashion_mnist/fp-s0 \\
        --workdir runs/fashion_mnist/lsq-w2a2-s0

Expected: W4A4 within ~0.5 points of the fine-tuned float reference (``fp_ft.py:kd``), W2A2
within ~2 points; GDNSQ at least as good at W2A2 (issue 17's goal). Measured (3 seeds,
2026-12-06): W4A4 89.52 ± 0.14 (−0.10), W2A2 89.38 ± 0.46 (−0.24; GDNSQ 0.37 below, within
2 SE); experiments/fashion_mnist/README.md.
"""

from experiments.fashion_mnist import _base
from experiments.mnist5k import lsq


def get_config(variant: str | None = None):
    """lsq at ``target_bits`` (default 4); ``"smoke"``: digits, 2 epochs."""
    return _base.student(lsq.get_config, variant)
