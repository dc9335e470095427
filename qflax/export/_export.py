"""Exporting a quantized NNX model as packed integer weights, saving/loading it, and importing it.

The exported tree is a nested dict with string keys that mirrors the model's variable paths
(``nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))``, list indices as strings): every quant
layer's kernel (``<path>.inner.kernel``) is a packed :class:`~qflax.export.QArray` holding the
codes the forward pass uses; every other variable (biases, BatchNorm parameters and statistics,
float layers, learned quantizer scales) is a float array. The layers' ``QuantStat`` (MAC
counts) and RNG state are not exported.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from qflax import quantizers as qz
from qflax.export._qarray import (
    QArray,
    dequantize,
    nbytes,
    pack,
    quantize_binary,
    quantize_codeq,
    quantize_dbssq_act,
    quantize_dbssq_weight,
    quantize_dorefa,
    quantize_gdnsq_act,
    quantize_gdnsq_weight,
    quantize_lsq,
    quantize_pact,
    quantize_pow2,
    quantize_ternary,
    quantize_uniform,
    unpack,
)
from qflax.layers import QuantConv, QuantEinsum, QuantLinear, TensorQuant

__all__ = [
    "export_model",
    "import_model",
    "load_packed",
    "packed_model_bytes",
    "quant_layers",
    "quantize_tensor",
    "save_packed",
]

_QUANT_TYPES = (QuantLinear, QuantConv, QuantEinsum)
_EXPORTED = nnx.Any(nnx.Param, nnx.BatchStat)


def _is_qarray(x: Any) -> bool:
    return isinstance(x, QArray)


# ---------------------------------------------------------------------------------- tensors


def _expand_compact(value: jax.Array, x: jax.Array, spec: TensorQuant) -> jax.Array:
    """A compact learned param (``()`` or ``(C,)``) in the quantizer's own broadcast shape."""
    gran = spec.config.granularity
    value = jnp.asarray(value)
    if gran == "tensor":
        return value.reshape((1,) * x.ndim)
    if gran == "channel":
        shape = [1] * x.ndim
        shape[spec.config.axis % x.ndim] = x.shape[spec.config.axis]
        return value.reshape(shape)
    return value


