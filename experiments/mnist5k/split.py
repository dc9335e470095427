"""Split learning on mnist5k: the CNN cut after its second block, the activations sent across
the cut compressed to K-level integer codes (Quantized-TinyLLaVA; METHODS.md §8).

``split_cnn``: the ``cnn`` (conv 32 → conv 64, BatchNorm, pools; dense 128 → head) with a cut
after the second block: each of the 7×7 positions goes from 64 features down to 16
(``split_down``, linear), through the ``split`` slot, and back up to 64 (``split_up``). The slot
is quantized by ``recipes.latent("split", levels=K)``: per sample, clip to μ ± 3σ, K-level codes
with a straight-through gradient, μ and σ sent as float16, alignment loss
``0.25·(1 − cos(x, sg(x̂)))``. Rows (``experiments/latent_rows.py``): ``float`` (the
uncompressed cut; counted as 16-bit values), ``bits1`` … ``bits16`` (K = 2^bits), ``k<K>`` (any
K, e.g. the one chosen from the entropy of the codes by ``experiments/latent_sweep.py``). Adam
3e-3 cosine, batch 128, 15 epochs, from scratch; ``summary.json`` holds ``bytes_per_sample``
(the packed codes plus μ, σ).

    qflax train --config experiments/mnist5k/split.py --workdir runs/latent/split-bits2-s0
    qflax train --config experiments/mnist5k/split.py:bits8 --workdir runs/latent/split-bits8-s0
    qflax train --config experiments/mnist5k/split.py --config.dataset=digits --config.epochs=2 \\
        --workdir /tmp/split     # seconds
    python -m experiments.latent_sweep --sets split    # the table in experiments/README.md

Expected: see the latent-code tables in experiments/README.md (3 seeds per row).
"""

from experiments import latent_rows
from experiments.mnist5k import fp


def get_config(variant: str | None = None):
    """Split row ``variant`` (default ``bits2``; ``<row>-smoke`` / ``smoke``: digits, 1 epoch)."""
    row, smoke = latent_rows.parse_variant(variant, "bits2")
    levels = latent_rows.split_levels(row)
    config = fp.get_config("smoke" if smoke else None)
    config.model = "split_cnn"
    config.model_kwargs.split_dim = 16
    config.epochs = 1 if smoke else 15
    config.checkpoint.every_epochs = 5
    if levels is not None:
        config.quant.rules = (("^split$", "latent", {"kind": "split", "levels": levels}),)
    return config
