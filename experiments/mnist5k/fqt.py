"""Fully quantized training of the mnist5k CNN: quantized weights, activations *and gradients*.

Chen et al. 2020 (METHODS.md §7): every quantized layer's output cotangent ∇Y is quantized with
stochastic rounding twice, independently, once for ∇X and once for ∇W, so the gradient is an
unbiased estimator of the QAT gradient; and Xi et al. 2023's INT4 training (Hadamard quantizer
forward, bit splitting and leverage-score sampling backward). The default is 8-bit
block-Householder gradients (``bhq8``) with absmax W8A8; variants are the rows of
``experiments/fqt_rows.py``: ``float``, ``qat8``, ``ptq8``, ``psq8``, ``bhq8``, ``bhq5``, ``int4``,
``int4_unbiased``, ``int4_plain`` (each also ``<row>-smoke``: digits, 2 epochs). From scratch,
10 epochs, Adam 3e-3 cosine, batch 128; conv1 and the head float.

    qflax train --config experiments/mnist5k/fqt.py --workdir runs/fqt/mnist5k-bhq8-s0
    qflax train --config experiments/mnist5k/fqt.py:psq8 --workdir runs/fqt/mnist5k-psq8-s0
    qflax train --config experiments/mnist5k/fqt.py --config.dataset=digits --config.epochs=2 \\
        --workdir /tmp/fqt     # seconds; summary.json names every layer's gradient quantizer
    python -m experiments.fqt_sweep --sets mnist5k        # the table in experiments/README.md

Expected: see the FQT table in experiments/README.md (3 seeds).
"""

from experiments import fqt_rows
from experiments.mnist5k import fp


def get_config(variant: str | None = None):
    """FQT row ``variant`` (default ``bhq8``); ``"<row>-smoke"`` / ``"smoke"``: a smoke run."""
    row, smoke = variant or "bhq8", False
    if row == "smoke" or row.endswith("-smoke"):
        row, smoke = (row[: -len("-smoke")] or "bhq8") if row != "smoke" else "bhq8", True
    if row not in fqt_rows.ROWS:
        raise ValueError(
            f"variant={variant!r} is not known; allowed: {', '.join(fqt_rows.ROWS)}, 'smoke' "
            "or '<row>-smoke'"
        )
    config = fp.get_config("smoke" if smoke else None)
    config.epochs = 2 if smoke else 10
    config.checkpoint.every_epochs = 5
    return fqt_rows.apply_row(config, row)
