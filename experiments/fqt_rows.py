"""The rows of the fully quantized training (FQT) tables, shared by the image and text configs.

Each row sets a base config's quantization (METHODS.md §7); all rows train from scratch with the
same data, model, optimizer and epochs, and keep the first and last layers in float:

* ``float``: float forward and backward;
* ``qat8``: absmax W8A8 (weights per output channel), float gradients (QAT: straight-through);
* ``ptq8`` / ``psq8`` / ``bhq8``: absmax W8A8 forward; each quantized layer's output cotangent
  ∇Y quantized to 8 bits per tensor / per sample / block-Householder, stochastic rounding, two
  independent draws (one for ∇X, one for ∇W);
* ``bhq5``: as ``bhq8`` with 5-bit gradients;
* ``int4``: INT4 Hadamard quantizer forward (block 32, learned LSQ steps), INT4 bit splitting of
  ∇Y (the paper's constants) and leverage-score sampling for ∇W;
* ``int4_unbiased``: as ``int4`` with the unbiased constants (max → 91, lo in [−7, 7]);
* ``int4_plain``: absmax W4A4 per tensor, 4-bit per-tensor stochastic gradients (PTQ).

The rows above draw their rounding noise with ``noise="threefry"`` (``jax.random.uniform``): the
default until 2026-12-05, so their tables reproduce exactly. ``psq8_hash`` and ``bhq8_hash`` are
``psq8`` and ``bhq8`` with the current default, ``noise="hash"`` (a counter hash, exactly uniform
per element and ~8x cheaper on CPU: ``qflax.numerics.hash_uniform``).
"""

from __future__ import annotations

# The noise the published rows were trained with (the default before 2026-12-05).
THREEFRY = {"noise": "threefry"}

ROWS = {
    "float": dict(recipe="none"),
    "qat8": dict(recipe="absmax", bits=8),
    "ptq8": dict(recipe="absmax", bits=8, grad="ptq", grad_bits=8, grad_config=THREEFRY),
    "psq8": dict(recipe="absmax", bits=8, grad="psq", grad_bits=8, grad_config=THREEFRY),
    "bhq8": dict(recipe="absmax", bits=8, grad="bhq", grad_bits=8, grad_config=THREEFRY),
    "bhq5": dict(recipe="absmax", bits=8, grad="bhq", grad_bits=5, grad_config=THREEFRY),
    "int4": dict(
        recipe="hadamard_int4",
        bits=4,
        grad="bitsplit",
        grad_config={"variant": "paper", **THREEFRY},
    ),
    "int4_unbiased": dict(
        recipe="hadamard_int4",
        bits=4,
        grad="bitsplit",
        grad_config={"variant": "unbiased", **THREEFRY},
    ),
    "int4_plain": dict(
        recipe="absmax",
        bits=4,
        grad="ptq",
        grad_bits=4,
        grad_config=THREEFRY,
        recipe_kwargs={"weight_granularity": "tensor"},
    ),
    "psq8_hash": dict(recipe="absmax", bits=8, grad="psq", grad_bits=8),
    "bhq8_hash": dict(recipe="absmax", bits=8, grad="bhq", grad_bits=8),
}

LABELS = {
    "float": "float",
    "qat8": "QAT W8A8 (float gradients)",
    "ptq8": "FQT W8A8, 8-bit PTQ gradients",
    "psq8": "FQT W8A8, 8-bit PSQ gradients",
    "bhq8": "FQT W8A8, 8-bit BHQ gradients",
    "bhq5": "FQT W8A8, 5-bit BHQ gradients",
    "int4": "INT4: HQ forward + bit-split/LSS backward (paper constants)",
    "int4_unbiased": "INT4: HQ forward + bit-split/LSS backward (unbiased constants)",
    "int4_plain": "INT4 plain: per-tensor W4A4 + 4-bit PTQ gradients",
    "psq8_hash": "FQT W8A8, 8-bit PSQ gradients, hash noise (the default)",
    "bhq8_hash": "FQT W8A8, 8-bit BHQ gradients, hash noise (the default)",
}


def apply_row(config, row: str):
    """Sets ``config``'s quantization to ``row`` (a key of :data:`ROWS`); returns it."""
    if row not in ROWS:
        raise ValueError(f"row={row!r} is not known; allowed: {', '.join(ROWS)}")
    spec = ROWS[row]
    config.quant.recipe = spec["recipe"]
    config.quant.first_last_float = True
    if spec["recipe"] == "none":
        return config
    config.quant.weight_bits = spec["bits"]
    config.quant.act_bits = spec["bits"]
    for key, value in spec.get("recipe_kwargs", {}).items():
        config.recipe_kwargs[key] = value
    if "grad" in spec:
        config.recipe_kwargs.grad = spec["grad"]
        if "grad_bits" in spec:
            config.recipe_kwargs.grad_bits = spec["grad_bits"]
        if "grad_config" in spec:
            config.recipe_kwargs.grad_config = dict(spec["grad_config"])
    return config
