"""CoDeQ on mnist5k: joint pruning and quantization with learned dead-zones (METHODS.md 6).

Every conv/dense layer's weights (stem and head too: a float stem alone is over 5% of the
float model's bit-operations) on CoDeQ's dead-zone grid with a learned dead-zone width and a
learned bit-width in [2, 8]; activations 8-bit absmax. Decoupled decay on the dead-zone
parameters (``quant.deadzone_decay``, the sparsity knob) and on the bit-width parameters
(``quant.bits_decay``) in the one optax chain; fine-tuned from the float CNN with
cross-entropy, 15 epochs, Adam 1e-3 (1e-2 for the θ's). ``summary.json`` reports sparsity, bits
per layer and ``bops_sparse`` (bit-operations of the nonzero weights).

How strong a decay is: a θ steps by ``−lr·(u + decay·θ)``, ``u`` Adam's direction clipped to ±1
(``quant.max_update``), so a θ the loss keeps pushing up settles near ``1/decay``: bits
``round(6·tanh(1/decay) + 2)`` (decay 4: 3-4 bits) and a dead-zone half-width
``a·(1 − tanh(1/decay))`` (decay 1: 0.24·a, 4: 0.76·a, 16: 0.94·a; ``a`` the 0.99-quantile of
``|w|``). (Before the decay was moved after the clip, θ could move only ``lr`` per step and the
sweep stalled at 75% sparsity and 6 bits.)

    qflax train --config experiments/mnist5k/codeq.py --config.quant.deadzone_decay=0.5 \\
        --config.teacher.mode=checkpoint --config.teacher.path=runs/mnist5k-fp --workdir DIR
    qflax train --config experiments/mnist5k/codeq.py --config.dataset=digits \\
        --config.epochs=5 --workdir /tmp/codeq       # under a minute, trains its teacher

Expected (mnist5k, 3 seeds; float 97.63): dead-zone decay 1: 97.17, 84.5% sparse, 2 bits,
0.56% of the float bit-operations; decay 2 (the default): 97.20, 91.2%, 0.24%; decay 4: 96.30, 96.5%
(experiments/mnist5k/README.md).
"""

from experiments.mnist5k import fp


def get_config(variant: str | None = None):
    """CoDeQ with dead-zone decay 2, bits decay 4; ``"smoke"``: digits, 2 epochs."""
    if variant not in (None, "smoke"):
        raise ValueError(f"variant={variant!r} is not known; allowed: 'smoke' or none")
    config = fp.get_config(variant)
    config.epochs = 15 if variant != "smoke" else 2
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_epochs = 0.0
    config.quant.recipe = "codeq"
    config.quant.first_last_float = False
    config.quant.act_bits = 8
    config.recipe_kwargs.weight_bits = None  # learned (θ_b), not quant.weight_bits
    config.quant.learning_rate = 1e-2
    config.quant.deadzone_decay = 2.0
    config.quant.bits_decay = 4.0
    config.teacher.mode = "train"
    config.teacher.init_student = True
    config.teacher.weight = 0.0
    return config
