"""The rows of the latent-code experiments (``codec.py``: autoencoder rate–distortion;
``split.py``: split classifier), shared by the configs and ``experiments/latent_sweep.py``.

Codec rows quantize the conv autoencoder's 4-channel latent vectors (a 7×7 grid for 28×28
images) at three rates of about 6, 8 and 10 bits per vector, for each latent quantizer; the
code sizes (log2 of the codebook) are in the tables. Q2D2 rows name the lattice and the levels
per channel of each pair (``hex4``: the true hexagonal lattice, 4×4 box: 14 points per pair).
``hex5`` and ``fsq5`` (odd levels: 23 and 25 points per pair) were added after
``experiments/q2d2_packing.py`` showed the hexagonal grid gains over the square one on a bounded
source at 5 levels per channel (+1.4 dB) but not at 4 or 6 (−0.05, −0.42 dB).
"""

from __future__ import annotations

import math

# name -> recipes.latent keywords (None: the float latent)
CODEC_ROWS: dict[str, dict | None] = {
    "float": None,
    "fsq3": {"kind": "fsq", "levels": (3, 3, 3, 3)},
    "fsq4": {"kind": "fsq", "levels": (4, 4, 4, 4)},
    "fsq6": {"kind": "fsq", "levels": (6, 6, 5, 5)},
    "fsq5": {"kind": "fsq", "levels": (5, 5, 5, 5)},
    "rect3": {"kind": "q2d2", "levels": (3, 3, 3, 3), "lattice": "rectangular"},
    "rect4": {"kind": "q2d2", "levels": (4, 4, 4, 4), "lattice": "rectangular"},
    "rect6": {"kind": "q2d2", "levels": (6, 6, 6, 6), "lattice": "rectangular"},
    "hex3": {"kind": "q2d2", "levels": (3, 3, 3, 3), "lattice": "hexagonal"},
    "hex4": {"kind": "q2d2", "levels": (4, 4, 4, 4), "lattice": "hexagonal"},
    "hex6": {"kind": "q2d2", "levels": (6, 6, 6, 6), "lattice": "hexagonal"},
    "hex5": {"kind": "q2d2", "levels": (5, 5, 5, 5), "lattice": "hexagonal"},
    "rhombic2": {"kind": "q2d2", "levels": (2, 2, 2, 2), "lattice": "rhombic"},
    "rhombic3": {"kind": "q2d2", "levels": (3, 3, 3, 3), "lattice": "rhombic"},
    "rhombic4": {"kind": "q2d2", "levels": (4, 4, 4, 4), "lattice": "rhombic"},
    "vq64": {"kind": "vq", "codebook_size": 64, "dim": 4},
    "vq256": {"kind": "vq", "codebook_size": 256, "dim": 4},
    "vq1024": {"kind": "vq", "codebook_size": 1024, "dim": 4},
    "rvq2x8": {"kind": "rvq", "stages": 2, "codebook_size": 8, "dim": 4},
    "rvq2x16": {"kind": "rvq", "stages": 2, "codebook_size": 16, "dim": 4},
    "rvq2x32": {"kind": "rvq", "stages": 2, "codebook_size": 32, "dim": 4},
}

# The methods (curves) of the rate–distortion plot, in order, and their rows.
CODEC_METHODS = {
    "FSQ": ("fsq3", "fsq4", "fsq5", "fsq6"),
    "Q2D2 rectangular": ("rect3", "rect4", "rect6"),
    "Q2D2 hexagonal": ("hex3", "hex4", "hex5", "hex6"),
    "Q2D2 rhombic": ("rhombic2", "rhombic3", "rhombic4"),
    "VQ (k-means, EMA)": ("vq64", "vq256", "vq1024"),
    "RVQ (2 stages)": ("rvq2x8", "rvq2x16", "rvq2x32"),
}

# Split rows: bits per transmitted value -> the number of levels K (None: the float cut).
SPLIT_BITS: dict[str, int | None] = {
    "float": None,
    "bits1": 2,
    "bits2": 4,
    "bits4": 16,
    "bits8": 256,
    "bits16": 65536,
}


def split_levels(row: str) -> int | None:
    """K of a split row: ``bitsN`` (2^N levels), ``kK`` (any K, e.g. the entropy-chosen one),
    or None for ``float``; ValueError names the allowed rows."""
    if row in SPLIT_BITS:
        return SPLIT_BITS[row]
    if row.startswith("k") and row[1:].isdigit() and 2 <= int(row[1:]) <= 65536:
        return int(row[1:])
    raise ValueError(
        f"variant={row!r} is not known; allowed: {', '.join(SPLIT_BITS)}, 'k<K>' (2 <= K <= "
        "65536), 'smoke' or '<row>-smoke'"
    )


def bits_of(row: str) -> float:
    """Nominal bits per transmitted value of a split row (16 for the float cut sent as 16-bit)."""
    k = split_levels(row)
    return 16.0 if k is None else float(math.ceil(math.log2(k)))


def parse_variant(variant: str | None, default: str) -> tuple[str, bool]:
    """``(row, smoke)`` of a config variant: ``ROW``, ``ROW-smoke`` or ``smoke``."""
    row = variant or default
    if row == "smoke":
        return default, True
    if row.endswith("-smoke"):
        return row[: -len("-smoke")], True
    return row, False
