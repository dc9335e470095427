"""The optimizer, built from the config as one ``optax.chain``.

Weights and quantizer parameters (``QuantParam``) are told apart by their variable type: both
share the moment estimator, only weights get weight decay, and each group has its own learning
rate schedule (``optimizer.learning_rate`` and ``quant.learning_rate``, same shape). Quantizer
parameters with extra terms are found by the tags their family gives them
(:meth:`qflax.quantizers.QuantizerFamily.param_tags`), never by name or kind.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from qflax.layers import QuantParam

__all__ = [
    "QUANT",
    "WEIGHTS",
    "project_to_box",
    "relative_steps",
    "tag_mask",
    "learning_rate_schedules",
    "make_optimizer",
    "param_labels",
]

WEIGHTS = "weights"
QUANT = "quant"


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def param_labels(model_state: Any) -> Any:
    """A tree of labels, ``"quant"`` for each ``QuantParam`` and ``"weights"`` for other leaves.

    Args:
      model_state: an ``nnx.State`` (or any pytree holding ``nnx.Variable`` s) of parameters,
        or an ``nnx.Module`` (its ``nnx.Param`` state is used).

    Returns:
      A tree of the same structure as ``model_state`` down to its variables (a prefix of the
      parameter tree that ``optax.partition`` accepts).
    """
    if isinstance(model_state, nnx.Module):
        model_state = nnx.state(model_state, nnx.Param)

    def label(x: Any) -> str:
        return QUANT if isinstance(x, QuantParam) else WEIGHTS

    return jax.tree.map(label, model_state, is_leaf=_is_variable)


def tag_mask(model_state: Any, tag: str) -> Any:
    """A tree of bools, True for the ``QuantParam`` s whose family tagged them ``tag``
    (``"clip"``, ``"deadzone"``, ``"bits"``: :data:`qflax.quantizers.PARAM_TAGS`), False
    elsewhere (same structure as :func:`param_labels`)."""
    if isinstance(model_state, nnx.Module):
        model_state = nnx.state(model_state, nnx.Param)

    def match(x: Any) -> bool:
        return isinstance(x, QuantParam) and tag in (x.get_metadata().get("tags") or ())

    return jax.tree.map(match, model_state, is_leaf=_is_variable)


def _masked_update(name: str, fn: Any, mask: Any) -> optax.GradientTransformation:
    """A stateless transformation replacing the update ``u`` of each masked parameter ``p`` by
    ``fn(u, p)`` (``mask``: a bool per variable, a prefix of the trees)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        if params is None:
            raise ValueError(f"{name} needs params; allowed: tx.update(g, s, params)")

        def apply(m, u, p):
            return jax.tree.map(fn, u, p) if m else u

        return jax.tree.map(apply, mask, updates, params), state

    return optax.GradientTransformation(init, update)


def project_to_box(bound: float, mask: Any) -> optax.GradientTransformation:
    """Makes the final updates keep the masked parameters in ``[−bound, bound]``:
    ``u ← clip(p + u, −bound, bound) − p`` (BinaryConnect's clipped latent weights)."""
    return _masked_update("project_to_box", lambda u, p: jnp.clip(p + u, -bound, bound) - p, mask)


def relative_steps(mask: Any) -> optax.GradientTransformation:
    """Scales the updates of the masked parameters by their magnitude: ``u ← u·|p|``.

    For learned step sizes (params tagged ``"step"``): with Adam's normalised direction a step
    then moves ``s`` by a fraction (at most ``lr·max_update``) of itself, as Adam on ``log s``
    would to first order — a step size of ``1e-3`` and one of ``1`` learn at the same relative
    rate, and a step can never cross zero while ``lr·max_update < 1`` (8-bit per-token steps of
    an embedding, ~1/127 of each row's range, went negative under absolute updates).
    """
    return _masked_update("relative_steps", lambda u, p: u * jnp.abs(p), mask)


def learning_rate_schedules(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> tuple[optax.Schedule, optax.Schedule]:
    """The ``(weights, quantizer params)`` learning-rate schedules of ``config``.

    Linear warm-up from 0 over ``optimizer.warmup_epochs``, then constant or a cosine decay to 0
    at the end of ``epochs``; the quantizer schedule is the same with peak
    ``quant.learning_rate``.
    """
    total = max(1, int(config.epochs) * int(steps_per_epoch))
    warmup = min(total, int(round(float(config.optimizer.warmup_epochs) * steps_per_epoch)))

    def make(peak: float) -> optax.Schedule:
        peak = float(peak)
        if warmup >= total:  # the whole run is warm-up
            return optax.linear_schedule(0.0, peak, total)
        if config.optimizer.schedule == "cosine":
            if warmup == 0:
                return optax.cosine_decay_schedule(peak, decay_steps=total)
            return optax.warmup_cosine_decay_schedule(
                0.0, peak, warmup_steps=warmup, decay_steps=total
            )
        if warmup == 0:
            return optax.constant_schedule(peak)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
        )

    return make(config.optimizer.learning_rate), make(config.quant.learning_rate)


