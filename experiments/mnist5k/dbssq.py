"""DBSSQ on mnist5k: differentiable bit-shifting, fine-tuned from the float CNN (METHODS.md 5).

conv2 and dense weights normalised per output channel and quantized to shift-2 levels
(``sign·2^−k``, 4 magnitudes: 3 bits stored) through the blend ``ε·w + (1 − ε)·Q(w)``, ``ε``
following the paper's 15-epoch schedule (1 → 1/128, then 0 for the final evaluation and the
checkpoint: the exact quantizer); the gradient rescaled by 1/ε. ``summary.json`` has both
``blended_test_accuracy`` (last ε) and ``test_accuracy`` (ε = 0). Variants: ``wa`` (activations
too, batch-normalised without affine parameters), ``w1`` (1-bit weights: ``uniform`` levels,
±1), ``w1a1``. Stem and head in float; cross-entropy on the labels; 15 epochs, Adam 1e-3.

    qflax train --config experiments/mnist5k/dbssq.py --config.teacher.mode=checkpoint \\
        --config.teacher.path=runs/mnist5k-fp --workdir runs/mnist5k-dbssq-w
    qflax train --config experiments/mnist5k/dbssq.py --config.dataset=digits \\
        --config.epochs=5 --workdir /tmp/dbssq       # under a minute, trains its teacher

Expected (mnist5k, 3 seeds; float 97.63): weight-only shift-2 97.67, ``wa`` 97.37, ``w1``
97.27, ``w1a1`` 95.97 (experiments/mnist5k/README.md).
"""

from experiments.mnist5k import fp


def get_config(variant: str | None = None):
    """Weight-only shift-2 DBSSQ; ``"wa"``, ``"w1"``, ``"w1a1"``; ``"smoke"``: digits."""
    if variant not in (None, "smoke", "wa", "w1", "w1a1"):
        raise ValueError(
            f"variant={variant!r} is not known; allowed: 'wa', 'w1', 'w1a1', 'smoke' or none"
        )
    config = fp.get_config("smoke" if variant == "smoke" else None)
    config.epochs = 15 if variant != "smoke" else 2
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_epochs = 0.0
    config.quant.recipe = "dbssq"
    config.quant.first_last_float = True
    one_bit = variant in ("w1", "w1a1")
    config.quant.weight_bits = 1 if one_bit else 2
    config.quant.act_bits = (1 if one_bit else 2) if variant in ("wa", "w1a1") else 32
    config.recipe_kwargs.levels = "uniform" if one_bit else "shift"
    config.teacher.mode = "train"
    config.teacher.init_student = True
    config.teacher.weight = 0.0
    return config
