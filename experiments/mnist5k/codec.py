"""Latent codes of a convolutional autoencoder on mnist5k: rate against distortion for FSQ,
Q2D2 (rectangular, true hexagonal, rhombic lattices), VQ and residual VQ (METHODS.md §8).

``conv_autoencoder`` (conv 3×3/2 32 → conv 3×3/2 64 → 1×1 to 4 channels; mirrored decoder with
nearest upsampling, sigmoid output): each 28×28 image becomes a 7×7 grid of 4-channel latent
vectors, one code per vector. The ``latent`` slot is quantized by the row's quantizer (rows of
``experiments/latent_rows.py``; default ``hex4``: the true hexagonal Q2D2 lattice, 14 points per
channel pair, 7.6 bits per vector); the encoder and decoder stay float. Trained on the squared
error (plus VQ's codebook and commitment losses), Adam 2e-3 cosine, batch 128, 15 epochs; the
score is the test PSNR (images in [0, 1]); ``summary.json`` also holds ``bits_per_vector``,
``bits_per_sample`` (49 codes), ``utilisation`` (perplexity of the code frequencies over the
codebook size) and ``bytes_per_sample``.

    qflax train --config experiments/mnist5k/codec.py --workdir runs/latent/codec-hex4-s0
    qflax train --config experiments/mnist5k/codec.py:vq256 --workdir runs/latent/codec-vq256-s0
    qflax train --config experiments/mnist5k/codec.py --config.dataset=digits --config.epochs=2 \\
        --workdir /tmp/codec     # seconds (8×8 digits: a 2×2 grid of vectors)
    python -m experiments.latent_sweep --sets codec    # the table and plot in experiments/README.md

Expected: see the latent-code tables in experiments/README.md (3 seeds per row).
"""

from experiments import latent_rows
from experiments.mnist5k import fp


def get_config(variant: str | None = None):
    """Codec row ``variant`` (default ``hex4``; ``<row>-smoke`` / ``smoke``: digits, 1 epoch)."""
    row, smoke = latent_rows.parse_variant(variant, "hex4")
    if row not in latent_rows.CODEC_ROWS:
        raise ValueError(
            f"variant={variant!r} is not known; allowed: {', '.join(latent_rows.CODEC_ROWS)}, "
            "'smoke' or '<row>-smoke'"
        )
    config = fp.get_config("smoke" if smoke else None)
    config.model = "conv_autoencoder"
    config.model_kwargs.latent_dim = 4
    config.epochs = 1 if smoke else 15
    config.optimizer.learning_rate = 2e-3
    config.checkpoint.every_epochs = 5
    latent = latent_rows.CODEC_ROWS[row]
    if latent is not None:
        config.quant.rules = (("^latent$", "latent", dict(latent)),)
    return config
