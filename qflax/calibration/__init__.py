"""Calibration: range estimators returning ``(scale, zero_point)``, and EMA range tracking.

Convention: ``q = clip(round(x / s) + z, qmin, qmax)``, ``x_hat = s * (q - z)`` with
``(qmin, qmax) = qflax.numerics.int_range(bits, signed, narrow_range)``; symmetric: ``z = 0``.
"""

from qflax.calibration._calibration import (
    MIN_SCALE,
    EmaRange,
    absmax,
    ema_init,
    ema_scale,
    ema_update,
    minmax,
    mse,
    percentile,
)

__all__ = [
    "MIN_SCALE",
    "EmaRange",
    "absmax",
    "ema_init",
    "ema_scale",
    "ema_update",
    "minmax",
    "mse",
    "percentile",
]
