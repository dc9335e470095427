"""qflax: differentiable neural-network quantization for JAX and Flax.

Submodules are imported lazily so that ``import qflax`` stays cheap:
``qflax.numerics``, ``qflax.quantizers``, ``qflax.calibration`` (and, as they land,
``qflax.layers``, ``qflax.models``, ``qflax.data``, ``qflax.runs``, ``qflax.train``,
``qflax.export``).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "numerics",
    "quantizers",
    "calibration",
    "ops",
    "layers",
    "models",
    "data",
    "runs",
    "train",
    "export",
)

__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"qflax.{name}")
    raise AttributeError(f"module 'qflax' has no attribute {name!r}")
