"""Bias and variance of quantized gradients against the QAT gradient (METHODS.md §7).

Fully quantized training (FQT) replaces each layer's output cotangent ``∇Y`` by a stochastic
quantization ``Q(∇Y)`` before the two backward products. Chen et al. 2020 show the resulting
parameter gradient is an unbiased estimator of the QAT gradient (the same quantized forward, float
backward) and bound the variance each gradient quantizer adds. :func:`gradient_variance` measures
both on a real model and batch, per layer:

* **the parameter gradient** (the kernel's, ``∇W``) over ``keys`` independent draws of every
  layer's gradient noise, against the QAT gradient of the same model: the relative bias
  ``‖E[∇W] − ∇W_QAT‖ / ‖∇W_QAT‖``, its z-score ``‖E[∇W] − ∇W_QAT‖² / (tr Var / K)`` (about 1
  for an unbiased estimator; large when biased), and the variance ``E‖∇W − E∇W‖²`` (absolute
  and relative to ``‖∇W_QAT‖²``). Noise of later layers reaches earlier ones through their
  quantized ``∇X``, as in training;
* **the cotangent quantizer itself**, on the layer's real ``∇Y`` (from the QAT backward pass):
  the measured ``E‖Q(∇Y) − ∇Y‖²`` of the slot that feeds ``∇W`` next to the family's
  :meth:`~qflax.quantizers.QuantizerFamily.variance_bound` (the paper's bound: PTQ
  ``N·D·R²/(4B²)``, PSQ ``D·ΣR_i²/(4B²)``, ...).

:func:`write_gradient_report` writes the rows as a Markdown table, JSON and a plot.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["gradient_table", "gradient_variance", "write_gradient_report"]


def _quant_layers(model: nnx.Module) -> list[tuple[str, Any]]:
    """The quant layers with a weight×input product (an embedding lookup has none)."""
    from qflax.layers import QuantEmbed, is_quant_layer

    return [
        ("/".join(map(str, path)), node)
        for path, node in nnx.iter_graph(model)
        if is_quant_layer(node) and not isinstance(node, QuantEmbed)
    ]


def _with_grad(model: nnx.Module, grad: Any) -> nnx.Module:
    """A clone of ``model`` whose quant layers all quantize gradients with ``grad`` (a
    TensorQuant, or None: float gradients, the QAT reference)."""
    clone = nnx.clone(model)
    for _, layer in _quant_layers(clone):
        layer.recipe = dataclasses.replace(layer.recipe, grad=grad)
        if grad is not None and grad.needs_key and not hasattr(layer, "noise_key"):
            from qflax.layers import QuantStat

            layer.noise_key = QuantStat(jax.random.key_data(jax.random.key(0)))
    return clone


def _loss(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
    from qflax.train import cross_entropy

    return jnp.mean(cross_entropy(model(x, train=True), y))


def _kernel_grads(model: nnx.Module, x: jax.Array, y: jax.Array, rests: list | None = None):
    """``{path: ∇kernel}`` of ``model``'s quant layers; with ``rests`` (the non-Param states
    of K copies, e.g. with different noise keys), stacked over them (one compiled loop over the
    copies: ``lax.map``, not ``vmap``, whose batched noise draws take seconds to compile)."""
    from qflax.train import split_model

    graphdef, params, rest = split_model(model)

    # Weights and batch are ARGUMENTS of the compiled computations: closed over, they would be
    # constants, and XLA constant-folds the whole forward pass (minutes of compilation).
    def grads(params, x, y, rest):
        def loss(params):
            m = nnx.merge(graphdef, params, jax.tree.map(lambda v: v, rest))
            return _loss(m, x, y)

        g = jax.grad(loss)(params)
        m = nnx.merge(graphdef, g, jax.tree.map(lambda v: v, rest))
        return {path: layer.inner.kernel[...] for path, layer in _quant_layers(m)}

    if rests is None:
        return jax.jit(grads)(params, x, y, rest)
    stacked = jax.tree.map(lambda *v: jnp.stack(v), *rests)

    @jax.jit
    def each(params, x, y, stacked):
        return jax.lax.map(lambda r: grads(params, x, y, r), stacked)

    return each(params, x, y, stacked)


class _Record:
    """Probe of pass 1: keeps each layer's inputs (eager)."""

    def __init__(self, store: dict[str, jax.Array], path: str):
        self.store, self.path = store, path

    def __call__(self, layer, inputs, y):
        if self.path in self.store:
            raise ValueError(
                f"layer {self.path!r} was called twice in one forward pass; allowed: models "
                "that call each quant layer once (gradient_variance)"
            )
        self.store[self.path] = (jnp.asarray(inputs), y.shape)
        return y


