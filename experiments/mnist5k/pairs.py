"""ProxConnect++ pair study on mnist5k: W1A1 with any forward/backward pair (METHODS.md 4).

Weights and activations of conv2 and dense binarized by the pair ``--config.pair`` (``bc``,
``pc``, ``proxquant``, ``bnn``, ``bnn+``, ``bnn++``, ``approx_sign``, ``multibit``, or a pair
registered by the user's code), or by a forward and a backward chosen separately
(``--config.pair.forward=sign --config.pair.backward=sign_swish``: any names in
``qflax.quantizers.FORWARDS`` / ``BACKWARDS``); each run writes the pair's ProxConnect++
criterion into ``summary.json`` (``pair_criterion``) and its plot (``pair_*.png``). Weights
scaled per output channel by ``sg(mean|w|)`` (``--config.recipe_kwargs.scaling=none`` for plain
±1), stem and head
in float, latent weights kept in [-1, 1] (BinaryConnect), hardtanh in place of the model's ReLUs
(the sign of a ReLU output is +1 everywhere, so a binarized input after a ReLU carries nothing;
the float model it starts from is built the same way). Pairs with a ``μ`` anneal it
geometrically from the recipe's value (BNN++: 5) to ``anneal.mu_end`` = 50, so BNN++'s forward
ends near ``sign``. Training ends with the exact W1A1 model: pairs whose forward is not a sign
(``pc``, ``proxquant`` — whose forward is the identity — and ``bnn++``) switch to ``sign`` for
the final evaluation and checkpoint; ``summary.json`` has ``blended_test_accuracy`` (their
training-time forward) and ``test_accuracy`` (exact). Default: fine-tuned from the float CNN
(trained first in WORKDIR/teacher, cross-entropy on the labels); variant ``scratch``: a fresh
initialisation. 15 epochs, Adam 1e-3.

    qflax train --config experiments/mnist5k/pairs.py --config.pair=bnn++ \\
        --config.teacher.mode=checkpoint --config.teacher.path=runs/mnist5k/fp-ht-s0 --workdir DIR
    qflax train --config experiments/mnist5k/pairs.py:scratch --config.pair=bnn --workdir DIR
    qflax train --config experiments/mnist5k/pairs.py --config.pair=bnn++ \\
        --config.dataset=digits --config.epochs=5 --workdir /tmp/pairs       # under a minute
    qflax train --config experiments/mnist5k/pairs.py --config.pair.forward=sign \\
        --config.pair.backward=sign_swish --config.dataset=digits --config.epochs=2 --workdir DIR

Expected (mnist5k, 3 seeds, exact W1A1; float hardtanh CNN 97.37): fine-tuned BNN 96.33,
BNN+ 96.43, BC 96.60, PC 96.57, BNN++ 92.80, ProxQuant 76.83 (table and MLP rows in
experiments/mnist5k/README.md).
"""

from experiments.mnist5k import fp


def get_config(variant: str | None = None):
    """W1A1 with ``pair`` (default ``bnn++``); ``"scratch"``: no float start; ``"smoke"``:
    digits, 2 epochs."""
    if variant not in (None, "smoke", "scratch"):
        raise ValueError(f"variant={variant!r} is not known; allowed: 'scratch', 'smoke' or none")
    config = fp.get_config("smoke" if variant == "smoke" else None)
    config.epochs = 15 if variant != "smoke" else 2
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_epochs = 0.0
    config.quant.recipe = "binary"
    config.quant.first_last_float = True
    config.quant.latent_clip = 1.0
    config.model_kwargs.activation = "hardtanh"  # sign(relu(x)) would be +1 everywhere
    config.pair.name = "bnn++"  # --config.pair=NAME, or --config.pair.forward/backward
    with config.unlocked():  # (re-locks every group on exit, open ones too: set them inside)
        config.recipe_kwargs.scaling = "channel"
    config.anneal.mu_end = 50.0
    if variant != "scratch":
        config.teacher.mode = "train"
        config.teacher.init_student = True
        config.teacher.weight = 0.0  # the float model is the start, not a target
    return config
