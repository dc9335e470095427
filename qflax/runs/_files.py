"""Config files: a ``.py`` file whose ``get_config()`` returns a training config
(``experiments/mnist5k/w4a4.py``), loaded by ``load_config_file("path.py[:arg]")``."""

from __future__ import annotations

import pathlib
import re
from typing import Any

import ml_collections

from qflax.runs._schema import lock_config

__all__ = ["extension_files", "load_config_file"]


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads ``get_config()`` from a config file; ``"path.py:arg"`` calls ``get_config(arg)``.

    Args:
      spec: path of a ``.py`` file defining ``get_config()``, optionally followed by ``:arg``.

    Returns:
      The config, locked against new keys (see :func:`lock_config`).

    Raises:
      ValueError: the file does not exist, cannot be imported (a syntax error, a failing
        import: the message names the file and the line), defines no ``get_config``, its
        ``get_config`` raises, or it returns no ``ConfigDict``; the original error is chained
        (``__cause__``).
    """
    path, arg = spec, None
    if ":" in spec and not pathlib.Path(spec).is_file():
        path, arg = spec.rsplit(":", 1)
    file = pathlib.Path(path)
    if not file.is_file():
        raise ValueError(
            f"config file {path!r} does not exist; allowed: a .py file with get_config()"
        )
    try:
        module = _import_config_module(file)
    except SyntaxError as error:
        where = "" if _same_file(error.filename, file) else f" in {error.filename}"
        raise ValueError(
            f"{path}: {type(error).__name__}{where} at line {error.lineno}: {error.msg}"
        ) from error
    except Exception as error:  # noqa: BLE001 - the user's code: named, chained
        raise ValueError(f"{path}: importing it raised {_error_text(error, file)}") from error
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ValueError(f"config file {path!r} defines no get_config(); allowed: one that does")
    call = "get_config()" if arg is None else f"get_config({arg!r})"
    try:
        config = get_config() if arg is None else get_config(arg)
    except Exception as error:  # noqa: BLE001 - the user's code: named, chained
        raise ValueError(f"{path}: {call} raised {_error_text(error, file)}") from error
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(
            f"get_config() of {path!r} returned {type(config).__name__}; allowed: a ConfigDict"
        )
    if "imports" in config:
        # files that register the user's own families/pairs/recipes (the config file itself or
        # modules it imports): a later `qflax eval` of the run imports them again first
        new = [f for f in extension_files(module) if f not in tuple(config.imports)]
        if new:
            with config.unlocked():
                config.imports = (*tuple(config.imports), *new)
    return lock_config(config)


def _same_file(name: str | None, file: pathlib.Path) -> bool:
    return name is not None and pathlib.Path(name).resolve() == file.resolve()


def _error_text(error: Exception, file: pathlib.Path) -> str:
    """``ModuleNotFoundError: No module named 'x' (line 3)``: the type, the message and the
    last line of ``file`` the error passed through."""
    import traceback

    text = f"{type(error).__name__}: {error}"
    lines = [
        f.lineno for f in traceback.extract_tb(error.__traceback__) if _same_file(f.filename, file)
    ]
    return text + (f" (line {lines[-1]})" if lines else "")


def _registered_modules() -> set[str]:
    """The modules that define the registered families, pairs, forwards, backwards and recipes
    (built-in ones included)."""
    from qflax import layers as ql
    from qflax import quantizers as qz

    out = {type(f).__module__ for f in qz.FAMILIES.values()}
    for registry in (qz.PAIRS, qz.FORWARDS, qz.BACKWARDS, ql.RECIPES):
        out |= {getattr(fn, "__module__", None) for fn in registry.values()}
    return {m for m in out if m and m != "qflax" and not m.startswith("qflax.")}


def extension_files(module: Any) -> list[str]:
    """The files of the user's modules among ``module`` and what it imports that define
    registered quantizer families, pairs or recipes (absolute paths, sorted)."""
    import sys
    import types

    names = {module.__name__}
    for value in vars(module).values():
        if isinstance(value, types.ModuleType):
            names.add(value.__name__)
        else:
            names.add(getattr(value, "__module__", None) or "")
    files = set()
    for name in names & _registered_modules():
        mod = sys.modules.get(name)
        path = getattr(mod, "__file__", None)
        if path:
            files.add(str(pathlib.Path(path).resolve()))
    return sorted(files)


def _import_config_module(file: Any):
    """Imports a config file; inside a package (``experiments/mnist5k/w4a4.py``) under its
    dotted name with the package's root on ``sys.path``, so configs can import each other."""
    import importlib
    import importlib.util
    import sys

    file = file.resolve()
    parts = [file.stem]
    root = file.parent
    while (root / "__init__.py").is_file():
        parts.insert(0, root.name)
        root = root.parent
    if len(parts) > 1 and all(p.isidentifier() for p in parts):
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        return importlib.import_module(".".join(parts))
    module_name = "_qflax_config_" + re.sub(r"\W", "_", str(file))
    module_spec = importlib.util.spec_from_file_location(module_name, file)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"config file {str(file)!r} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