class _Perturb:
    """Probe of pass 2: adds a zero perturbation whose gradient is the output cotangent."""

    def __init__(self, value: jax.Array):
        self.value = value

    def __call__(self, layer, inputs, y):
        return y + self.value.astype(y.dtype)


def _cotangents(model: nnx.Module, x: jax.Array, y: jax.Array):
    """``{path: (inputs, ∇Y)}`` of every quant layer, from the float backward pass (one
    compiled computation: a forward that records the inputs and output shapes, then the
    gradient of the loss in zero perturbations added to each layer's output)."""
    from qflax.train import split_model

    graphdef, params, rest = split_model(model)

    @jax.jit
    def run(params, rest, x, y):
        # (weights and batch as arguments, not constants XLA would fold)
        def merged(probes):
            m = nnx.merge(graphdef, params, jax.tree.map(lambda v: v, rest))
            for path, layer in _quant_layers(m):
                layer.probe = probes(path)
            return m

        seen: dict[str, Any] = {}
        merged(lambda path: _Record(seen, path))(x, train=True)

        def loss(perturbs):
            return _loss(merged(lambda path: _Perturb(perturbs[path])), x, y)

        zeros = {path: jnp.zeros(shape, jnp.float32) for path, (_, shape) in seen.items()}
        dy = jax.grad(loss)(zeros)
        return {path: (seen[path][0], dy[path]) for path in seen}

    return run(params, rest, x, y)


def _slot_for_weights(slots: Any) -> Any:
    return slots[1] if isinstance(slots, tuple) else slots


def _quantizer_variance(layer, spec, inputs, dy, keys: int, seed: int):
    """Measured ``E‖Q(∇Y) − ∇Y‖²`` and ``‖E Q(∇Y) − ∇Y‖`` of the ∇W slot over ``keys``."""
    from qflax.ops import OperandGradQuantizer

    lhs = rhs = None
    key0 = jax.random.key(0) if spec.needs_key else None
    if isinstance(_slot_for_weights(spec.grad_quantizer(key0)), OperandGradQuantizer):
        weight_q, act_q, _ = layer.quantizers(None)
        lhs = inputs if act_q is None else act_q(inputs)
        rhs = layer.inner.kernel[...]
        rhs = rhs if weight_q is None else weight_q(rhs)

    @jax.jit
    def stats(keys_, dy, lhs, rhs):
        # (∇Y and the operands as arguments: closed over, XLA would constant-fold the draws)
        def draw(key):
            q = _slot_for_weights(spec.grad_quantizer(key if spec.needs_key else None))
            if isinstance(q, OperandGradQuantizer):
                return q(dy, lhs, rhs)
            return q(dy)

        # lax.map, not vmap: a batch of threefry draws compiles ~5x slower (the same values)
        err = (jax.lax.map(draw, keys_) - dy[None]).astype(jnp.float32)
        variance = jnp.mean(jnp.sum(err**2, axis=tuple(range(1, err.ndim))))
        return variance, jnp.linalg.norm(jnp.mean(err, axis=0))

    variance, bias = stats(jax.random.split(jax.random.key(seed), keys), dy, lhs, rhs)
    bound = spec.family.variance_bound(spec, dy)
    return float(variance), float(bias), None if bound is None else float(bound)


