"""Exporting a quantized NNX model as packed integer weights, saving/loading it, and importing it.

The exported tree is a nested dict with string keys that mirrors the model's variable paths
(``nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))``, list indices as strings): every quant
layer's kernel (``<path>.inner.kernel``; a :class:`~qflax.layers.QuantEmbed`'s table,
``<path>.inner.embedding``, stored transposed as the quantizer sees it, ``(features, vocab)``
with one scale per token) is a packed :class:`~qflax.export.QArray` holding the codes the
forward pass uses; every other variable (biases, BatchNorm parameters and statistics,
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

from qflax.layers import QuantConv, QuantEinsum, QuantEmbed, QuantLinear, TensorQuant
from qflax.quantizers import QArray, dequantize, nbytes, pack

__all__ = [
    "export_model",
    "import_model",
    "load_packed",
    "packed_model_bytes",
    "quant_layers",
    "quantize_tensor",
    "save_packed",
]

_QUANT_TYPES = (QuantLinear, QuantConv, QuantEinsum, QuantEmbed)
_EXPORTED = nnx.Any(nnx.Param, nnx.BatchStat)


def _is_qarray(x: Any) -> bool:
    return isinstance(x, QArray)


# ---------------------------------------------------------------------------------- tensors


def quantize_tensor(
    spec: TensorQuant,
    x: jax.Array,
    params: Mapping[str, jax.Array] | None = None,
    stats: Mapping[str, jax.Array] | None = None,
) -> QArray:
    """The codes of ``spec.apply(x, params, stats=stats)`` at rest (unpacked): the family's
    :meth:`~qflax.quantizers.QuantizerFamily.codes`.

    ``dequantize(quantize_tensor(spec, x, p, s)) == spec.apply(x, p, stats=s)`` exactly (float32
    ``x``) for absmax, learned_step, pow2, binary, ternary, codeq, lsq, sign pairs, DoReFa with
    ``k = 1``, GDNSQ activations with lower bound 0, and DBSSQ. Where the forward is not a
    QArray formula, the codes are the forward's and the scales as close as float32 allows:

    * ``"dorefa"`` (``k > 1``): ``2·c/(2^k − 1) − 1`` is stored as ``s·(c − z)`` with
      ``s = 2/(2^k − 1)`` and the float32 zero point ``z = (2^k − 1)/2``: at most ``2^−23`` (one
      ulp of 1) apart; activations: ``c/(2^k − 1)`` as ``s·c``, at most ``2^−24`` apart
      (:func:`~qflax.quantizers.quantize_dorefa`).
    * ``"pact"``: ``c·α/n`` as ``(α/n)·c``: at most ``2^−21·α`` apart.
    * ``"gdnsq"``: ``s·c + z`` as ``s·(c + z/s)``: at most ``2^−21·max|ŵ|`` apart per channel
      (weights; activations with a lower bound ``β ≠ 0``: ``2^−21·max(|β|, max|x̂|)``).

    ``"pair"`` kinds are stored as binary when their forward is a sign (values ±1 exactly, e.g.
    ``"bnn"``, ``"bc"``, ``"bnn+"``); a pair whose forward is not a sign (``"bnn++"`` before its
    μ reaches infinity, ``"proxquant"``) has no integer codes, unless ``stats["hard"]`` (the
    layer's state) is set: the exact binary model a relaxed pair's training ends with.
    ``"dbssq"`` likewise has integer codes only at ``stats["epsilon"] == 0`` (the exact model
    training ends in; the blend ``ε·x + (1 − ε)·Q(x)`` before), and reads its weights'
    ``stats["sigma"]``; ``stats=None`` takes :meth:`TensorQuant.stats_init` (``ε = 1``), as
    ``apply`` does. GDNSQ and CoDeQ read their bit-width from the params (eager only).

    Raises:
      qflax.quantizers.NotExportable (a ValueError): the family has no codes for this tensor
        (a relaxed pair or DBSSQ blend, a family that defines none), with the reason.
    """
    return spec.codes(x, params, stats)


# ---------------------------------------------------------------------------------- models


def _key(part: Any) -> str:
    return str(part)


def quant_layers(model: nnx.Module) -> list[tuple[tuple[str, ...], nnx.Module]]:
    """``(path, layer)`` of every quant layer (QuantLinear/QuantConv/QuantEinsum/QuantEmbed),
    paths as str."""
    return [
        (tuple(_key(p) for p in path), node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, _QUANT_TYPES)
    ]


def _layer_kernel(layer: nnx.Module) -> jax.Array:
    """The weight in the quantizer's layout (a conv's masked kernel, an embedding's table
    transposed)."""
    return layer._kernel()


def _weight_path(path: tuple[str, ...], layer: nnx.Module) -> tuple[str, ...]:
    return (*path, "inner", layer.weight_attr)


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
        _set_nested(tree, _weight_path(path, layer), pack(q))
        for name in _weight_params(layer):  # learned scales live in the QArray (no duplicate)
            del _get_nested(tree, path)[f"weight_{name}"]
    return tree


def _learned_weight_params(tree: Mapping[str, Any], model: nnx.Module) -> dict[tuple, Any]:
    """``{variable path: value}`` of every quant layer's learned weight params held by its
    QArray kernel (a learned step is the QArray's scale: the family says which)."""
    out = {}
    for path, layer in quant_layers(model):
        spec = layer.recipe.weight
        if spec is None:
            continue
        try:
            kernel = _get_nested(tree, _weight_path(path, layer))
        except ValueError:
            continue
        if _is_qarray(kernel):
            for name, value in spec.family.params_from_codes(spec, kernel).items():
                out[(*path, f"weight_{name}")] = value
    return out


def import_model(model: nnx.Module, tree: Mapping[str, Any]) -> nnx.Module:
    """Writes an exported tree into ``model`` (in place; also returned).

    QArray kernels are dequantized: the kernel becomes the quantized kernel ``ŵ``, which the
    layer's quantizer maps to itself (absmax, learned_step, pow2, binary, ternary scales are
    recomputed from ŵ and give ŵ again, up to float rounding of the recomputed scale), so the
    fake-quant evaluation of ``model`` equals that of the exported one. Families whose
    quantizer does not map ``ŵ`` to itself give a latent kernel that maps back to the same codes
    (:meth:`~qflax.quantizers.QuantizerFamily.import_kernel`: DoReFa with ``k > 1``, whose
    ``tanh`` and max rescale ``ŵ``), or refuse (``check_importable``).

    Raises:
      ValueError: a layer's weights are DBSSQ or CoDeQ (checked before anything is written):
        their quantizers re-derive their grid from the kernel (DBSSQ's σ and ε, CoDeQ's
        quantile ``a``), so ``ŵ`` does not map back to its own codes, and the export does not
        hold that state; an entry is missing or has another shape than the model's variable.
    """
    kernels = {}  # weight path -> (the spec that maps its codes back to a kernel, the layer)
    for path, layer in quant_layers(model):
        spec = layer.recipe.weight
        if spec is not None:
            spec.family.check_importable(spec, ".".join(path))
            kernels[_weight_path(path, layer)] = (spec, layer)
    learned = _learned_weight_params(tree, model)
    state = nnx.state(model, _EXPORTED)
    for path, variable in nnx.to_flat_state(state):
        key = tuple(_key(p) for p in path)
        old = variable.get_value()
        value = learned.get(key)
        if value is not None and np.size(value) == np.size(old):
            value = jnp.asarray(value).reshape(old.shape)  # the compact layout of the layer
        else:
            value = _get_nested(tree, key)
            if _is_qarray(value):
                if key in kernels:
                    spec, layer = kernels[key]
                    value = layer.kernel_to_weight(spec.family.import_kernel(spec, value))
                else:
                    value = dequantize(value)
            else:
                value = jnp.asarray(value)
        if tuple(value.shape) != tuple(old.shape):
            raise ValueError(
                f"{'.'.join(key)} has shape {tuple(value.shape)} in the exported tree; allowed: "
                f"the model's shape {tuple(old.shape)}"
            )
        variable.set_value(value.astype(old.dtype))
    nnx.update(model, state)
    return model


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
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:  # closed on errors
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
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:  # closed on errors
        restored = checkpointer.restore(
            directory,
            ocp.args.Composite(arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
        )
    return _join_from_disk(restored["arrays"], restored["meta"] or {})