def quantize_tensor(
    spec: TensorQuant,
    x: jax.Array,
    params: Mapping[str, jax.Array] | None = None,
    stats: Mapping[str, jax.Array] | None = None,
) -> QArray:
    """The codes of ``spec.apply(x, params, stats=stats)`` at rest (unpacked), for every kind.

    ``dequantize(quantize_tensor(spec, x, p, s)) == spec.apply(x, p, stats=s)`` exactly (float32
    ``x``) for absmax, learned_step, pow2, binary, ternary, codeq, lsq, sign pairs, DoReFa with
    ``k = 1``, GDNSQ activations with lower bound 0, and DBSSQ. Where the forward is not a
    QArray formula, the codes are the forward's and the scales as close as float32 allows:

    * ``"dorefa"`` (``k > 1``): ``2·c/(2^k − 1) − 1`` is stored as ``s·(c − z)`` with
      ``s = 2/(2^k − 1)`` and the float32 zero point ``z = (2^k − 1)/2``: at most ``2^−23`` (one
      ulp of 1) apart; activations: ``c/(2^k − 1)`` as ``s·c``, at most ``2^−24`` apart
      (:func:`~qflax.export.quantize_dorefa`).
    * ``"pact"``: ``c·α/n`` as ``(α/n)·c``: at most ``2^−21·α`` apart.
    * ``"gdnsq"``: ``s·c + z`` as ``s·(c + z/s)``: at most ``2^−21·max|ŵ|`` apart per channel
      (weights; activations with a lower bound ``β ≠ 0``: ``2^−21·max(|β|, max|x̂|)``).

    ``"pair"`` kinds are stored as binary when their forward is a sign (values ±1 exactly, e.g.
    ``"bnn"``, ``"bc"``, ``"bnn+"``); a pair whose forward is not a sign (``"bnn++"`` before its
    μ reaches infinity, ``"proxquant"``) raises ValueError: it has no integer codes, unless
    ``stats["hard"]`` (the layer's state, see :attr:`TensorQuant.relaxed`) is set: the exact
    binary model a relaxed pair's training ends with. ``"dbssq"`` likewise has integer codes
    only at ``stats["epsilon"] == 0`` (the exact model training ends in; the blend
    ``ε·x + (1 − ε)·Q(x)`` before), and reads its weights' ``stats["sigma"]``; ``stats=None``
    takes :meth:`TensorQuant.stats_init` (``ε = 1``), as ``apply`` does. GDNSQ and CoDeQ read
    their bit-width from the params (eager only).

    Raises:
      ValueError: a relaxed pair or DBSSQ blend (no integer codes), or an unknown kind.
    """
    x = jnp.asarray(x)
    params = dict(params or {})
    if spec.kind == "absmax":
        stats = qz.uniform_init(x, spec.config)
        if spec.config.symmetric:
            stats = {"scale": stats["scale"]}
        return quantize_uniform(x, stats, spec.config)
    if spec.kind == "learned_step":
        full = {k: _expand_compact(v, x, spec) for k, v in params.items()}
        return quantize_uniform(x, full, spec.config)
    if spec.kind == "pow2":
        return quantize_pow2(x, qz.pow2_init(x, spec.config), spec.config)
    if spec.kind == "binary":
        return quantize_binary(x, spec.config)
    if spec.kind == "ternary":
        return quantize_ternary(x, spec.config)
    if spec.kind == "codeq":
        return quantize_codeq(x, params, spec.config)
    if spec.kind == "lsq":
        full = {k: _expand_compact(v, x, spec) for k, v in params.items()}
        return quantize_lsq(x, full, spec.config)
    if spec.kind == "dorefa":
        return quantize_dorefa(x, spec.config)
    if spec.kind == "pact":
        return quantize_pact(x, params, spec.config)
    if spec.kind == "gdnsq":
        if isinstance(spec.config, qz.GDNSQActConfig):
            return quantize_gdnsq_act(x, params, spec.config)
        full = {k: _expand_compact(v, x, spec) for k, v in params.items()}
        return quantize_gdnsq_weight(x, full, spec.config)
    if spec.kind == "dbssq":
        stats = spec.stats_init(x) if stats is None else dict(stats)
        epsilon = float(np.asarray(stats["epsilon"], np.float64).reshape(-1)[0])
        if epsilon != 0.0:
            raise ValueError(
                f"epsilon={epsilon!r}: a DBSSQ blend ε·x + (1 − ε)·Q(x) with ε > 0 is not on "
                "its levels, so it has no integer codes; allowed: epsilon=0.0, the exact model "
                "DBSSQ training ends in (layer.set_stat('epsilon', 0.0))"
            )
        if spec.role == "act":
            return quantize_dbssq_act(x, spec.config)
        sigma = jnp.asarray(stats["sigma"], jnp.float32)
        sigma = sigma.reshape((1,) * (x.ndim - 1) + (-1,))  # compact (C,) -> last axis
        return quantize_dbssq_weight(x, sigma, spec.config, axis=-1)
    if spec.kind != "pair":
        kinds = "absmax, learned_step, pow2, binary, ternary, codeq, lsq, dorefa, pact, gdnsq, "
        raise ValueError(
            f"kind={spec.kind!r} has no export to integer codes; allowed: {kinds}dbssq, pair"
        )
    # pair: a sign-valued forward times sg(mean|x|) (per tensor / channel) or 1.
    if float(jnp.asarray((stats or {}).get("hard", 0.0))) > 0:
        y = qz.sign(x)
    else:
        y = qz.PAIRS[spec.pair](**dict(spec.pair_kwargs))(x)
    if not bool(jnp.all(jnp.abs(y) == 1.0)):
        raise ValueError(
            f"pair={spec.pair!r} with {dict(spec.pair_kwargs)} has a forward that is not a sign "
            "(values other than ±1), so it has no integer codes; allowed: a pair whose forward "
            "is sign (bc, pc, bnn, bnn+)"
        )
    binary_config = qz.BinaryConfig(scaling=spec.scaling, axis=spec.axis)
    q = quantize_binary(x, binary_config)
    return dataclasses.replace(q, values=(y > 0).astype(jnp.uint8))


# ---------------------------------------------------------------------------------- models


def _key(part: Any) -> str:
    return str(part)


def quant_layers(model: nnx.Module) -> list[tuple[tuple[str, ...], nnx.Module]]:
    """``(path, layer)`` of every quant layer (QuantLinear/QuantConv/QuantEinsum), paths as str."""
    return [
        (tuple(_key(p) for p in path), node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, _QUANT_TYPES)
    ]


def _layer_kernel(layer: nnx.Module) -> jax.Array:
    kernel = layer.inner.kernel[...]
    mask = getattr(layer.inner, "mask", None)
    return kernel if mask is None else kernel * mask


def _weight_params(layer: nnx.Module) -> dict[str, jax.Array]:
    names = dict(layer.param_names).get("weight", ())
    return {name: getattr(layer, f"weight_{name}")[...] for name in names}


