"""``--config.KEY=VALUE`` overrides: each value is read with the type of the key's current value
(``parse_value``) and set on the config (``apply_overrides``), an unknown key named with the
nearest known ones."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections

from qflax.runs._schema import OPEN_KEYS, all_keys, near_matches

__all__ = ["NAMED_GROUPS", "apply_overrides", "parse_value"]

# Groups whose ``name`` a bare ``--config.GROUP=VALUE`` sets (``--config.pair=bnn+``).
NAMED_GROUPS = ("pair",)


def _lookup(config: ml_collections.ConfigDict, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def parse_value(text: str, default: Any, key: str) -> Any:
    """Parses a command-line value with the type of the key's current value ``default``."""
    import ast

    def literal() -> Any:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text

    try:
        if isinstance(default, bool):
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, str):
            return text
        if isinstance(default, (tuple, list)):
            value = ast.literal_eval(text)
            if not isinstance(value, (tuple, list)):
                raise ValueError
            return tuple(value)
    except (ValueError, SyntaxError):
        kind = type(default).__name__
        raise ValueError(
            f"--config.{key}={text!r} cannot be read as {kind} (the type of its default "
            f"{default!r}); allowed: a {kind} literal"
        ) from None
    return literal()


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]
) -> ml_collections.ConfigDict:
    """Sets dotted ``(key, text)`` overrides on ``config``, each parsed with its default's type.

    Keys inside ``dataset_kwargs``/``model_kwargs`` may be new (their values are read as Python
    literals, else as strings); any other unknown key is an error listing the nearest keys.

    Raises:
      ValueError: an unknown key, a key naming a whole group, or a value of the wrong type.
    """
    known = [
        k
        for k in all_keys(config)
        if k in OPEN_KEYS or not isinstance(_lookup(config, k), ml_collections.ConfigDict)
    ]
    for key, text in overrides:
        parts = key.split(".")
        node = config
        for part in parts[:-1]:
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                node = None
                break
            node = node[part]
        leaf = parts[-1]
        is_open = len(parts) == 2 and parts[0] in OPEN_KEYS
        if not isinstance(node, ml_collections.ConfigDict) or (leaf not in node and not is_open):
            near = near_matches(key, known)
            hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
            raise ValueError(f"unknown config key {key!r}{hint} (known keys: {', '.join(known)})")
        current = node[leaf] if leaf in node else None
        if len(parts) == 1 and leaf in NAMED_GROUPS:  # --config.pair=bnn sets pair.name
            current.name = text
            continue
        if isinstance(current, ml_collections.ConfigDict) and leaf not in OPEN_KEYS:
            raise ValueError(
                f"--config.{key} names a group; set its keys instead: "
                + ", ".join(f"{key}.{k}" for k in current)
            )
        if leaf in OPEN_KEYS and len(parts) == 1:
            import ast

            value = ast.literal_eval(text)
            if not isinstance(value, dict):
                raise ValueError(f"--config.{key}={text!r}; allowed: a dict literal")
            node[leaf] = ml_collections.ConfigDict(value)
            continue
        value = parse_value(text, current, key)
        try:
            node[leaf] = value
        except TypeError as error:
            raise ValueError(f"--config.{key}={text!r}: {error}") from error
    return config
