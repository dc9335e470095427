"""Variable types that let the optimizer and the checkpoints treat quantizer state apart."""

from __future__ import annotations

from flax import nnx

__all__ = ["AuxLoss", "QuantParam", "QuantStat"]


class QuantParam(nnx.Param):
    """A learnable quantizer parameter (step, clip bound, log bit-width, dead-zone width, ...).

    A subclass of ``nnx.Param`` so it is trained with the model, but a distinct type so that an
    optimizer can give it its own learning rate, no weight decay and penalties through the filter
    ``nnx.OfType(QuantParam)`` (and weights through ``nnx.All(nnx.Param, nnx.Not(QuantParam))``).
    """


class QuantStat(nnx.Variable):
    """Non-learnable quantizer state: calibrated ranges, EMA statistics, recorded shapes."""


class AuxLoss(nnx.Variable):
    """An auxiliary training loss a layer computes in its forward pass (a float32 scalar, already
    weighted), e.g. a vector quantizer's codebook and commitment losses. The train step adds the
    sum of every ``AuxLoss`` of the model, as the forward of that step left them, to the task
    loss (gradients flow through it); outside training the values are not read."""
