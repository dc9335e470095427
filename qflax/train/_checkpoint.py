"""Saving and restoring a :class:`TrainState` in the orbax checkpoints of a run.

The layout (``workdir/checkpoints/<step>/`` with the items ``model``, ``train`` and ``meta``),
the manager and reading a run's model back live in :mod:`qflax.runs`; this module writes a
train state and restores the whole of it on resume. Orbax writes each checkpoint to a temporary
directory and renames it when complete, so an interrupted save never shadows the previous
checkpoint. Each save records the checksums of its items and each restore checks them
(:func:`qflax.runs.restore_items`); on resume, :func:`restore_latest_good` falls back past
checkpoints that fail, moving each aside to ``checkpoints/corrupt-<step>`` (kept for inspection,
never deleted, and no longer seen by orbax).
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from qflax.runs import (
    CheckpointError,
    checkpoint_manager,
    has_checkpoint,
    restore_items,
    restore_model_state,
    save_items,
)
from qflax.train._steps import TrainState

logger = logging.getLogger("qflax.train")

__all__ = [
    "CheckpointError",
    "checkpoint_manager",
    "has_checkpoint",
    "restore_checkpoint",
    "restore_latest_good",
    "restore_model_state",
    "save_checkpoint",
]


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, meta: dict[str, Any]) -> int:
    """Saves ``state`` (at ``state.step``), the JSON ``meta`` and the checksums of the items;
    returns the step."""
    step = int(jax.device_get(state.step))
    train = {
        "step": state.step,
        "opt_state": state.opt_state,
        "rng": state.rng,
        "teacher": state.teacher,
    }
    save_items(
        manager,
        step,
        meta,
        model={"params": state.params, "rest": state.rest},
        train=train,
        loop=_loop_item(state),
    )
    return step


def _loop_item(state: TrainState) -> dict[str, Any]:
    """What the loop sets on the state besides the optimizer: the bit-width penalty's state,
    the learning-rate scale and the converged flag (saved since 2026-12-06; before, a resumed
    GDNSQ run restarted them)."""
    return {"penalty": state.penalty, "lr_scale": state.lr_scale, "converged": state.converged}


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
    items = {"model": {"params": template.params, "rest": template.rest}, "train": train_template}
    if (pathlib.Path(manager.directory) / str(step) / "loop").is_dir():
        items["loop"] = _loop_item(template)
    else:
        logger.warning(
            "checkpoint step %d predates the saved penalty state: the penalty weight, the "
            "learning-rate scale and the converged flag restart from their initial values",
            step,
        )
    restored = restore_items(manager, step, **items)
    model, train = restored["model"], restored["train"]
    loop = restored.get("loop", _loop_item(template))
    state = TrainState(
        step=train["step"],
        params=model["params"],
        rest=model["rest"],
        opt_state=train["opt_state"],
        rng=train["rng"],
        teacher=train["teacher"],
        penalty=loop["penalty"],
        lr_scale=loop["lr_scale"],
        converged=loop["converged"],
    )
    return state, restored["meta"]


def restore_latest_good(
    manager: ocp.CheckpointManager, template: TrainState
) -> tuple[TrainState, dict[str, Any] | None, int | None]:
    """Restores the newest checkpoint that reads back intact, trying the kept steps newest first.

    Each step that fails (:class:`CheckpointError`: unreadable, or an item differing from its
    checksum) is logged as a warning; once an earlier step restores, the failed ones are moved
    to ``<directory>/corrupt-<step>`` (orbax ignores that name; nothing is deleted) and the step
    used is logged as a warning too, so a fallback is never silent.

    Returns:
      ``(state, meta, step)``; ``(template, None, None)`` when there is no checkpoint.

    Raises:
      CheckpointError: no kept checkpoint restores (then nothing is moved, and ``manager`` is
        closed).
    """
    steps = sorted(manager.all_steps(), reverse=True)
    failed: list[tuple[int, CheckpointError]] = []
    for step in steps:
        try:
            state, meta = restore_checkpoint(manager, step, template)
        except CheckpointError as error:
            logger.warning("cannot resume from step %d: %s", step, error.problem)
            failed.append((step, error))
            continue
        if failed:
            moved = [_set_aside(manager, bad) for bad, _ in failed]
            manager.reload()
            logger.warning(
                "resuming from step %d, the newest good checkpoint; the bad checkpoint of step "
                "%s was moved to %s",
                step,
                ", ".join(str(bad) for bad, _ in failed),
                ", ".join(str(path) for path in moved),
            )
        return state, meta, step
    if not failed:
        return template, None, None
    manager.close()
    tried = ", ".join(str(step) for step, _ in failed)
    raise CheckpointError(
        f"{failed[0][1].problem}; no earlier checkpoint restores either (tried steps {tried}; "
        "nothing was moved)",
        "train in a fresh workdir",
    ) from failed[0][1]


def _set_aside(manager: ocp.CheckpointManager, step: int) -> pathlib.Path:
    directory = pathlib.Path(manager.directory)
    target, n = directory / f"corrupt-{step}", 1
    while target.exists():
        n += 1
        target = directory / f"corrupt-{step}-{n}"
    (directory / str(step)).rename(target)
    return target
