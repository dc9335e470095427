"""DoReFa baseline on the mnist5k CNN: ``tanh``-normalised weights and ``[0, 1]`` activations.

Zhou et al. 2016 (arXiv:1606.06160), METHODS.md 2: weights ``2·q_k(tanh w/(2 max|tanh w|) + ½)
− 1`` (``k = 1``: ``sign(w)·mean|w|``), activations ``q_k(clip(x, 0, 1))``, straight-through
rounding; float gradients. Same budget as ``gdnsq.py``: student initialised from the float CNN,
Jeffreys distillation, 15 epochs at batch 32 (cosine decay), stem and head in float.

    qflax train --config experiments/mnist5k/dorefa.py --config.target_bits=2 \\
        --config.teacher.mode=checkpoint --config.teacher.path=runs/mnist5k/fp-s0 \\
        --workdir runs/mnist5k/dorefa-w2a2-s0

Expected: see the table in experiments/mnist5k/README.md (mean of three seeds at W4A4 and
W2A2; made by ``python -m experiments.mnist5k.sweep``).
"""

from experiments.mnist5k import gdnsq


def get_config(variant: str | None = None):
    """DoReFa at ``target_bits`` (default 4); ``"smoke"``: digits, 2 epochs."""
    if variant not in (None, "smoke"):
        raise ValueError(f"variant={variant!r} is not known; allowed: 'smoke' or none")
    config = gdnsq.get_config(variant)
    config.quant.recipe = "dorefa"
    config.recipe_kwargs = {}
    # GDNSQ decays its rates once within target; a fixed-bit baseline gets a cosine decay
    # (with a constant rate its last epoch swung by up to 3 points: LSQ W4A4 seed 2 0.943).
    config.optimizer.schedule = "cosine"
    return config
