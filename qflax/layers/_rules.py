"""Quantizing a whole model by regex rules on module paths, and per-layer size/cost summaries.

Module paths are the NNX graph paths joined with ``"."`` (``stem``, ``blocks.0``,
``stages.1.0.conv1``, ``head``). For each ``nnx.Linear`` / ``nnx.Conv`` / ``nnx.Einsum`` /
``nnx.Embed`` the FIRST
rule whose pattern ``re.search``-es its path decides: a ``None`` recipe keeps it float, a
:class:`~qflax.layers.Recipe` replaces it in its parent by the quant wrapper (``from_module``: the
same weights). Rules that matched nothing are reported (qwix's habit).
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx

from qflax.layers._graph import definition_order, sort_paths
from qflax.layers._latent import QuantLatent
from qflax.layers._layers import (
    check_model,
    float_layer_info,
    is_quant_layer,
    macs_per_example,
    quant_layer_for,
)
from qflax.layers._recipes import Recipe
from qflax.layers._slots import Latent

__all__ = [
    "QuantReport",
    "ReportLine",
    "Rule",
    "count_macs",
    "first_last_float_rules",
    "layer_summaries",
    "quantize_model",
    "totals",
]

# The hook each float layer's matmul goes through (an Embed's lookup has none: 0 MACs).
_HOOKS = {
    nnx.Linear: "dot_general",
    nnx.Conv: "conv_general_dilated",
    nnx.Einsum: "einsum_op",
    nnx.Embed: None,
}


def _compile(pattern: Any) -> re.Pattern:
    if not isinstance(pattern, str):
        raise ValueError(f"pattern={pattern!r} is not allowed; allowed: a regular expression str")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(
            f"pattern={pattern!r} is not a valid regular expression ({e}); allowed: a pattern "
            "for re.search"
        ) from None


@dataclasses.dataclass(frozen=True)
class Rule:
    """``pattern`` (a regex, ``re.search``-ed against the module path) -> ``recipe``.

    ``recipe=None`` keeps the matched modules in float.
    """

    # Regular expression searched in the "."-joined module path (e.g. r"^stages\.0\.").
    pattern: str
    # The recipe of the matched modules; None: keep them float (unwrapped).
    recipe: Recipe | None

    def __post_init__(self):
        _compile(self.pattern)
        if self.recipe is not None and not isinstance(self.recipe, Recipe):
            raise ValueError(
                f"recipe={self.recipe!r} is not allowed (rule {self.pattern!r}); allowed: a "
                "Recipe or None"
            )


def first_last_float_rules(recipe: Recipe, first: str = "^stem", last: str = "^head") -> list[Rule]:
    """The standard rules: the first (``first``) and last (``last``) layers float, the rest
    ``recipe``.

    >>> [r.pattern for r in first_last_float_rules(None)]
    ['^stem', '^head', '.*']
    """
    return [Rule(first, None), Rule(last, None), Rule(".*", recipe)]


@dataclasses.dataclass(frozen=True)
class ReportLine:
    """One module of a :class:`QuantReport`."""

    # "."-joined module path.
    path: str
    # The Flax class of the original module ("Linear", "Conv", "Einsum").
    module_type: str
    # The recipe's description, or "float".
    recipe: str
    # Index of the deciding rule, or None when no rule matched (kept float).
    rule: int | None


@dataclasses.dataclass(frozen=True)
class QuantReport:
    """What :func:`quantize_model` did: one line per module, and the rules that matched nothing."""

    lines: tuple[ReportLine, ...]
    rules: tuple[Rule, ...]
    # Rules whose pattern matched no Linear/Conv/Einsum/Embed path.
    unmatched_rules: tuple[Rule, ...]

    @property
    def quantized(self) -> tuple[str, ...]:
        """Paths of the modules that were wrapped."""
        return tuple(line.path for line in self.lines if line.recipe != "float")

    def __str__(self) -> str:
        rows = [("path", "type", "recipe", "rule")]
        for line in self.lines:
            rule = "-" if line.rule is None else f"{line.rule}: {self.rules[line.rule].pattern}"
            rows.append((line.path, line.module_type, line.recipe, rule))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        text = [
            "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True))
            + "  "
            + row[3]
            for row in rows
        ]
        if self.unmatched_rules:
            text.append(
                "unmatched rules: "
                + ", ".join(
                    f"{self.rules.index(rule)}: {rule.pattern!r}" for rule in self.unmatched_rules
                )
            )
        else:
            text.append("every rule matched")
        return "\n".join(text)


def _as_rule(rule: Any, index: int) -> Rule:
    if isinstance(rule, Rule):
        _compile(rule.pattern)
        return rule
    if isinstance(rule, tuple | list) and len(rule) == 2:
        return Rule(*rule)
    raise ValueError(
        f"rules[{index}]={rule!r} is not allowed; allowed: a Rule or a (pattern, recipe) pair"
    )


def _join(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def _targets(
    model: nnx.Module, order: dict[tuple[Any, ...], int] | None = None
) -> list[tuple[tuple[Any, ...], nnx.Module]]:
    """``(path, module)`` of every Linear/Conv/Einsum/Embed not already inside a quant layer."""
    nodes = list(nnx.iter_graph(model))
    inside_quant = {path for path, node in nodes if is_quant_layer(node)}
    out = []
    for path, node in nodes:
        if any(path[: len(q)] == q for q in inside_quant):
            continue
        if quant_layer_for(node) is not None:
            out.append((path, node))
    return sort_paths(out, definition_order(model) if order is None else order)


def _latent_slots(
    model: nnx.Module, order: dict[tuple[Any, ...], int]
) -> list[tuple[tuple[Any, ...], Latent]]:
    """``(path, slot)`` of every float :class:`~qflax.layers.Latent` slot."""
    found = [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, Latent)]
    return sort_paths(found, order)


def _is_container(node: Any) -> bool:
    return isinstance(node, (nnx.List, list, tuple, Mapping))


def _node_at(model: nnx.Module, path: tuple[Any, ...]) -> Any:
    node = model
    for key in path:
        node = node[key] if _is_container(node) else getattr(node, key)
    return node


def _replace(model: nnx.Module, path: tuple[Any, ...], new: nnx.Module) -> None:
    parent, key = _node_at(model, path[:-1]), path[-1]
    if not _is_container(parent):
        setattr(parent, key, new)
        return
    try:
        parent[key] = new
    except TypeError:
        raise ValueError(
            f"cannot replace the module at {_join(path)!r}: its parent is an immutable "
            f"{type(parent).__name__}; allowed: modules held by attributes, nnx.List, nnx.Dict, "
            "lists or dicts"
        ) from None


def quantize_model(
    model: nnx.Module, rules: Sequence[Rule], *, copy: bool = True
) -> tuple[nnx.Module, QuantReport]:
    """Replaces Linear/Conv/Einsum/Embed modules by quant layers according to regex rules.

    Args:
      model: the float model (left unchanged when ``copy``).
      rules: :class:`Rule` s (or ``(pattern, recipe)`` pairs), tried in order; the first whose
        pattern ``re.search``-es a module's "."-joined path decides. A module no rule matches
        stays float.
      copy: quantize a copy (``nnx.clone``) of ``model``; False: modify ``model`` in place.

    Returns:
      ``(quantized_model, report)``; ``print(report)`` shows a table.

    Raises:
      TypeError: ``model`` is not an ``nnx.Module``.
      ValueError: a rule's pattern is not a valid regular expression (naming it), or a rule is
        malformed.
    """
    check_model(model, "quantize_model")
    rules = tuple(_as_rule(rule, i) for i, rule in enumerate(rules))
    compiled = [re.compile(rule.pattern) for rule in rules]
    order = definition_order(model)  # before nnx.clone, which orders attributes alphabetically
    if copy:
        model = nnx.clone(model)
    lines, used = [], set()
    for path, module in _targets(model, order):
        joined = _join(path)
        index = next((i for i, c in enumerate(compiled) if c.search(joined)), None)
        recipe = None if index is None else rules[index].recipe
        if index is not None:
            used.add(index)
        if recipe is not None:
            layer = quant_layer_for(module).from_module(module, recipe)
            layer.seed_noise(zlib.crc32(joined.encode()))
            _replace(model, path, layer)
        base = next(b for b in _HOOKS if isinstance(module, b))
        lines.append(
            ReportLine(
                path=joined,
                module_type=base.__name__,
                recipe="float" if recipe is None else str(recipe),
                rule=index,
            )
        )
    for path, module in _latent_slots(model, order):
        # A Latent slot takes the activation quantizer of its rule's recipe (float without one).
        joined = _join(path)
        index = next((i for i, c in enumerate(compiled) if c.search(joined)), None)
        recipe = None if index is None else rules[index].recipe
        if index is not None:
            used.add(index)
        if recipe is not None and recipe.act is not None:
            layer = QuantLatent.from_module(module, recipe)
            layer.seed_noise(zlib.crc32(joined.encode()))
            _replace(model, path, layer)
            described = f"a:{recipe.act}"
        else:
            described = "float"
        lines.append(ReportLine(path=joined, module_type="Latent", recipe=described, rule=index))
    unmatched = tuple(rule for i, rule in enumerate(rules) if i not in used)
    return model, QuantReport(lines=tuple(lines), rules=rules, unmatched_rules=unmatched)


# ---------------------------------------------------------------------------------- summaries


def _layers(model: nnx.Module) -> list[tuple[str, nnx.Module, bool]]:
    """``(path, module, is_quant)`` of every quant layer and float Linear/Conv/Einsum/Embed."""
    nodes = list(nnx.iter_graph(model))
    found = [(path, node, True) for path, node in nodes if is_quant_layer(node)]
    found += [(path, node, False) for path, node in _targets(model)]
    found = sort_paths(found, definition_order(model))
    return [(_join(path), node, is_quant) for path, node, is_quant in found]


def layer_summaries(
    model: nnx.Module, macs: Mapping[str, int] | None = None
) -> list[dict[str, Any]]:
    """One dict per quant layer and per float Linear/Conv/Einsum/Embed.

    In execution order when ``macs`` is given, else in definition order where the model keeps
    it (``nnx.split``/``merge`` and ``nnx.clone`` order attributes alphabetically).

    Each dict holds ``path``, ``type`` (the class name) and the layer's ``quant_info()`` (float
    layers: bits 32, packed bytes = 4·params, macs 0). Pass ``macs=count_macs(model, x)`` to fill
    in the MACs of every layer (float ones included); otherwise quant layers report the MACs of
    their last call.
    """
    layers = _layers(model)
    if macs is not None:  # execution order, as count_macs recorded it
        rank = {path: i for i, path in enumerate(macs)}
        layers.sort(key=lambda item: rank.get(item[0], len(rank)))
    out = []
    for path, module, is_quant in layers:
        info = module.quant_info() if is_quant else float_layer_info(module)
        if macs is not None and path in macs:
            info["macs"] = int(macs[path])
        out.append({"path": path, "type": type(module).__name__, **info})
    return out


class _MacSink:
    """Collects the MACs reported for one path (hashable by identity: a static attribute)."""

    def __init__(self, sink: dict[str, int], path: str):
        self.sink, self.path = sink, path

    def __call__(self, macs: int) -> None:
        self.sink[self.path] = self.sink.get(self.path, 0) + int(macs)


class _RecordingHook:
    """Calls the original hook and reports the MACs of the call (float layers in count_macs)."""

    def __init__(self, hook: Any, name: str, report: _MacSink):
        self.hook, self.name, self.report = hook, name, report

    def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
        out = self.hook(*args, **kwargs)
        self.report(macs_per_example(self.name, args, kwargs, out.shape))
        return out


def count_macs(model: nnx.Module, x: Any, **call_kwargs: Any) -> dict[str, int]:
    """MACs of one forward per example for every Linear/Conv/Einsum/Embed (quantized or not).

    Traces ``model(x, **call_kwargs)`` abstractly (``jax.eval_shape`` of a split/merge: no
    computation, the model's state is not modified) with every layer's hook reporting its
    shapes. A layer called several times reports the sum of its calls.

    Returns:
      ``{path: macs}`` ("."-joined paths, as in :func:`layer_summaries`) in the order the layers
      were first called (layers never called last, with 0).
    """
    sink: dict[str, int] = {}
    patched = []
    for path, module, is_quant in _layers(model):
        if is_quant:
            patched.append((module, "mac_recorder", module.mac_recorder))
            module.mac_recorder = _MacSink(sink, path)
        else:
            name = next(h for b, h in _HOOKS.items() if isinstance(module, b))
            if name is None:  # a float embedding lookup
                continue
            hook = getattr(module, name)
            patched.append((module, name, hook))
            setattr(module, name, _RecordingHook(hook, name, _MacSink(sink, path)))
    try:
        graphdef, state = nnx.split(model)

        def forward(state, x):
            return nnx.merge(graphdef, state)(x, **call_kwargs)

        jax.eval_shape(forward, state, x)
    finally:
        for module, name, value in patched:
            setattr(module, name, value)
    never_called = {path: 0 for path, _, _ in _layers(model) if path not in sink}
    return {**sink, **never_called}


def totals(summaries: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Whole-model figures from :func:`layer_summaries` entries.

    Returns:
      ``params``; ``packed_bytes``; ``float32_bytes`` (4·params); ``compression``
      (float32_bytes / packed_bytes); ``macs``; ``bops`` (Σ macs·weight_bits·act_bits);
      ``avg_weight_bits`` (weighted by params); ``avg_act_bits`` (weighted by macs; the plain
      mean when no MACs were recorded); ``sparsity`` (zero quantized weights / all weights).
    """
    summaries = list(summaries)
    params = sum(s["params"] for s in summaries)
    packed = sum(s["packed_bytes"] for s in summaries)
    macs = sum(s["macs"] for s in summaries)
    weights = sum(s.get("weights", s["params"]) for s in summaries)
    zeros = sum(s["sparsity"] * s.get("weights", s["params"]) for s in summaries)
    if macs:
        avg_act = sum(s["act_bits"] * s["macs"] for s in summaries) / macs
    else:
        avg_act = sum(s["act_bits"] for s in summaries) / max(len(summaries), 1)
    return {
        "params": params,
        "packed_bytes": packed,
        "float32_bytes": 4 * params,
        "compression": (4 * params / packed) if packed else 1.0,
        "macs": macs,
        "bops": sum(s["macs"] * s["weight_bits"] * s["act_bits"] for s in summaries),
        "avg_weight_bits": (
            sum(s["weight_bits"] * s["params"] for s in summaries) / params if params else 0.0
        ),
        "avg_act_bits": avg_act,
        "sparsity": zeros / weights if weights else 0.0,
    }
