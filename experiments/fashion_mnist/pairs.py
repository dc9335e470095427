"""ProxConnect++ pairs on the Fashion-MNIST CNN (METHODS.md 4): W1A1 with any pair, and
BinaryConnect as its authors ran it, with binary weights only (W1A32).

``experiments/mnist5k/pairs.py`` (conv2 and dense binarized by ``--config.pair``, weights scaled
per output channel by ``sg(mean|w|)``, latent weights clipped to [-1, 1], μ annealed to 50,
the exact sign model evaluated at the end, cross-entropy, Adam 1e-3), 10 epochs fine-tuned from
the hardtanh float teacher (``fp.py:ht``). Variant ``w1a32``: weights only
(``recipe_kwargs.act=False``), the ReLU CNN and its teacher (``fp.py``): BinaryConnect
(Courbariaux et al. 2015) binarizes weights, not activations. Variants ``vit`` and
``vit-w1a32``: the same on the small ViT (``fp.py:vit``; every attention and MLP projection
binarized, the patch embedding and head float) for the BNN++ study.

    qflax train --config experiments/fashion_mnist/pairs.py --config.pair=bnn \\
        --config.teacher.mode=checkpoint --config.teacher.path=runs/fashion_mnist/fp-ht-s0 \\
        --workdir runs/fashion_mnist/pairs-bnn-s0
    qflax train --config experiments/fashion_mnist/pairs.py:w1a32 --config.pair=bc \\
        --config.teacher.mode=checkpoint --config.teacher.path=runs/fashion_mnist/fp-s0 \\
        --workdir runs/fashion_mnist/bc-w1a32-s0

Expected: W1A1 pairs 3-8 points under the fine-tuned hardtanh reference (``fp_ft.py:ce-ht``;
mnist5k: 1-1.5 points on an easier set), ProxQuant far below (its forward is the identity
until the final switch to sign); BinaryConnect W1A32 within ~2 points of ``fp_ft.py:ce``.
Measured (3 seeds, 2026-12-06; vs ``fp_ft.py:ce-ht`` 90.13): BC 88.62, PC 88.62, ProxQuant
68.63 (relaxed 90.01), BNN 88.54, BNN+ 88.66, BNN++ 86.76 (relaxed 88.40); BC W1A32 89.39
(−0.09 vs ``fp_ft.py:ce``). BNN++ study (CNN and ViT, W1A1 and W1A32): BNN++ < BNN in every
setting; experiments/fashion_mnist/README.md.
"""

from experiments.fashion_mnist import _base
from experiments.mnist5k import pairs

VARIANTS = (None, "smoke", "w1a32", "vit", "vit-w1a32")


def get_config(variant: str | None = None):
    """W1A1 with ``pair`` (default ``bnn++``); ``"w1a32"``: binary weights only (ReLU CNN);
    ``"vit"``, ``"vit-w1a32"``: the small ViT; ``"<variant>-smoke"``: digits, 2 epochs."""
    base = _base.base_variant(variant)
    if base not in VARIANTS:
        raise ValueError(
            f"variant={variant!r} is not known; allowed: {', '.join(map(repr, VARIANTS[1:]))}, "
            "'<variant>-smoke' or none"
        )
    smoke = _base.smoke(variant)
    config = pairs.get_config("smoke" if smoke else None)
    if base in ("vit", "vit-w1a32"):
        _base.vit(config, smoke_run=smoke)
    elif base == "w1a32":
        config.model_kwargs.activation = "relu"
    if base in ("w1a32", "vit-w1a32"):
        with config.unlocked():
            config.recipe_kwargs.act = False
    return _base.fashion(config, student=True, smoke_run=smoke)