def gradient_variance(
    model: nnx.Module,
    x: Any,
    y: Any,
    *,
    grad: Any = "recipe",
    keys: int = 16,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per-layer bias and variance of the quantized gradient against the QAT gradient.

    Args:
      model: a quantized model (``quantize_model``; its weights and activations are quantized as
        its recipes say; the forward is the same for FQT and QAT).
      x, y: one batch (inputs and integer labels; text: per-token labels).
      grad: the gradient quantizer to study: ``"recipe"`` (each layer's own ``recipe.grad``) or
        a :class:`~qflax.layers.TensorQuant` of a gradient family applied to every quant layer
        (so PTQ, PSQ and BHQ can be compared on the same model and batch).
      keys: independent draws of the gradient noise (``K``), at least 2.
      seed: seed of the draws.

    Returns:
      One dict per quant layer (execution order): ``path``, ``grad`` (the quantizer), ``keys``,
      ``qat_norm`` (``‖∇W_QAT‖``), ``bias`` (relative), ``bias_z`` (≈ 1 when unbiased),
      ``variance`` (``E‖∇W − E∇W‖²``, unbiased over K), ``rel_variance`` (over ``‖∇W_QAT‖²``),
      ``dy_norm2`` (``‖∇Y‖²``), ``dy_variance`` (measured ``E‖Q(∇Y) − ∇Y‖²``), ``dy_bias``
      (``‖E Q(∇Y) − ∇Y‖``) and ``dy_bound`` (the family's bound; None when it states none).
      Layers with float gradients get zeros and None.
    """
    if isinstance(keys, bool) or not isinstance(keys, (int, np.integer)) or keys < 2:
        raise ValueError(f"keys={keys!r} is not allowed; allowed: integers >= 2")
    from qflax.layers import TensorQuant

    if not (grad == "recipe" or isinstance(grad, TensorQuant)):
        raise ValueError(
            f"grad={grad!r} is not allowed; allowed: 'recipe' or a TensorQuant of a gradient family"
        )
    if isinstance(grad, TensorQuant) and "grad" not in grad.roles:
        raise ValueError(f"grad={grad} does not quantize gradients; allowed: a gradient family")
    layers = _quant_layers(model)
    if not layers:
        raise ValueError("the model has no quant layers; allowed: a model from quantize_model")
    x, y = jnp.asarray(x), jnp.asarray(y)
    fqt = nnx.clone(model) if grad == "recipe" else _with_grad(model, grad)
    qat = _with_grad(model, None)
    reference = _kernel_grads(qat, x, y)
    from qflax.train import split_model

    rests = []
    for k in range(int(keys)):
        for i, (_, layer) in enumerate(_quant_layers(fqt)):
            layer.seed_noise(int(seed) * 1_000_003 + k * 10_007 + i)
        rests.append(jax.tree.map(lambda v: v, split_model(fqt)[2]))  # a snapshot
    draws = _kernel_grads(fqt, x, y, rests)
    cotangents = _cotangents(qat, x, y)
    rows = []
    for (path, _), (_, fqt_layer) in zip(layers, _quant_layers(fqt), strict=True):
        spec = fqt_layer.recipe.grad
        ref = np.asarray(reference[path], np.float64)
        g = np.asarray(draws[path], np.float64)
        mean = g.mean(axis=0)
        variance = float(np.sum((g - mean) ** 2) / (len(g) - 1))
        ref_norm = float(np.linalg.norm(ref))
        err2 = float(np.sum((mean - ref) ** 2))
        row = {
            "path": path,
            "grad": "float" if spec is None else str(spec),
            "keys": int(keys),
            "qat_norm": ref_norm,
            "bias": float(np.sqrt(err2)) / ref_norm if ref_norm > 0 else 0.0,
            "bias_z": err2 / (variance / len(g)) if variance > 0 else 0.0,
            "variance": variance,
            "rel_variance": variance / ref_norm**2 if ref_norm > 0 else 0.0,
        }
        inputs, dy = cotangents.get(path, (None, None))
        row["dy_norm2"] = None if dy is None else float(jnp.sum(dy.astype(jnp.float32) ** 2))
        if spec is None or dy is None:
            row.update(dy_variance=0.0, dy_bias=0.0, dy_bound=None)
        else:
            v, b, bound = _quantizer_variance(fqt_layer, spec, inputs, dy, int(keys), int(seed))
            row.update(dy_variance=v, dy_bias=b, dy_bound=bound)
        rows.append(row)
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


COLUMNS = (
    ("path", "layer"),
    ("grad", "∇Y quantizer"),
    ("bias", "rel. bias of ∇W"),
    ("bias_z", "bias z"),
    ("rel_variance", "Var ∇W / ‖∇W_QAT‖²"),
    ("dy_variance", "E‖Q(∇Y)−∇Y‖²"),
    ("dy_bound", "paper bound"),
    ("dy_norm2", "‖∇Y‖²"),
)


def gradient_table(rows: Sequence[Mapping[str, Any]], *, label: bool = False) -> str:
    """The rows of :func:`gradient_variance` as a Markdown table (``label``: a first column
    from each row's ``label`` key)."""
    cols = ([("label", "run")] if label else []) + list(COLUMNS)
    lines = [
        "| " + " | ".join(title for _, title in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(key)) for key, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def write_gradient_report(
    rows: Sequence[Mapping[str, Any]], directory: str | pathlib.Path, *, name: str = "gradients"
) -> dict[str, pathlib.Path]:
    """Writes ``NAME.md`` (table), ``NAME.json`` (rows) and ``NAME.png`` (per-layer measured
    ``∇Y`` quantizer variance next to its bound, and ``∇W`` relative variance, log scale) into
    ``directory``. Rows may carry a ``label`` (e.g. the quantizer compared); the plot groups
    by it. Returns the paths."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    labelled = any("label" in r for r in rows)
    paths = {
        "table": directory / f"{name}.md",
        "json": directory / f"{name}.json",
        "plot": directory / f"{name}.png",
    }
    paths["table"].write_text(gradient_table(rows, label=labelled))
    paths["json"].write_text(json.dumps(list(map(dict, rows)), indent=1) + "\n")
    _plot(rows, paths["plot"])
    return paths


def _plot(rows: Sequence[Mapping[str, Any]], path: pathlib.Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = list(dict.fromkeys(str(r.get("label", r["grad"])) for r in rows))
    layers = list(dict.fromkeys(r["path"] for r in rows))
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    width = 0.8 / max(len(labels), 1)
    for j, lab in enumerate(labels):
        sel = {r["path"]: r for r in rows if str(r.get("label", r["grad"])) == lab}
        xs = np.arange(len(layers)) + j * width
        dv = [sel.get(p, {}).get("dy_variance") or np.nan for p in layers]
        bd = [sel.get(p, {}).get("dy_bound") or np.nan for p in layers]
        rv = [sel.get(p, {}).get("rel_variance") or np.nan for p in layers]
        bars = ax1.bar(xs, dv, width, label=lab)
        ax1.scatter(xs, bd, marker="_", s=200, color=bars.patches[0].get_facecolor())
        ax2.bar(xs, rv, width, label=lab)
    for ax, title in (
        (ax1, "E‖Q(∇Y)−∇Y‖² (bars) and the paper's bound (—)"),
        (ax2, "Var[∇W] / ‖∇W_QAT‖²"),
    ):
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(layers)) + 0.4 - width / 2)
        ax.set_xticklabels(layers, rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
