"""Fair float references on Fashion-MNIST: the float teacher fine-tuned for the same extra
epochs, with the same schedule, batch and distillation as the quantized students it is
compared with — so a student that beats its teacher by training longer is not mistaken for a
quantizer that helps.

Variants (each from its teacher, 10 epochs):

* ``kd``: as GDNSQ / LSQ / PACT / DoReFa (``lsq.py`` with no quantizer): Jeffreys distillation
  from the frozen teacher, batch 32, Adam 1e-3, cosine decay.
* ``ce``: as CoDeQ and BinaryConnect W1A32 (``codeq.py`` with no quantizer): cross-entropy,
  batch 128, Adam 1e-3, cosine decay.
* ``ce-ht``: ``ce`` on the hardtanh CNN (teacher ``fp.py:ht``), the reference of the W1A1 pairs.
* ``sgd``: ``ce`` with DBSSQ's SGD (momentum 0.9, 1e-2, one warm-up epoch, cosine).
* ``vit-ce``: ``ce`` on the small ViT (teacher ``fp.py:vit``), the reference of the BNN++
  study's ViT rows.

    qflax train --config experiments/fashion_mnist/fp_ft.py:kd \\
        --config.teacher.mode=checkpoint --config.teacher.path=runs/fashion_mnist/fp-s0 \\
        --workdir runs/fashion_mnist/fp-ft-kd-s0

Expected: within ~0.3 points of the teacher (fine-tuning a converged model). Measured (3
seeds, 2026-12-06): +0.02 to +0.21 (CNN), 0.00 (ViT); experiments/fashion_mnist/README.md.
"""

from experiments.fashion_mnist import _base, dbssq
from experiments.mnist5k import codeq, lsq

VARIANTS = ("kd", "ce", "ce-ht", "sgd", "vit-ce")


def get_config(variant: str | None = None):
    """The reference ``variant`` (default ``kd``); ``"<variant>-smoke"``: digits, 2 epochs."""
    base = _base.base_variant(variant) or "kd"
    smoke = _base.smoke(variant)
    if base == "smoke":
        base = "kd"
    if base not in VARIANTS:
        raise ValueError(
            f"variant={variant!r} is not known; allowed: {', '.join(VARIANTS)}, "
            "'<variant>-smoke', 'smoke' or none"
        )
    config = (lsq if base == "kd" else codeq).get_config("smoke" if smoke else None)
    config.quant.recipe = "none"
    with config.unlocked():
        config.recipe_kwargs = {}
    config.quant.deadzone_decay = 0.0
    config.quant.bits_decay = 0.0
    config.quant.first_last_float = True
    if base == "ce-ht":
        with config.unlocked():
            config.model_kwargs.activation = "hardtanh"
    if base == "vit-ce":
        _base.vit(config, smoke_run=smoke)
    if base == "sgd":
        dbssq.sgd(config)
        if smoke:
            config.optimizer.warmup_epochs = 0.0
    return _base.fashion(config, student=True, smoke_run=smoke)
