"""Model summaries: per-layer bits, parameters, packed bytes, multiply-accumulates and BOPs.

Built on ``qflax.layers`` (``layer_summaries``, ``count_macs``, ``totals``), for float and
quantized models alike: a float layer stores 32-bit weights and takes 32-bit activations, so a
float model has ``model_bytes = 4 * params`` and ``bops = macs * 32 * 32``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["FLOAT_BITS", "format_table", "summarize_model"]

FLOAT_BITS = 32


def summarize_model(model: nnx.Module, example: jax.Array) -> dict[str, Any]:
    """The size and cost of ``model`` on inputs shaped like ``example`` (one example is used).

    Per layer (every ``Linear``/``Conv``/``Einsum``, quantized or not) from
    ``qflax.layers.layer_summaries`` with MACs from ``qflax.layers.count_macs``; float layers
    have 32-bit weights and activations and 4 bytes per parameter.

    Args:
      model: a model, float or quantized by ``qflax.layers.quantize_model``.
      example: an input batch (only ``example[:1]`` is traced, abstractly).

    Returns:
      A dict with ``layers`` (per layer: ``name``, ``type``, ``recipe``, ``weight_bits``,
      ``act_bits``, ``params``, ``packed_bytes``, ``sparsity``, ``macs``, ``bops``) and totals:
      ``params`` (every parameter but quantizer parameters), ``model_bytes`` (the layers
      packed, every other parameter — norms, embeddings, positions — as float32),
      ``float32_bytes`` (4 per parameter), ``compression`` (float32 / packed), ``macs`` and
      ``bops`` of one example (``bops = sum macs * weight_bits * act_bits``), ``bops_sparse``
      (the same with each layer's zero weights skipped: ``bops·(1 − sparsity)``),
      ``avg_weight_bits`` (parameter-weighted over the layers whose weights are quantized, as
      papers count: float first/last layers are left out; 32 when none is),
      ``avg_act_bits`` (MAC-weighted over the layers whose inputs are quantized),
      ``avg_weight_bits_all`` / ``avg_act_bits_all`` (the same over every layer, float ones
      at 32) and ``sparsity`` (zero weights / weights of the layers).
    """
    from qflax import layers as ql

    example = jnp.asarray(example[:1])
    rows = []
    for row in ql.layer_summaries(model, macs=ql.count_macs(model, example)):
        row = dict(row)
        row["name"] = row.pop("path")
        row["bops"] = int(row["macs"] * row["weight_bits"] * row["act_bits"])
        # Multiplications by an exactly-zero weight can be skipped (pruned weights).
        row["bops_sparse"] = int(row["bops"] * (1.0 - _finite(row["sparsity"])))
        rows.append(row)
    totals = ql.totals(rows)
    # Quantizer parameters (step sizes, ...) are part of the layers' packed bytes.
    weights = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.OfType(ql.QuantParam))))
    total_params = int(sum(np.size(x) for x in jax.tree.leaves(weights)))
    model_bytes = int(totals["packed_bytes"] + 4 * (total_params - totals["params"]))
    return {
        "params": total_params,
        "model_bytes": model_bytes,
        "float32_bytes": 4 * total_params,
        "compression": 4 * total_params / model_bytes if model_bytes else 1.0,
        "macs": int(totals["macs"]),
        "bops": int(totals["bops"]),
        "bops_sparse": int(sum(r["bops_sparse"] for r in rows)),
        "avg_weight_bits": _quantized_mean(rows, "weight_bits", "params"),
        "avg_act_bits": _quantized_mean(rows, "act_bits", "macs"),
        "avg_weight_bits_all": float(totals["avg_weight_bits"]),
        "avg_act_bits_all": float(totals["avg_act_bits"]),
        "sparsity": float(totals["sparsity"]),
        "layers": rows,
    }


def _finite(value: float) -> float:
    return 0.0 if not np.isfinite(value) else float(value)


def _quantized_mean(rows: list[dict[str, Any]], field: str, weight: str) -> float:
    """Mean of ``field`` over the rows below 32 bits, weighted by ``weight`` (plain mean when
    those weights are all 0); 32.0 when no row is quantized."""
    quantized = [r for r in rows if r[field] < FLOAT_BITS]
    if not quantized:
        return float(FLOAT_BITS)
    total = sum(r[weight] for r in quantized)
    if not total:
        return float(np.mean([r[field] for r in quantized]))
    return float(sum(r[field] * r[weight] for r in quantized) / total)


def _bits_text(bits: float) -> str:
    return "float" if bits >= FLOAT_BITS else f"{bits:g}"


def format_table(summary: dict[str, Any]) -> str:
    """The per-layer table of a ``summary.json`` (Larq-style), with totals and compression."""
    header = (
        f"{'layer':<28} {'w bits':>6} {'a bits':>6} {'params':>11} {'packed KiB':>11} "
        f"{'MBOPs':>10} {'sparsity':>8}"
    )
    lines = [header, "-" * len(header)]
    for row in summary["layers"]:
        lines.append(
            f"{row['name']:<28} {_bits_text(row['weight_bits']):>6} "
            f"{_bits_text(row['act_bits']):>6} {row['params']:>11,} "
            f"{row.get('packed_bytes', 4 * row['params']) / 1024:>11.2f} "
            f"{row.get('bops', 0) / 1e6:>10.2f} {row['sparsity']:>8.3f}"
        )
    lines.append("-" * len(header))
    lines.append(
        f"{'total (all parameters)':<28} "
        f"{summary.get('avg_weight_bits_all', summary['avg_weight_bits']):>6.2f} "
        f"{summary.get('avg_act_bits_all', summary['avg_act_bits']):>6.2f} "
        f"{summary['params']:>11,} "
        f"{summary['model_bytes'] / 1024:>11.2f} {summary['bops'] / 1e6:>10.2f} "
        f"{summary['sparsity']:>8.3f}"
    )
    compression = summary.get("compression") or (
        summary.get("float32_bytes", 4 * summary["params"]) / max(summary["model_bytes"], 1)
    )
    if summary["avg_weight_bits"] < FLOAT_BITS or summary["avg_act_bits"] < FLOAT_BITS:
        lines.append(
            f"quantized layers: {summary['avg_weight_bits']:.2f} weight bits "
            f"(parameter-weighted), {summary['avg_act_bits']:.2f} activation bits (MAC-weighted)"
        )
    lines.append(
        f"model size {summary['model_bytes'] / 1024:.2f} KiB packed vs "
        f"{summary.get('float32_bytes', 4 * summary['params']) / 1024:.2f} KiB float32: "
        f"{compression:.2f}x smaller; {summary.get('macs', 0) / 1e6:.2f} M MACs, "
        f"{summary['bops'] / 1e9:.3f} G BOPs per example"
    )
    return "\n".join(lines)