def make_optimizer(
    config: ml_collections.ConfigDict,
    model_state: Any,
    *,
    steps_per_epoch: int,
    latent_clip_mask: Any = None,
) -> optax.GradientTransformation:
    """Builds the optimizer of ``config`` as one ``optax.chain``.

    The chain is: [L2 on clipping levels, ``quant.clip_decay``, masked to params tagged
    ``"clip"`` (PACT's ``α``)] -> [L2
    weight decay, masked to weights (adam, sgd)] -> moment estimator (Adam's, or SGD momentum)
    -> [decoupled weight decay, masked to weights (adamw)] -> [each quantizer parameter's step
    clipped to ``±quant.max_update`` (in units of its learning rate)] -> [the decoupled decay
    of params tagged ``"deadzone"`` / ``"bits"`` (CoDeQ's ``θ_d`` / ``θ_b``):
    ``quant.deadzone_decay`` / ``quant.bits_decay``] -> [the updates of params tagged
    ``"step"`` (learned step sizes) times their magnitude, ``quant.relative_steps``:
    :func:`relative_steps`] ->
    ``optax.partition``
    scaling weights by ``-schedule(step)`` and quantizer parameters by ``-quant_schedule(step)``
    -> [projection of 1-bit layers' latent weights onto ``[−quant.latent_clip,
    quant.latent_clip]``]. Quantizer parameters (``QuantParam``) never get weight decay. (The
    chain's update runs under standard dtype promotion, see ``_standard_promotion``.)

    Args:
      config: a validated training config (``optimizer.*``, ``quant.learning_rate``, ``epochs``).
      model_state: the ``nnx.State`` of the parameters to train (or the module); only its
        structure and variable types are used.
      steps_per_epoch: optimizer steps per epoch (for the warm-up and the cosine length).
      latent_clip_mask: a bool tree over ``model_state`` (True: a latent weight of a 1-bit
        layer) for ``quant.latent_clip``; None: no projection.

    Returns:
      The gradient transformation; ``init`` it with the parameter state.

    Example:
      >>> from flax import nnx
      >>> from qflax import models
      >>> from qflax.train import default_config
      >>> model = models.MLP((4,), 3, hidden=(8,), rngs=nnx.Rngs(0))
      >>> params = nnx.state(model, nnx.Param)
      >>> tx = make_optimizer(default_config(), params, steps_per_epoch=10)
      >>> opt_state = tx.init(params)
    """
    if isinstance(model_state, nnx.Module):
        model_state = nnx.state(model_state, nnx.Param)
    labels = param_labels(model_state)
    is_weight = jax.tree.map(lambda label: label == WEIGHTS, labels)
    opt = config.optimizer
    schedule, quant_schedule = learning_rate_schedules(config, steps_per_epoch)
    decay = float(opt.weight_decay)
    weight_decay = optax.masked(optax.add_decayed_weights(decay), is_weight)

    parts: list[optax.GradientTransformation] = []
    clip_decay = float(config.quant.clip_decay)
    if clip_decay:
        parts.append(
            optax.masked(optax.add_decayed_weights(clip_decay), tag_mask(model_state, "clip"))
        )
    if opt.name == "sgd":
        if decay:
            parts.append(weight_decay)
        if opt.momentum:
            parts.append(optax.trace(decay=float(opt.momentum)))
    elif opt.name == "adam":
        if decay:
            parts.append(weight_decay)
        parts.append(optax.scale_by_adam())
    elif opt.name == "adamw":
        parts.append(optax.scale_by_adam())
        if decay:
            parts.append(weight_decay)
    else:
        raise ValueError(f"optimizer.name={opt.name!r} is not allowed; allowed: adam, adamw, sgd")
    max_update = float(config.quant.max_update)
    if max_update:
        # Bounded quantizer steps: Adam's first update after a calm stretch can reach
        # ~lr/sqrt(1 - b2) = 31·lr, which throws learned log-steps several bits past a target
        # when the bit-width penalty switches on (seen on mnist5k: activations fell to 0 bits).
        is_quant = jax.tree.map(lambda label: label == QUANT, labels)
        parts.append(optax.masked(optax.clip(max_update), is_quant))
    for coefficient, tag in (
        (float(config.quant.deadzone_decay), "deadzone"),
        (float(config.quant.bits_decay), "bits"),
    ):
        if coefficient:
            # Decoupled: added after the moment estimator and after the step clip (clipped with
            # Adam's step, a decay could move θ no more than lr per step, whatever its size),
            # then scaled by the quantizer learning rate.
            parts.append(
                optax.masked(optax.add_decayed_weights(coefficient), tag_mask(model_state, tag))
            )
    if config.quant.get("relative_steps", False):
        parts.append(relative_steps(tag_mask(model_state, "step")))
    parts.append(
        optax.partition(
            {
                WEIGHTS: optax.scale_by_learning_rate(schedule),
                QUANT: optax.scale_by_learning_rate(quant_schedule),
            },
            labels,
        )
    )
    if latent_clip_mask is not None and float(config.quant.latent_clip):
        parts.append(project_to_box(float(config.quant.latent_clip), latent_clip_mask))
    return _standard_promotion(optax.chain(*parts))


def _standard_promotion(
    tx: optax.GradientTransformationExtraArgs,
) -> optax.GradientTransformationExtraArgs:
    """``tx`` with its update traced under standard dtype promotion.

    optax's Adam bias correction computes ``b1 ** count`` (a Python float to an int32 power),
    which ``jax_numpy_dtype_promotion="strict"`` (our tests) rejects; the values are the same.
    """

    def update(updates, state, params=None, **extra_args):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(tx.init, update)
