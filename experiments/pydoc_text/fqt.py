"""Fully quantized training of the pydoc_text character transformer: quantized weights,
activations *and gradients*.

Chen et al. 2020 (METHODS.md §7): every quantized layer's output cotangent ∇Y is quantized with
stochastic rounding twice, independently, once for ∇X and once for ∇W, so the gradient is an
unbiased estimator of the QAT gradient; and Xi et al. 2023's INT4 training (Hadamard quantizer
forward, bit splitting and leverage-score sampling backward). The default is 8-bit
block-Householder gradients (``bhq8``) with absmax W8A8; variants are the rows of
``experiments/fqt_rows.py``: ``float``, ``qat8``, ``ptq8``, ``psq8``, ``bhq8``, ``bhq5``, ``int4``,
``int4_unbiased``, ``int4_plain`` (each also ``<row>-smoke``: 1 epoch of 32-character windows).
From scratch, 4 epochs, the float config of experiments/pydoc_text/fp.py; the head float (the
embedding is never quantized; attention's score and value products stay float).

    qflax train --config experiments/pydoc_text/fqt.py --workdir runs/fqt/pydoc-bhq8-s0
    qflax train --config experiments/pydoc_text/fqt.py:psq8 --workdir runs/fqt/pydoc-psq8-s0
    qflax train --config experiments/pydoc_text/fqt.py --config.epochs=1 \\
        --config.dataset_kwargs.seq_len=32 --workdir /tmp/fqt     # seconds
    python -m experiments.fqt_sweep --sets pydoc_text        # the table in experiments/README.md

Expected: see the FQT table in experiments/README.md (3 seeds).
"""

from experiments import fqt_rows
from experiments.pydoc_text import fp


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
    config.epochs = 1 if smoke else 4
    config.checkpoint.every_epochs = 2
    return fqt_rows.apply_row(config, row)
