"""What a model is trained to do: the per-example loss and the score the loop reports.

A model names its task with a class attribute ``task`` (default ``"classify"``): classifiers and
language models return logits scored by cross-entropy and accuracy; autoencoders
(``"reconstruct"``) return their reconstruction of the input, scored by the mean squared error
and the PSNR (images in [0, 1]: peak 1). The steps and the loop ask the task; they hold no
per-model branches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["TASKS", "Task", "accuracy", "cross_entropy", "model_task", "psnr"]


@dataclasses.dataclass(frozen=True)
class Task:
    """``loss(outputs, inputs, labels)`` and ``score(...)`` return one value per example (per
    position for sequence models); ``metric`` names the score in metrics and summaries
    (``train_<metric>``, ``test_<metric>``), and ``higher_is_better`` says which way it goes."""

    name: str
    metric: str
    loss: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
    score: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
    higher_is_better: bool = True


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example (per-token) softmax cross-entropy with integer labels, in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example (per-token) 1.0 where the arg-max logit is the label, else 0.0."""
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def _squared_error(outputs: jax.Array, inputs: jax.Array) -> jax.Array:
    """Mean squared error of each example over its elements."""
    if outputs.shape != inputs.shape:
        raise ValueError(
            f"a reconstruction of shape {outputs.shape} does not match its input "
            f"{inputs.shape}; allowed: a model returning its input's shape"
        )
    err = (outputs.astype(jnp.float32) - inputs.astype(jnp.float32)) ** 2
    return jnp.mean(err.reshape(err.shape[0], -1), axis=-1)


def psnr(mse: jax.Array, peak: float = 1.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB, ``10·log10(peak² / mse)`` (``mse`` floored at 1e-10,
    so a perfect reconstruction reads 100 dB at peak 1)."""
    return 10.0 * jnp.log10(peak**2 / jnp.maximum(mse, 1e-10))


TASKS: dict[str, Task] = {
    "classify": Task(
        "classify",
        "accuracy",
        loss=lambda out, x, y: cross_entropy(out, y),
        score=lambda out, x, y: accuracy(out, y),
    ),
    "reconstruct": Task(
        "reconstruct",
        "psnr",
        loss=lambda out, x, y: _squared_error(out, x),
        score=lambda out, x, y: psnr(_squared_error(out, x)),
    ),
}


def model_task(model: Any) -> Task:
    """The :class:`Task` a model names with its ``task`` attribute (default ``"classify"``)."""
    name = getattr(model, "task", "classify")
    if name not in TASKS:
        raise ValueError(
            f"{type(model).__name__}.task={name!r} is not allowed; allowed: {', '.join(TASKS)}"
        )
    return TASKS[name]
