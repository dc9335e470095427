"""Float ResNet-18 on ImageNet (ILSVRC 2012) through TFDS, streamed: the teacher of the
ImageNet GDNSQ rows (METHODS.md 3: W1A32 66.14 against float 71.91).

The usual recipe (Goyal et al. 2017): SGD with momentum 0.9, learning rate 0.1 × batch / 256
with 2 warm-up epochs (their 5 are for batches of thousands) and a cosine decay, weight decay
1e-4, batch 256, 90 epochs; images resized and centre-cropped to 224
(``dataset_kwargs.image_size``: "resize 256, crop 224"), random translations of up to 16 px
standing in for random-resized crops (no flips), bfloat16 products (``compute_dtype``), data
parallel over every device (``mesh.data=-1``). The splits are streamed
(``dataset_kwargs.stream``): each process decodes only its rows of each batch.

Data (manual download, as TFDS requires for ``imagenet2012``): put ``ILSVRC2012_img_train.tar``
and ``ILSVRC2012_img_val.tar`` from image-net.org in ``DATA_DIR/downloads/manual/``, then prepare
the array_record files once on a machine with TensorFlow (TFDS encodes with it):

    tfds build imagenet2012 --file_format=array_record --data_dir=DATA_DIR
    qflax train --config experiments/imagenet/resnet18.py --workdir runs/imagenet-r18 \\
        --config.dataset_kwargs.data_dir=DATA_DIR
    # several hosts: add --config.distributed.enabled=True (README "Several devices")

Expected: top-1 ~70-71% (torchvision's ResNet-18: 69.76%; with a cosine schedule ~71%). Not
run here: no accelerator and no ImageNet on this project's machines.

``variant="cpu8"`` is the same config at reduced size on a stand-in set (random JPEGs of varied
sizes, ``python -m experiments._fake_tfds DATA_DIR``): 64 px, ResNet-18 at width 1/8, batch 64,
3 epochs, on 8 forced CPU devices, to check that it starts, streams, shards, checkpoints and
resumes (its accuracy means nothing). Run 2026-12-06 on the 2-core CPU as 8 forced devices
(beside a sweep): 3 epochs (96 steps) in 117 s, loss 1.49 → 0.50, test accuracy 1.00 on the
stand-in; killed with ``kill -9`` in epoch 3 and rerun, it ended bit for bit at the
uninterrupted run's state:

    python -m experiments._fake_tfds /tmp/fake
    XLA_FLAGS=--xla_force_host_platform_device_count=8 qflax train \\
        --config experiments/imagenet/resnet18.py:cpu8 \\
        --config.dataset_kwargs.data_dir=/tmp/fake --workdir runs/imagenet-cpu8
"""

from qflax.train import default_config


def get_config(variant: str | None = None):
    """The ImageNet float ResNet-18; ``"cpu8"``: reduced, on the stand-in set (see above);
    ``"smoke"``: the 8x8 digits, one epoch."""
    config = default_config()
    config.dataset = "tfds:imagenet2012"
    config.dataset_kwargs.train_split = "train"
    config.dataset_kwargs.test_split = "validation"
    config.dataset_kwargs.image_size = 224
    config.dataset_kwargs.stream = True
    config.model = "resnet18"
    config.epochs = 90
    config.batch_size = 256
    config.eval_batch_size = 500
    config.augment_shift = 16
    config.compute_dtype = "bfloat16"
    config.mesh.data = -1
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.1 * config.batch_size / 256
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 1e-4
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_epochs = 2
    config.log_every_steps = 100
    config.checkpoint.every_epochs = 1
    if variant == "cpu8":
        config.dataset = "tfds:qflax_fake_images"
        config.dataset_kwargs.test_split = "test"
        config.dataset_kwargs.image_size = 64
        config.model_kwargs.width = 0.125
        config.epochs = 3
        config.batch_size = 64
        config.eval_batch_size = 128
        config.augment_shift = 4
        config.optimizer.warmup_epochs = 1
        config.log_every_steps = 8
    elif variant == "smoke":  # the wiring on the bundled 8x8 digits, one epoch
        config.dataset = "digits"
        config.dataset_kwargs = type(config.dataset_kwargs)()
        config.model_kwargs.width = 0.125
        config.epochs = 1
        config.batch_size = 64
        config.eval_batch_size = 128
        config.augment_shift = 1
        config.optimizer.warmup_epochs = 0
    elif variant is not None:
        raise ValueError(f"variant={variant!r} is not known; allowed: 'cpu8', 'smoke' or none")
    return config
