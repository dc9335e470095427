"""GDNSQ on ResNet-20 / CIFAR-10 (TFDS), the paper's main setting (METHODS.md 3).

Student initialised from the float ResNet-20 (``experiments/cifar10/fp.py``), Jeffreys
distillation from it, learned bit-widths driven to ``target_bits`` by the exterior-point
penalty, first conv and final dense in float, learning-rate decay once every layer is within
target. Without ``teacher.mode=checkpoint`` the teacher is trained first in WORKDIR/teacher.
Our choices where the code is not specified here [inferred]: Adam 1e-4 for the weights,
1e-2 for the log-steps, 100 epochs, bit-widths starting at 8.

    qflax train --config experiments/cifar10/fp.py --workdir runs/cifar10-fp
    qflax train --config experiments/cifar10/gdnsq.py --config.target_bits=2 \\
        --config.teacher.mode=checkpoint --config.teacher.path=runs/cifar10-fp \\
        --workdir runs/cifar10-gdnsq-w2a2

Expected (the code's README, ResNet-20): W1A1 86.50, W2A2 91.4, W3A3 92.5, W4A4 92.78 against
float 92.82. Not run here (needs an accelerator: ~0.8 s per step on 2 CPU cores).
"""

import ml_collections

from experiments.cifar10 import fp


def get_config(variant: str | None = None):
    """GDNSQ at ``target_bits`` (default 4); ``"smoke"``: digits, 1 epoch, teacher trained;
    ``"cpu8"``: fp.py's reduced run, 2 epochs."""
    config = fp.get_config(variant)
    config.epochs = {"smoke": 1, "cpu8": 2}.get(variant, 100)
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-4
    config.optimizer.weight_decay = 0.0
    config.optimizer.schedule = "constant"
    config.quant.recipe = "gdnsq"
    config.quant.learning_rate = 1e-2
    config.quant.first_last_float = True
    config.recipe_kwargs.init_bits = 8.0
    with config.unlocked():
        config.target_bits = ml_collections.FieldReference(4)
    config.quant.weight_bits = config.get_ref("target_bits")
    config.quant.act_bits = config.get_ref("target_bits")
    config.penalty.warmup_epochs = 1.0
    config.teacher.mode = "train"  # or: --config.teacher.mode=checkpoint --config.teacher.path=
    config.teacher.divergence = "jeffreys"
    config.teacher.init_student = True
    return config
