"""The foundation's main job: every quantizer in the library on real bundled data.

Quantizes three real tensors — the mnist5k test images (1,000 × 784, values in [0, 1]) and the
two weight matrices of a small MLP fitted to the mnist5k training split — with every quantizer,
and reports the reconstruction error as SQNR (dB, ``10·log10(Σx² / Σ(x − x̂)²)``), the fraction
of the quantizer's available levels that were actually used, and the test accuracy of the MLP
when both its weight matrices are replaced by their quantized values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Entry", "entries", "quantizer_report", "format_table", "sqnr_db"]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row: a quantizer applied to a tensor.

    ``apply(x, channel_axis, contraction_axis)`` returns ``(x_hat, codes, num_levels)``;
    ``codes``/``num_levels`` are None where levels are not countable. Per-channel statistics run
    along the output (channel) axis, groups along the contraction (input) axis.
    """

    family: str
    name: str
    apply: Callable[[jax.Array, int, int], tuple[jax.Array, jax.Array | None, int | None]]


def sqnr_db(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when the reconstruction is exact)."""
    x = np.asarray(x, np.float64)
    err = float(np.sum((x - np.asarray(x_hat, np.float64)) ** 2))
    sig = float(np.sum(x**2))
    return float("inf") if err == 0 else 10.0 * np.log10(sig / err)


def _uniform_entry(name: str, calibrate: str | None = None, **cfg) -> Entry:
    from qflax import calibration as cal
    from qflax import quantizers as qz

    def apply(x, axis, contraction_axis):
        fields = dict(cfg)
        granularity = fields.get("granularity", "tensor")
        if granularity != "tensor":
            fields["axis"] = contraction_axis if granularity == "group" else axis
        config = qz.UniformConfig(**fields)
        if calibrate is None:
            params = qz.uniform_init(x, config)
        else:
            common = dict(
                bits=config.bits,
                signed=config.signed,
                narrow_range=config.narrow_range,
                granularity=config.granularity,
                axis=config.axis,
                group_size=config.group_size,
            )
            fn = {"percentile": cal.percentile, "mse": cal.mse}[calibrate]
            scale, zero_point = fn(x, symmetric=config.symmetric, **common)
            params = {"scale": scale, "zero_point": zero_point}
        x_hat = qz.uniform(x, params, config)
        codes = qz.uniform_codes(x, params, config)
        return x_hat, codes, config.qmax - config.qmin + 1

    return Entry("uniform", name, apply)


def _pow2_entry(name: str, **cfg) -> Entry:
    from qflax import quantizers as qz

    def apply(x, axis, contraction_axis):
        fields = dict(cfg)
        granularity = fields.get("granularity", "tensor")
        if granularity != "tensor":
            fields["axis"] = contraction_axis if granularity == "group" else axis
        config = qz.PowerOfTwoConfig(**fields)
        params = qz.pow2_init(x, config)
        levels = 2**config.bits - (1 if config.zero else 0)
        return qz.pow2(x, params, config), qz.pow2_codes(x, params, config), levels

    return Entry("power-of-two", name, apply)


def _binary_entry(name: str, stochastic: bool = False, **cfg) -> Entry:
    """Deterministic: ``binary(x)``. Stochastic: ``m·binary(x/m)`` with ``m = max|x|``, so the
    latent value lies in [−1, 1] as BinaryConnect assumes and ``E[x̂] = x``."""
    from qflax import quantizers as qz

    def apply(x, axis, contraction_axis):
        config = qz.BinaryConfig(stochastic=stochastic, axis=axis, **cfg)
        if stochastic:
            m = jnp.maximum(jnp.max(jnp.abs(x)), 1e-12)
            key = jax.random.PRNGKey(0)
            x_hat = m * qz.binary(x / m, qz.binary_init(x, config), config, key=key)
        else:
            x_hat = qz.binary(x, qz.binary_init(x, config), config)
        return x_hat, (x_hat > 0).astype(jnp.int32), 2

    return Entry("binary", name, apply)


def _ternary_entry(name: str, **cfg) -> Entry:
    from qflax import quantizers as qz

    def apply(x, axis, contraction_axis):
        config = qz.TernaryConfig(axis=axis, **cfg)
        params = qz.ternary_init(x, config)
        return qz.ternary(x, params, config), qz.ternary_codes(x, params, config), 3

    return Entry("ternary", name, apply)


def _pair_entry(pair_name: str, levels: int | None, **hyper) -> Entry:
    """A ProxConnect++ pair's forward quantizer, applied as ``α·F(x/α)``, ``α = mean|x|``."""
    from qflax import quantizers as qz

    def apply(x, axis, contraction_axis):
        alpha = jnp.maximum(jnp.mean(jnp.abs(x)), 1e-12)
        q = qz.PAIRS[pair_name](**hyper)
        x_hat = alpha * q(x / alpha)
        # the level index of y = F(x/α) ∈ {(2k − m)/m}: k = (y + 1)·m/2, m = levels − 1
        codes = None
        if levels:
            codes = jnp.round((x_hat / alpha + 1) * (levels - 1) / 2).astype(jnp.int32)
        return x_hat, codes, levels

    label = pair_name + "".join(f" {k}={v:g}" for k, v in hyper.items())
    return Entry("pair (α·F(x/α))", label, apply)


