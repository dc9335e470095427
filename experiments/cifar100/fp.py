"""Float ResNet-20 on CIFAR-100 (TFDS): the teacher of the GDNSQ runs, in the paper's setting.

He et al. 2016's CIFAR ResNet-20 (option-A shortcuts, 0.27 M parameters): SGD with momentum 0.9,
learning rate 0.1 with a cosine decay, weight decay 1e-4, batch 128, 200 epochs, random
translations of up to 4 pixels (our stand-in for pad-4 random crops; no horizontal flips).
Needs the TFDS data (``tfds:cifar100`` prepared under ``--config.dataset_kwargs.data_dir``) and
a GPU or TPU: a step takes ~0.8 s on 2 CPU cores (390 steps per epoch).

    qflax train --config experiments/cifar100/fp.py --workdir runs/cifar100-fp

Expected: test accuracy ~68-70% (the GDNSQ code's float ResNet-20: 70.26%, METHODS.md 3).
Not run
here (no accelerator for this project's CI machine).
"""

from experiments.cifar10 import fp as cifar10_fp


def get_config(variant: str | None = None):
    """experiments/cifar10/fp.py on ``tfds:cifar100``; ``"smoke"``: digits; ``"cpu8"``: as
    cifar10's."""
    config = cifar10_fp.get_config(variant)
    if variant not in ("smoke", "cpu8"):  # cpu8: the stand-in set (cifar10/fp.py)
        config.dataset = "tfds:cifar100"
    return config
