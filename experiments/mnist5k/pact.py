"""PACT baseline on the mnist5k CNN: learned activation clip with DoReFa weights.

Choi et al. 2018 (arXiv:1805.06085), METHODS.md 2: ``clip(x, 0, α)`` quantized on ``2^b``
levels with ``∂/∂α = 1[x ≥ α]`` and an L2 term on ``α`` (``quant.clip_decay``); weights by
DoReFa (as the paper). α starts at the calibration batch's maximum (the paper starts at 10 for
ImageNet-sized activations; ``--config.recipe_kwargs.init_alpha=10.0`` restores that). Same
budget as ``gdnsq.py``: student initialised from the float CNN, Jeffreys distillation, 15
epochs at batch 32, stem and head in float.

    qflax train --config experiments/mnist5k/pact.py --config.target_bits=2 \\
        --config.teacher.mode=checkpoint --config.teacher.path=runs/mnist5k/fp-s0 \\
        --workdir runs/mnist5k/pact-w2a2-s0

Expected: see the table in experiments/mnist5k/README.md (mean of three seeds at W4A4 and
W2A2; made by ``python -m experiments.mnist5k.sweep``).
"""

from experiments.mnist5k import gdnsq


def get_config(variant: str | None = None):
    """PACT at ``target_bits`` (default 4); ``"smoke"``: digits, 2 epochs."""
    if variant not in (None, "smoke"):
        raise ValueError(f"variant={variant!r} is not known; allowed: 'smoke' or none")
    config = gdnsq.get_config(variant)
    config.quant.recipe = "pact"
    config.quant.learning_rate = 1e-2
    config.quant.clip_decay = 1e-4
    config.recipe_kwargs = {}
    # GDNSQ decays its rates once within target; a fixed-bit baseline gets a cosine decay
    # (with a constant rate its last epoch swung by up to 3 points: LSQ W4A4 seed 2 0.943).
    config.optimizer.schedule = "cosine"
    return config
