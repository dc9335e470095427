"""How much a hexagonal grid can gain over FSQ's square one, measured where it is decided: the
quantization error of 2-D points, at equal points per pair (no model, no training).

For each source of channel pairs in ``[−1, 1]²`` (uniform; a Gaussian of σ = 0.35, clipped; the
tanh of a unit Gaussian, FSQ's and Q2D2's bounded input), each lattice of
:class:`qflax.quantizers.Q2D2Config` (``rectangular`` = FSQ on the pair, ``hexagonal``,
``rhombic``) at 3-16 levels per channel quantizes 200,000 pairs with ``bound=False``; the table
gives the mean squared error per channel against bits per pair (``log2`` of the grid's points)
and each lattice's gain in dB over the square grid at the same bits (the square grid's
``log MSE`` interpolated linearly in bits). High-rate theory bounds the gain of the hexagonal
lattice over the square one by the ratio of their normalised second moments, 0.0833/0.0802 =
0.17 dB, for a source spread evenly over an unbounded plane; a bounded square loses some of it
at the edges, where hexagonal rows do not fit.

    python -m experiments.q2d2_packing            # the table in experiments/README.md
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments import _sweeps
from experiments.latent_sweep import README
from qflax import quantizers as qz

BEGIN, END = "<!-- q2d2 packing begin -->", "<!-- q2d2 packing end -->"
LEVELS = (3, 4, 5, 6, 8, 10, 12, 16)
LATTICES = ("rectangular", "hexagonal", "rhombic")
SAMPLES = 200_000


def sources(key: jax.Array) -> dict[str, jax.Array]:
    """``(SAMPLES, 2)`` pairs in ``[−1, 1]²`` of each source."""
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "uniform": jax.random.uniform(k1, (SAMPLES, 2), minval=-1.0, maxval=1.0),
        "Gaussian σ=0.35": jnp.clip(0.35 * jax.random.normal(k2, (SAMPLES, 2)), -1.0, 1.0),
        "tanh(N(0, 1))": jnp.tanh(jax.random.normal(k3, (SAMPLES, 2))),
    }


def curve(z: jax.Array, lattice: str) -> tuple[np.ndarray, np.ndarray]:
    """``(bits, mse)`` per level count."""
    bits, mse = [], []
    for levels in LEVELS:
        config = qz.Q2D2Config(levels=(levels, levels), lattice=lattice, bound=False)
        q = qz.q2d2(z, config)
        bits.append(np.log2(config.grid_sizes[0]))
        mse.append(float(jnp.mean(jnp.square(q - z))))
    return np.asarray(bits), np.asarray(mse)


def gain_db(bits: np.ndarray, mse: np.ndarray, square: tuple[np.ndarray, np.ndarray]) -> list:
    """The square grid's MSE (log-interpolated at ``bits``) over ``mse``, in dB (None outside
    the square grid's range)."""
    sq_bits, sq_mse = square
    out = []
    for b, m in zip(bits, mse, strict=True):
        if not sq_bits[0] <= b <= sq_bits[-1]:
            out.append(None)
            continue
        ref = np.exp(np.interp(b, sq_bits, np.log(sq_mse)))
        out.append(10 * np.log10(ref / m))
    return out


def table() -> str:
    lines = [
        "| source | lattice | levels per channel | points per pair | bits per pair | MSE per "
        "channel | gain over the square grid at equal bits |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = []
    for name, z in sources(jax.random.key(0)).items():
        square = curve(z, "rectangular")
        for lattice in LATTICES:
            bits, mse = curve(z, lattice)
            gains = gain_db(bits, mse, square)
            for levels, b, m, g in zip(LEVELS, bits, mse, gains, strict=True):
                if lattice == "rectangular" and levels not in (4, 8, 16):
                    continue
                gain = "—" if lattice == "rectangular" or g is None else f"{g:+.2f} dB"
                lines.append(
                    f"| {name} | {lattice} | {levels} | {round(2**b)} | {b:.2f} | {m:.2e} | "
                    f"{gain} |"
                )
            if lattice != "rectangular":
                found = [g for g in gains if g is not None]
                summary.append(f"{lattice} on {name}: {min(found):+.2f} to {max(found):+.2f} dB")
    return "\n".join(lines) + "\n\nRange of the gain over the square grid: " + "; ".join(summary)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    text = table()
    print(text)
    if not args.no_write:
        _sweeps.write_block(README, BEGIN, END, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
