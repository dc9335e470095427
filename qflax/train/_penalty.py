"""GDNSQ exterior-point bit-width penalty, after aifoundry-org/MHAQ ``gdnsq_loss.PotentialLoss``
(Apache-2.0); METHODS.md §3 [code].

Differs from the code: the running mean ``c̄`` includes the current step's task loss (the code
divides the sum of the previous losses by their count plus one, so its first step has ``c̄ = 0``);
the state is an explicit :class:`PenaltyState` instead of module attributes.

Per group (weights, activations) of bit-widths ``b_i`` with target ``B``::

    P   = mean_i max(0, b_i − (B − 1e−3))^p                       (bit_penalty, p = 1)
    ω_w = (n_w + ε) / (n_w + n_a + ε),  ω_a = (n_a + ε) / (n_w + n_a + ε),  ε = 1e−3
          (n = the number of violated constraints b_i > B − 1e−3, as in the code)
    L   = c̄ · t · (ω_w P_w + ω_a P_a) + L_task

with ``c̄`` the running mean of ``sg(L_task)`` and ``t`` the penalty weight: 0 for the first
``warmup_steps`` steps, then ``t_k = t_{k−1} + 2·lr`` (so the first step after warm-up uses
``2·lr``). ``ω`` carries no gradient (it counts). :func:`penalty_loss` is pure and jit-able.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = [
    "PENALTY_MARGIN",
    "PenaltyState",
    "bit_penalty",
    "penalty_init",
    "penalty_loss",
    "violated_count",
    "violated_share",
]

PENALTY_MARGIN = 1e-3  # the constraint is b ≤ target − PENALTY_MARGIN
_EPS = 1e-3  # ω's smoothing, as in the code


class PenaltyState(NamedTuple):
    """The penalty's running state (a pytree; start from :func:`penalty_init`)."""

    step: jax.Array  # int32: steps taken so far.
    loss_mean: jax.Array  # float32: running mean of the task loss (no gradient).
    t: jax.Array  # float32: the penalty weight used at the last step.


def penalty_init() -> PenaltyState:
    """The state before the first step: ``step = 0``, ``loss_mean = 0``, ``t = 0``."""
    return PenaltyState(
        step=jnp.zeros((), jnp.int32),
        loss_mean=jnp.zeros((), jnp.float32),
        t=jnp.zeros((), jnp.float32),
    )


def _flat(bits, target=None, *, allow_empty: bool = False) -> tuple[jax.Array, jax.Array]:
    """All bit-widths of a pytree (an array, a list of per-layer arrays, ...) as one vector,
    and their targets as a vector of the same length.

    ``target`` is one number for every bit-width, or a list/tuple with one target per leaf of
    ``bits`` (per-layer targets).
    """
    leaves = [jnp.ravel(jnp.asarray(leaf, jnp.float32)) for leaf in jax.tree.leaves(bits)]
    if not leaves:
        if not allow_empty:
            raise ValueError("bits=[] is not allowed; allowed: at least one bit-width")
        return jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.float32)
    if isinstance(target, (list, tuple)):
        if len(target) != len(leaves):
            raise ValueError(
                f"target has {len(target)} entries for {len(leaves)} bit-width arrays; allowed: "
                "one number, or one target per array"
            )
        targets = [
            jnp.broadcast_to(jnp.asarray(t, jnp.float32), leaf.shape)
            for t, leaf in zip(target, leaves, strict=True)
        ]
    else:
        t = jnp.asarray(0.0 if target is None else target, jnp.float32)
        targets = [jnp.broadcast_to(t, leaf.shape) for leaf in leaves]
    return jnp.concatenate(leaves), jnp.concatenate(targets)


def _check_p(p) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0:
        raise ValueError(f"p={p!r} is not allowed; allowed: a number > 0")


