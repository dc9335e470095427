"""The pydoc_text character transformer with a quantized token embedding (``QuantEmbed``).

The float config of experiments/pydoc_text/fp.py (width 64, 2 blocks, 4 epochs from scratch)
with only its embedding (``stem``, 103 symbols × 64) quantized: the table's codes at 8, 4 and 2
bits with one learned step per token (``learned_step`` weights: LSQ-style steps initialised from
each row's absmax and trained with the model, ``quant.relative_steps`` at a quantizer learning
rate of 1e-2 — each update moves a step by at most 1% of itself; with absolute updates the
8-bit steps, ~1/127 of a row's range, went negative on every seed; the lookup has no
activation quantizer), every other layer float — so a row measures what the embedding's
precision alone costs. Rows: ``float``, ``emb8``, ``emb4``, ``emb2`` (``<row>-smoke``: 1
epoch of 32-character windows; ``smoke``: ``emb4-smoke``).

    qflax train --config experiments/pydoc_text/embed.py:emb4 --workdir runs/embed/emb4-s0
    python -m experiments.embed_sweep --jobs 2     # 3 seeds; the table in experiments/README.md

Expected (3 seeds; the float model reaches 3.21 bits per character): 8- and 4-bit embeddings
within 1% of float bits per character, 2 bits within 3%, with the table's packed bytes 4×, 8×
and 16× below float32 plus one float32 step per token. Measured: the embedding table of
experiments/README.md.
"""

from experiments.pydoc_text import fp

# Bits of the embedding table per row (None: float).
ROWS = {"float": None, "emb8": 8, "emb4": 4, "emb2": 2}


def get_config(variant: str | None = None):
    """Row ``variant`` of :data:`ROWS` (default ``emb4``); ``"<row>-smoke"``: a smoke run."""
    row, smoke = variant or "emb4", False
    if row == "smoke":
        row = "emb4-smoke"
    if row.endswith("-smoke"):
        row, smoke = row[: -len("-smoke")], True
    if row not in ROWS:
        raise ValueError(
            f"variant={variant!r} is not known; allowed: {', '.join(ROWS)}, 'smoke' or "
            "'<row>-smoke'"
        )
    config = fp.get_config("smoke" if smoke else None)
    bits = ROWS[row]
    if bits is not None:
        # The main recipe stays "none" (and no first/last rules): only this rule's layer, the
        # embedding, is quantized; 32-bit "activations": the lookup's ids are not quantized.
        config.quant.first_last_float = False
        config.quant.rules = (("^stem$", "learned_step", {"weight_bits": bits, "act_bits": 32}),)
        config.quant.relative_steps = True
        config.quant.learning_rate = 1e-2
    return config
