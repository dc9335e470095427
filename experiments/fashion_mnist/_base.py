"""What every Fashion-MNIST row shares: the data, the training budget and how often it evaluates.

The rows are the mnist5k configs (same model, recipes, optimizers and distillation), moved to
Fashion-MNIST: a stratified, seeded 10,000-image subset of the 60,000 training images (1,000
per class; ``dataset_kwargs.train_size``) and the full 10,000-image test set, so one accuracy
has a standard error of ~0.3 points at 90% (mnist5k's 1,000 test images: ~0.5 at 97%). Float
teachers train 20 epochs (1,560 steps at batch 128); quantized students and the fine-tuned
float references get 10 epochs from the teacher (3,130 steps at batch 32 for the distilled
rows, 790 at batch 128 for the others). Test accuracy is computed every 5 epochs and at the
end. The choice keeps the sweep (26 rows × 3 seeds) to about four hours on the 2-core CPU.
Needs the Debian package ``dataset-fashion-mnist`` (``make data``) or the four IDX files in
``$QFLAX_DATA_DIR``.
"""

from typing import Any

import ml_collections

# The small vision transformer of the BNN++ study: 7x7 patches (16 tokens), width 64, 4 blocks.
VIT_KWARGS = {"patch": 7, "dim": 64, "depth": 4, "num_heads": 4, "mlp_dim": 128}
TRAIN_SIZE = 10_000
TEACHER_EPOCHS = 20
STUDENT_EPOCHS = 10
EVAL_EVERY_EPOCHS = 5


def smoke(variant: str | None) -> bool:
    """Whether ``variant`` asks for the digits smoke run (``"smoke"`` or ``"<x>-smoke"``)."""
    return variant is not None and (variant == "smoke" or variant.endswith("-smoke"))


def base_variant(variant: str | None) -> str | None:
    """``variant`` without its ``-smoke`` suffix (``"smoke"`` stays ``"smoke"``)."""
    if variant is not None and variant.endswith("-smoke"):
        return variant[: -len("-smoke")]
    return variant


def fashion(
    config: ml_collections.ConfigDict, *, student: bool, smoke_run: bool = False
) -> ml_collections.ConfigDict:
    """``config`` (an mnist5k config) on Fashion-MNIST with this folder's budget; a smoke run
    keeps the digits set and epochs of the mnist5k smoke variant."""
    if smoke_run:
        return config
    config.dataset = "fashion_mnist"
    with config.unlocked():
        config.dataset_kwargs.train_size = TRAIN_SIZE
    config.epochs = STUDENT_EPOCHS if student else TEACHER_EPOCHS
    config.eval_every_epochs = EVAL_EVERY_EPOCHS
    config.checkpoint.every_epochs = EVAL_EVERY_EPOCHS
    return config


def vit(config: ml_collections.ConfigDict, *, smoke_run: bool) -> ml_collections.ConfigDict:
    """``config`` with the small ViT of :data:`VIT_KWARGS` in place of the CNN (4×4 patches on
    the 8×8 digits of a smoke run)."""
    config.model = "vit"
    with config.unlocked():
        config.model_kwargs = {**VIT_KWARGS, **({"patch": 4} if smoke_run else {})}
    return config


def student(make: Any, variant: str | None) -> ml_collections.ConfigDict:
    """The mnist5k config ``make(variant)`` (a config with only a ``smoke`` variant) as a
    Fashion-MNIST student row."""
    if variant not in (None, "smoke"):
        raise ValueError(f"variant={variant!r} is not known; allowed: 'smoke' or none")
    return fashion(make(variant), student=True, smoke_run=variant == "smoke")
