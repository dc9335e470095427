"""Variable types that let the optimizer and the checkpoints treat quantizer state apart."""

from __future__ import annotations

from flax import nnx

__all__ = ["QuantParam", "QuantStat"]


class QuantParam(nnx.Param):
    """A learnable quantizer parameter (step, clip bound, log bit-width, dead-zone width, ...).

    A subclass of ``nnx.Param`` so it is trained with the model, but a distinct type so that an
    optimizer can give it its own learning rate, no weight decay and penalties through the filter
    ``nnx.OfType(QuantParam)`` (and weights through ``nnx.All(nnx.Param, nnx.Not(QuantParam))``).
    """


class QuantStat(nnx.Variable):
    """Non-learnable quantizer state: calibrated ranges, EMA statistics, recorded shapes."""
