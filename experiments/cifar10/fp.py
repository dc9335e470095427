"""Float ResNet-20 on CIFAR-10 (TFDS): the teacher of the GDNSQ runs, in the paper's setting.

He et al. 2016's CIFAR ResNet-20 (option-A shortcuts, 0.27 M parameters): SGD with momentum 0.9,
learning rate 0.1 with a cosine decay, weight decay 1e-4, batch 128, 200 epochs, random
translations of up to 4 pixels (our stand-in for pad-4 random crops; no horizontal flips).
Needs the TFDS data (``tfds:cifar10`` prepared under ``--config.dataset_kwargs.data_dir``) and
a GPU or TPU: a step takes ~0.8 s on 2 CPU cores (390 steps per epoch).

    qflax train --config experiments/cifar10/fp.py --workdir runs/cifar10-fp

``variant="cpu8"``: 2 epochs at batch 128 on the stand-in JPEG set resized to 32 px
(``python -m experiments._fake_tfds DATA_DIR``, then ``--config.dataset_kwargs.data_dir=DATA_DIR``)
on every device (``mesh.data=-1``; 8 forced CPU devices), to check that the config starts,
shards, checkpoints and resumes where CIFAR-10 and an accelerator are absent.

Expected: test accuracy ~92% (the GDNSQ code's float ResNet-20: 92.82%, METHODS.md 3). Not run
here (no accelerator for this project's CI machine).
"""

from qflax.train import default_config


def get_config(variant: str | None = None):
    """The float ResNet-20; ``variant="smoke"``: 8x8 digits, 1 epoch, to check the wiring."""
    config = default_config()
    config.dataset = "tfds:cifar10"
    config.model = "resnet20"
    config.epochs = 200
    config.batch_size = 128
    config.augment_shift = 4
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 1e-4
    config.optimizer.schedule = "cosine"
    config.log_every_steps = 100
    config.checkpoint.every_epochs = 10
    if variant == "cpu8":  # reduced, on the stand-in set of experiments/imagenet/resnet18.py
        config.dataset = "tfds:qflax_fake_images"
        config.dataset_kwargs.image_size = 32
        config.mesh.data = -1
        config.epochs = 2
        config.checkpoint.every_epochs = 1
        config.log_every_steps = 8
    elif variant == "smoke":
        config.dataset = "digits"
        config.epochs = 1
        config.augment_shift = 1
    elif variant is not None:
        raise ValueError(f"variant={variant!r} is not known; allowed: 'cpu8', 'smoke' or none")
    return config