def _set_nested(tree: dict, path: tuple[str, ...], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def _get_nested(tree: Mapping, path: tuple[str, ...]) -> Any:
    node = tree
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(
                f"the exported tree has no entry {'.'.join(path)!r}; allowed: a tree exported "
                "from a model of the same architecture and recipes"
            )
        node = node[part]
    return node


def export_model(model: nnx.Module) -> dict[str, Any]:
    """The model at rest: packed QArrays for quantized kernels, float arrays for the rest.

    Returns:
      A nested dict (string keys, mirroring the variable paths): ``tree[...]["inner"]["kernel"]``
      is a packed :class:`QArray` for every quant layer with a weight quantizer; every other
      ``nnx.Param`` / ``nnx.BatchStat`` (biases, BN scale/bias/mean/var, float layers' kernels,
      learned quantizer scales) is a float array.
    """
    tree: dict[str, Any] = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, _EXPORTED)):
        _set_nested(tree, tuple(_key(p) for p in path), jnp.asarray(variable.get_value()))
    for path, layer in quant_layers(model):
        spec = layer.recipe.weight
        if spec is None:
            continue
        stats = layer._stats("weight")  # a relaxed pair's `hard` flag
        q = quantize_tensor(spec, _layer_kernel(layer), _weight_params(layer), stats)
        _set_nested(tree, (*path, "inner", "kernel"), pack(q))
        for name in _weight_params(layer):  # learned scales live in the QArray (no duplicate)
            del _get_nested(tree, path)[f"weight_{name}"]
    return tree


def _learned_weight_param(tree: Mapping[str, Any], key: tuple[str, ...]) -> Any:
    """A quant layer's learned weight param (``weight_scale`` / ``weight_zero_point``, LSQ's
    ``weight_step``, GDNSQ's ``weight_log_step``), read from its QArray kernel."""
    *parent, name = key
    if not name.startswith("weight_"):
        return None
    try:
        kernel = _get_nested(tree, (*parent, "inner", "kernel"))
    except ValueError:
        return None
    if not _is_qarray(kernel):
        return None
    if name == "weight_step":  # LSQ: the step is the QArray's scale
        return kernel.scale
    if name == "weight_log_step":  # GDNSQ: s = 2^ℓ (min_bits already applied when exported)
        return jnp.log2(jnp.asarray(kernel.scale, jnp.float32))
    field = {"weight_scale": "scale", "weight_zero_point": "zero_point"}.get(name)
    return None if field is None else getattr(kernel, field)


def import_model(model: nnx.Module, tree: Mapping[str, Any]) -> nnx.Module:
    """Writes an exported tree into ``model`` (in place; also returned).

    QArray kernels are dequantized: the kernel becomes the quantized kernel ``ŵ``, which the
    layer's quantizer maps to itself (absmax, learned_step, pow2, binary, ternary scales are
    recomputed from ŵ and give ŵ again, up to float rounding of the recomputed scale), so the
    fake-quant evaluation of ``model`` equals that of the exported one. DoReFa kernels with
    ``k > 1`` are not their own fixed point (``tanh`` and the max rescale them), so they get a
    latent kernel that DoReFa maps back to the same codes (:func:`_dorefa_latent`).

    Raises:
      ValueError: a layer's weights are DBSSQ or CoDeQ (checked before anything is written):
        their quantizers re-derive their grid from the kernel (DBSSQ's σ and ε, CoDeQ's
        quantile ``a``), so ``ŵ`` does not map back to its own codes, and the export does not
        hold that state; an entry is missing or has another shape than the model's variable.
    """
    dorefa = set()  # kernels written as a DoReFa latent (k > 1)
    for path, layer in quant_layers(model):
        spec = layer.recipe.weight
        if spec is not None and spec.kind in ("dbssq", "codeq"):
            raise ValueError(
                f"layer {'.'.join(path)!r} has {spec.kind} weights, which import_model cannot "
                "restore (the quantizer re-derives its grid from the kernel, so the exported "
                "codes do not map back to themselves); allowed: the other kinds. The packed "
                "export itself (codes, scales, model_bytes) and integer inference are unaffected"
            )
        if spec is not None and spec.kind == "dorefa" and spec.config.bits > 1:
            dorefa.add((*path, "inner", "kernel"))
    state = nnx.state(model, _EXPORTED)
    for path, variable in nnx.to_flat_state(state):
        key = tuple(_key(p) for p in path)
        old = variable.get_value()
        value = _learned_weight_param(tree, key)
        if value is not None and np.size(value) == np.size(old):
            value = jnp.asarray(value).reshape(old.shape)  # the compact layout of the layer
        else:
            value = _get_nested(tree, key)
            if key in dorefa and _is_qarray(value):
                value = _dorefa_latent(value)
            else:
                value = dequantize(value) if _is_qarray(value) else jnp.asarray(value)
        if tuple(value.shape) != tuple(old.shape):
            raise ValueError(
                f"{'.'.join(key)} has shape {tuple(value.shape)} in the exported tree; allowed: "
                f"the model's shape {tuple(old.shape)}"
            )
        variable.set_value(value.astype(old.dtype))
    nnx.update(model, state)
    return model


