"""Module paths of an NNX graph in definition order (attribute assignment order, list order)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import nnx

__all__ = ["definition_order", "sort_paths"]


def definition_order(model: Any) -> dict[tuple[Any, ...], int]:
    """Rank of every module path in definition order (attribute assignment order, list order)."""
    order: dict[tuple[Any, ...], int] = {}
    seen: set[int] = set()

    def children(node: Any):
        if isinstance(node, (nnx.List, list, tuple)):
            return enumerate(node)
        if isinstance(node, Mapping):
            return node.items()
        if isinstance(node, nnx.Module):
            return ((k, v) for k, v in vars(node).items() if not k.startswith("_pytree__"))
        return ()

    def visit(node: Any, path: tuple[Any, ...]) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        order[path] = len(order)
        for key, child in children(node):
            if isinstance(child, (nnx.Module, nnx.List, list, tuple, Mapping)):
                visit(child, path + (key,))

    visit(model, ())
    return order


def sort_paths(items: list, order: dict[tuple[Any, ...], int]) -> list:
    """``items`` (tuples starting with a path) in the given order, then natural path order."""

    def key(item):
        path = item[0]
        natural = tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in path)
        return (order.get(path, len(order)), natural)

    return sorted(items, key=key)
