"""CoDeQ joint pruning and quantization on the Fashion-MNIST CNN (METHODS.md 6).

``experiments/mnist5k/codeq.py`` (learned dead-zone and bit-width per layer, decayed by
``quant.deadzone_decay`` / ``quant.bits_decay``, 8-bit activations, every layer quantized,
cross-entropy, Adam 1e-3, θ's at 1e-2), 10 epochs fine-tuned from the float teacher. The sweep
runs dead-zone decays 0.5, 1, 2 and 4 (seed 0: decay 2 95.0% sparse at −1.64 points, decay 4
98.0% at −7.06; 0.5 and 1 look for the goal's trade-off).

    qflax train --config experiments/fashion_mnist/codeq.py --config.quant.deadzone_decay=4 \\
        --config.teacher.mode=checkpoint --config.teacher.path=runs/fashion_mnist/fp-s0 \\
        --workdir runs/fashion_mnist/codeq-dz4-s0

Expected (issue 17's goal): ≥ 80% weight sparsity within 1 point of the fine-tuned float
reference (``fp_ft.py:ce``) at ≤ 4 bits. Measured (3 seeds, 2026-12-06): dead-zone decay 0.5
82.7% sparse at 2.04 bits, 88.63 ± 0.55 (−0.85 ± 0.64: met on the mean); decay 1 91.1% (−1.16),
2 95.2% (−1.45), 4 97.9% (−7.09); experiments/fashion_mnist/README.md.
"""

from experiments.fashion_mnist import _base
from experiments.mnist5k import codeq


def get_config(variant: str | None = None):
    """CoDeQ with dead-zone decay 2, bits decay 4; ``"smoke"``: digits, 2 epochs."""
    return _base.student(codeq.get_config, variant)