def _dorefa_latent(q: QArray) -> jax.Array:
    """A latent kernel whose DoReFa codes (``k > 1``) are ``q``'s: ``w = atanh((2c/n − 1)·m)``.

    DoReFa takes ``t = tanh(w)/(2·max|tanh w|) + ½`` and the codes ``round(n·t)``. With
    ``tanh(w) = (2c/n − 1)·m`` (``m = tanh 1``) and a code 0 or ``n`` present (the exported
    tensor's largest ``|tanh w|`` gives one), ``max|tanh w| = m`` and ``t = c/n`` up to float
    rounding, far inside the rounding interval. Without such a code (an all-zero kernel): ``ŵ``.
    """
    q = unpack(q)
    codes = np.asarray(q.values).astype(np.float64)
    n = 2.0**q.bits - 1.0
    if not (np.any(codes == 0) or np.any(codes == n)):
        return dequantize(q)
    m = np.tanh(1.0)
    return jnp.asarray(np.arctanh((2.0 * codes / n - 1.0) * m), jnp.float32)


def packed_model_bytes(tree: Mapping[str, Any]) -> int:
    """Sum of the array bytes of an exported tree (QArrays: :func:`nbytes`)."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=_is_qarray)
    return sum(
        nbytes(leaf) if _is_qarray(leaf) else int(np.asarray(leaf).nbytes) for leaf in leaves
    )


# ---------------------------------------------------------------------------------- on disk

_QARRAY_TAG = "__qarray__"


def _split_for_disk(tree: Mapping[str, Any]) -> tuple[dict, dict]:
    """Arrays (QArrays as dicts of their leaves) and JSON metadata (QArrays' static fields)."""
    arrays: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    for key, value in tree.items():
        if _is_qarray(value):
            leaves = {"values": value.values, "scale": value.scale}
            if value.zero_point is not None:
                leaves["zero_point"] = value.zero_point
            arrays[key] = leaves
            fields = {
                f.name: getattr(value, f.name)
                for f in dataclasses.fields(QArray)
                if f.name not in ("values", "scale", "zero_point")
            }
            fields["shape"] = list(fields["shape"])
            meta[key] = {_QARRAY_TAG: fields}
        elif isinstance(value, Mapping):
            arrays[key], sub = _split_for_disk(value)
            if sub:
                meta[key] = sub
        else:
            arrays[key] = value
    return arrays, meta


def _join_from_disk(arrays: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in arrays.items():
        sub = meta.get(key, {})
        if _QARRAY_TAG in sub:
            fields = dict(sub[_QARRAY_TAG])
            fields["shape"] = tuple(fields["shape"])
            out[key] = QArray(
                values=jnp.asarray(value["values"]),
                scale=jnp.asarray(value["scale"]),
                zero_point=None if "zero_point" not in value else jnp.asarray(value["zero_point"]),
                **fields,
            )
        elif isinstance(value, Mapping):
            out[key] = _join_from_disk(value, sub)
        else:
            out[key] = jnp.asarray(value)
    return out


def save_packed(
    tree: Mapping[str, Any], directory: str | os.PathLike, *, overwrite: bool = False
) -> pathlib.Path:
    """Saves an exported tree with orbax (arrays + the QArrays' static fields as JSON).

    Orbax writes into a temporary directory and renames it when complete, so an interrupted save
    never leaves a partial ``directory``.

    Args:
      tree: as returned by :func:`export_model` (or any nested dict of arrays and QArrays).
      directory: the checkpoint directory to create.
      overwrite: replace an existing ``directory``; False: an existing one raises ValueError.

    Returns:
      The absolute path of the saved checkpoint.
    """
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise ValueError(f"directory={str(directory)!r} exists; allowed: a new path, or overwrite")
    arrays, meta = _split_for_disk(tree)
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    checkpointer.save(
        directory,
        ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)),
        force=overwrite,
    )
    return directory


def load_packed(directory: str | os.PathLike) -> dict[str, Any]:
    """Loads a tree saved by :func:`save_packed` (QArrays stay packed)."""
    directory = pathlib.Path(directory).absolute()
    if not directory.is_dir():
        raise ValueError(
            f"directory={str(directory)!r} is not a saved export; allowed: a directory"
        )
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    restored = checkpointer.restore(
        directory,
        ocp.args.Composite(arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
    )
    return _join_from_disk(restored["arrays"], restored["meta"] or {})