def entries() -> list[Entry]:
    """Every quantizer of the library, in the configurations the report shows."""
    rows = [
        _uniform_entry("int8 per-tensor", bits=8),
        _uniform_entry("int4 per-tensor", bits=4),
        _uniform_entry("int4 per-channel", bits=4, granularity="channel"),
        _uniform_entry("int4 per-group (16)", bits=4, granularity="group", group_size=16),
        _uniform_entry(
            "int4 per-channel, percentile", calibrate="percentile", bits=4, granularity="channel"
        ),
        _uniform_entry(
            "int4 per-channel, MSE clip", calibrate="mse", bits=4, granularity="channel"
        ),
        _uniform_entry("uint4 asymmetric (min/max)", bits=4, signed=False, symmetric=False),
        _uniform_entry("int2 per-channel", bits=2, granularity="channel"),
        _pow2_entry("pow2 4-bit, zero", bits=4, zero=True),
        _pow2_entry("pow2 4-bit per-channel", bits=4, zero=True, granularity="channel"),
        _pow2_entry("pow2 3-bit, no zero", bits=3, zero=False),
        _binary_entry("sign", scaling="none"),
        _binary_entry("sign·mean|w| per channel", scaling="channel"),
        _binary_entry("stochastic sign, m·q(x/m)", stochastic=True, scaling="none"),
        _ternary_entry("ternary Δ=0.7·mean|w| (TWN)", scaling="tensor"),
        _ternary_entry("ternary per channel", scaling="channel"),
    ]
    rows += [
        _pair_entry("bc", 2),
        _pair_entry("bnn", 2),
        _pair_entry("bnn+", 2),
        _pair_entry("approx_sign", 2),
        _pair_entry("pc", None, mu=1.0),
        _pair_entry("proxquant", None, mu=1.0),
        _pair_entry("bnn++", None, mu=5.0),
        _pair_entry("multibit", 4, bits=2),
    ]
    return rows


def _fit_mlp(seed: int):
    """Fits a 784-64-10 MLP (scikit-learn, about a second) to the mnist5k training split.

    BLAS runs on one thread: its matrices are small, and threads that wait for busy cores made
    the fit ~10x slower (and the result depend on the thread count)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    from qflax import data

    ds = data.load("mnist5k", seed=seed)
    train_x = ds.train_x.reshape(len(ds.train_x), -1)
    test_x = ds.test_x.reshape(len(ds.test_x), -1)
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = MLPClassifier(hidden_layer_sizes=(64,), max_iter=30, random_state=seed)
        mlp.fit(train_x, ds.train_y)
    return mlp, test_x.astype(np.float32), np.asarray(ds.test_y)


def _mlp_accuracy(mlp, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    h = np.maximum(x @ weights[0] + mlp.intercepts_[0], 0.0)
    logits = h @ weights[1] + mlp.intercepts_[1]
    return float(np.mean(np.argmax(logits, axis=1) == y))


def quantizer_report(seed: int = 0):
    """Runs every entry on the images and both weight matrices.

    Returns ``(rows, context)``: one dict per entry with SQNR and levels-used per tensor and the
    MLP accuracy with quantized weights; ``context`` holds the float accuracy and tensor shapes.
    """
    mlp, test_x, test_y = _fit_mlp(seed)
    # name -> (tensor, channel axis, contraction axis)
    tensors = {
        "images": (jnp.asarray(test_x), -1, -1),
        "W1": (jnp.asarray(mlp.coefs_[0], jnp.float32), -1, 0),
        "W2": (jnp.asarray(mlp.coefs_[1], jnp.float32), -1, 0),
    }
    float_weights = [np.asarray(tensors["W1"][0]), np.asarray(tensors["W2"][0])]
    context = {
        "float_accuracy": _mlp_accuracy(mlp, float_weights, test_x, test_y),
        "shapes": {k: tuple(v[0].shape) for k, v in tensors.items()},
    }
    rows = []
    for entry in entries():
        row = {"family": entry.family, "name": entry.name}
        quantized = {}
        for tname, (x, axis, contraction_axis) in tensors.items():
            x_hat, codes, levels = entry.apply(x, axis, contraction_axis)
            x_hat = np.asarray(x_hat)
            quantized[tname] = x_hat
            row[f"{tname}_sqnr"] = sqnr_db(np.asarray(x), x_hat)
            if codes is None or levels is None:
                row[f"{tname}_levels"] = None
            else:
                row[f"{tname}_levels"] = len(np.unique(np.asarray(codes))) / levels
        row["mlp_accuracy"] = _mlp_accuracy(mlp, [quantized["W1"], quantized["W2"]], test_x, test_y)
        rows.append(row)
    return rows, context


def format_table(rows, context) -> str:
    """A plain-text table of the report."""
    shapes = context["shapes"]
    header = (
        f"{'family':<17} {'quantizer':<30} "
        + " ".join(f"{t + ' dB':>10} {t + ' lv':>8}" for t in shapes)
        + f" {'MLP acc':>8}"
    )
    lines = [
        "Quantizers on bundled data: mnist5k test images "
        f"{shapes['images']}, MLP weights W1 {shapes['W1']} and W2 {shapes['W2']}",
        "dB = SQNR of the reconstruction; lv = fraction of the available levels used;",
        "MLP acc = test accuracy with both weight matrices quantized "
        f"(float: {context['float_accuracy']:.3f})",
        "pair rows measure the forward F only (pairs sharing F differ only in their gradient);",
        "proxquant's forward is the identity, so it reconstructs exactly.",
        "",
        header,
        "-" * len(header),
    ]
    for row in rows:
        cells = []
        for t in shapes:
            lv = row[f"{t}_levels"]
            cells.append(f"{row[f'{t}_sqnr']:>10.2f} {('—' if lv is None else f'{lv:.2f}'):>8}")
        lines.append(
            f"{row['family']:<17} {row['name']:<30} "
            + " ".join(cells)
            + f" {row['mlp_accuracy']:>8.3f}"
        )
    return "\n".join(lines)
