"""GDNSQ on ResNet-20 / CIFAR-100 (TFDS), the paper's main setting (METHODS.md 3).

Student initialised from the float ResNet-20 (``experiments/cifar100/fp.py``), Jeffreys
distillation from it, learned bit-widths driven to ``target_bits`` by the exterior-point
penalty, first conv and final dense in float, learning-rate decay once every layer is within
target. Without ``teacher.mode=checkpoint`` the teacher is trained first in WORKDIR/teacher.
Our choices where the code is not specified here [inferred]: Adam 1e-4 for the weights,
1e-2 for the log-steps, 100 epochs, bit-widths starting at 8.

    qflax train --config experiments/cifar100/fp.py --workdir runs/cifar100-fp
    qflax train --config experiments/cifar100/gdnsq.py --config.target_bits=2 \\
        --config.teacher.mode=checkpoint --config.teacher.path=runs/cifar100-fp \\
        --workdir runs/cifar100-gdnsq-w2a2

Expected (the code's README, ResNet-20): W1A1 58.38, W2A2 66.41, W4A4 70.24 against
float 70.26. Not run here (needs an accelerator: ~0.8 s per step on 2 CPU cores).
"""

from experiments.cifar10 import gdnsq as cifar10_gdnsq


def get_config(variant: str | None = None):
    """experiments/cifar10/gdnsq.py on ``tfds:cifar100``; ``"smoke"``: digits; ``"cpu8"``: as
    cifar10's."""
    config = cifar10_gdnsq.get_config(variant)
    if variant not in ("smoke", "cpu8"):  # cpu8: the stand-in set (cifar10/fp.py)
        config.dataset = "tfds:cifar100"
    return config
