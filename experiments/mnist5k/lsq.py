"""LSQ baseline on the mnist5k CNN, trained exactly like GDNSQ but with fixed bit-widths.

Esser et al. 2020 (arXiv:1902.08153), METHODS.md 2: learned step per tensor with the gradient
scale ``1/√(numel·QP)`` and the init ``2·mean|x|/√QP``; weights signed, activations unsigned
(after ReLU). Same budget as ``gdnsq.py`` so that the two compare: student initialised from the
float CNN, Jeffreys distillation from it, 15 epochs at batch 32 (cosine decay), Adam 1e-3 for
weights and 1e-2 for the steps, stem and head in float.

    qflax train --config experiments/mnist5k/lsq.py --config.target_bits=2 \\
        --config.teacher.mode=checkpoint --config.teacher.path=runs/mnist5k/fp-s0 \\
        --workdir runs/mnist5k/lsq-w2a2-s0

Expected: see the table in experiments/mnist5k/README.md (mean of three seeds at W4A4 and
W2A2; made by ``python -m experiments.mnist5k.sweep``).
"""

from experiments.mnist5k import gdnsq


def get_config(variant: str | None = None):
    """LSQ at ``target_bits`` (default 4); ``"smoke"``: digits, 2 epochs."""
    if variant not in (None, "smoke"):
        raise ValueError(f"variant={variant!r} is not known; allowed: 'smoke' or none")
    config = gdnsq.get_config(variant)
    config.quant.recipe = "lsq"
    config.quant.learning_rate = 1e-2
    config.recipe_kwargs = {}
    # GDNSQ decays its rates once within target; a fixed-bit baseline gets a cosine decay
    # (with a constant rate its last epoch swung by up to 3 points: LSQ W4A4 seed 2 0.943).
    config.optimizer.schedule = "cosine"
    return config
