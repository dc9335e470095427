"""Saving and restoring a :class:`TrainState` in the orbax checkpoints of a run.

The layout (``workdir/checkpoints/<step>/`` with the items ``model``, ``train`` and ``meta``),
the manager and reading a run's model back live in :mod:`qflax.runs`; this module writes a
train state and restores the whole of it on resume. Orbax writes each checkpoint to a temporary
directory and renames it when complete, so an interrupted save never shadows the previous
checkpoint.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from qflax.runs import (
    CheckpointError,
    checkpoint_manager,
    has_checkpoint,
    restore_items,
    restore_model_state,
)
from qflax.train._steps import TrainState

__all__ = [
    "CheckpointError",
    "checkpoint_manager",
    "has_checkpoint",
    "restore_checkpoint",
    "restore_model_state",
    "save_checkpoint",
]


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, meta: dict[str, Any]) -> int:
    """Saves ``state`` (at ``state.step``) and the JSON ``meta``; returns the step."""
    step = int(jax.device_get(state.step))
    train = {
        "step": state.step,
        "opt_state": state.opt_state,
        "rng": state.rng,
        "teacher": state.teacher,
    }
    manager.save(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave({"params": state.params, "rest": state.rest}),
            train=ocp.args.StandardSave(train),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )
    manager.wait_until_finished()
    return step


def restore_checkpoint(
    manager: ocp.CheckpointManager, step: int, template: TrainState
) -> tuple[TrainState, dict[str, Any]]:
    """Restores the checkpoint at ``step`` into the structure of ``template``.

    Raises:
      CheckpointError: the checkpoint cannot be read or does not fit ``template``.
    """
    train_template = {
        "step": template.step,
        "opt_state": template.opt_state,
        "rng": template.rng,
        "teacher": template.teacher,
    }
    restored = restore_items(
        manager,
        step,
        model={"params": template.params, "rest": template.rest},
        train=train_template,
    )
    model, train = restored["model"], restored["train"]
    state = TrainState(
        step=train["step"],
        params=model["params"],
        rest=model["rest"],
        opt_state=train["opt_state"],
        rng=train["rng"],
        teacher=train["teacher"],
    )
    return state, restored["meta"]