def bit_penalty(bits, target, p: float = 1, *, allow_empty: bool = False) -> jax.Array:
    """``mean_i max(0, b_i − (target_i − 1e−3))^p`` over every bit-width in ``bits`` (a pytree).

    ``target``: one number, or one per leaf of ``bits``. ``allow_empty``: an empty ``bits``
    gives 0 (a group with nothing to constrain) instead of a ValueError.

    >>> float(bit_penalty(jnp.array([2.0, 5.0, 4.5]), 4.0))
    0.500666618347168
    >>> float(bit_penalty([jnp.array([5.0]), jnp.array([3.0])], [4, 2]))
    1.000999927520752
    """
    _check_p(p)
    b, t = _flat(bits, target, allow_empty=allow_empty)
    excess = jnp.maximum(b - (t - PENALTY_MARGIN), 0.0)
    return jnp.sum(excess**p) / max(b.size, 1)


def violated_count(bits, target, *, allow_empty: bool = False) -> jax.Array:
    """The number (float32) of bit-widths with ``b > target − 1e−3``; no gradient."""
    b, t = _flat(bits, target, allow_empty=allow_empty)
    b = jax.lax.stop_gradient(b)
    return jnp.sum((b > t - PENALTY_MARGIN).astype(jnp.float32))


def violated_share(bits, target, *, allow_empty: bool = False) -> jax.Array:
    """The fraction of bit-widths with ``b > target − 1e−3`` (0..1; 0 when empty); no gradient."""
    size = _flat(bits, target, allow_empty=allow_empty)[0].size
    return violated_count(bits, target, allow_empty=allow_empty) / max(size, 1)


def penalty_loss(
    task_loss: ArrayLike,
    w_bits,
    a_bits,
    state: PenaltyState,
    *,
    target_w: ArrayLike,
    target_a: ArrayLike,
    lr: ArrayLike,
    warmup_steps: int = 0,
    p: float = 1,
) -> tuple[jax.Array, PenaltyState]:
    """``L = c̄·t·(ω_w P_w + ω_a P_a) + L_task`` and the next state (see the module docstring).

    Args:
      task_loss: the scalar task loss of this step (its gradient passes through unchanged).
      w_bits: the weights' continuous bit-widths (a pytree of arrays, e.g. one per layer);
        may be empty (no learned weight bit-widths: that group adds nothing).
      a_bits: the activations' bit-widths (a pytree of arrays); may be empty.
      state: the state after the previous step (:func:`penalty_init` at the start).
      target_w: the weights' target bit-width: one number, or a list with one per leaf of
        ``w_bits`` (per-layer targets).
      target_a: the activations' target bit-width(s), likewise.
      lr: this step's learning rate (``t`` grows by ``2·lr`` per step after warm-up).
      warmup_steps: steps at the start during which ``t = 0``.
      p: the penalty's exponent (the code uses 1).

    Returns:
      ``(loss, new_state)``.
    """
    _check_p(p)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps!r} is not allowed; allowed: an int >= 0")
    task_loss = jnp.asarray(task_loss)
    if task_loss.shape != ():
        raise ValueError(f"task_loss has shape {task_loss.shape}; allowed: a scalar (shape ())")
    current = jax.lax.stop_gradient(task_loss).astype(jnp.float32)
    count = (state.step + 1).astype(jnp.float32)
    loss_mean = state.loss_mean + (current - state.loss_mean) / count
    t = jnp.where(
        state.step >= warmup_steps,
        state.t + 2.0 * jnp.asarray(lr, jnp.float32),
        jnp.zeros((), jnp.float32),
    )
    if not jax.tree.leaves(w_bits) and not jax.tree.leaves(a_bits):
        raise ValueError("w_bits and a_bits are both empty; allowed: at least one bit-width")
    n_w = violated_count(w_bits, target_w, allow_empty=True)
    n_a = violated_count(a_bits, target_a, allow_empty=True)
    omega_w = (n_w + _EPS) / (n_w + n_a + _EPS)
    omega_a = (n_a + _EPS) / (n_w + n_a + _EPS)
    penalty = omega_w * bit_penalty(w_bits, target_w, p, allow_empty=True) + omega_a * (
        bit_penalty(a_bits, target_a, p, allow_empty=True)
    )
    loss = task_loss + (loss_mean * t * penalty).astype(task_loss.dtype)
    return loss, PenaltyState(step=state.step + 1, loss_mean=loss_mean, t=t)
