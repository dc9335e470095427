"""Orbax checkpoints of a :class:`TrainState` under ``workdir/checkpoints/<step>/``.

Each checkpoint holds three items: ``model`` (``params`` and ``rest``, enough to rebuild the
trained model), ``train`` (step, optimizer state, key, teacher) and ``meta`` (JSON: epochs done,
wall time). Orbax writes each checkpoint to a temporary directory and renames it when complete,
so an interrupted save never shadows the previous checkpoint.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from qflax.train._steps import TrainState

__all__ = [
    "CheckpointError",
    "checkpoint_manager",
    "has_checkpoint",
    "restore_checkpoint",
    "restore_model_state",
    "save_checkpoint",
]

ITEMS = ("model", "train", "meta")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (corrupt, truncated, or from another model)."""


def has_checkpoint(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds at least one finished checkpoint (a ``<step>`` folder)."""
    directory = pathlib.Path(directory)
    return directory.is_dir() and any(p.is_dir() and p.name.isdigit() for p in directory.iterdir())


def checkpoint_manager(directory: str | os.PathLike, *, max_to_keep: int) -> ocp.CheckpointManager:
    """A synchronous orbax ``CheckpointManager`` keeping the newest ``max_to_keep`` steps."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(
        pathlib.Path(directory).absolute(), options=options, item_names=ITEMS
    )


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


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _corrupt(manager: ocp.CheckpointManager, step: int, error: Exception) -> CheckpointError:
    path = pathlib.Path(manager.directory) / str(step)
    return CheckpointError(
        f"the checkpoint {path} is corrupt or does not match this model "
        f"({type(error).__name__}: {str(error)[:300]}); delete that folder to resume from an "
        "earlier checkpoint, or train in a fresh workdir"
    )


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
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardRestore(
                    _abstract({"params": template.params, "rest": template.rest})
                ),
                train=ocp.args.StandardRestore(_abstract(train_template)),
                meta=ocp.args.JsonRestore(),
            ),
        )
    except Exception as error:  # orbax raises many types for unreadable data
        raise _corrupt(manager, step, error) from error
    model, train = restored["model"], restored["train"]
    state = TrainState(
        step=train["step"],
        params=model["params"],
        rest=model["rest"],
        opt_state=train["opt_state"],
        rng=train["rng"],
        teacher=train["teacher"],
    )
    return state, dict(restored["meta"])


def restore_model_state(
    manager: ocp.CheckpointManager, step: int, params: Any, rest: Any
) -> tuple[Any, Any, dict[str, Any]]:
    """Restores only the model item (``params``, ``rest``) and ``meta`` of the checkpoint."""
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardRestore(_abstract({"params": params, "rest": rest})),
                meta=ocp.args.JsonRestore(),
            ),
        )
    except Exception as error:
        raise _corrupt(manager, step, error) from error
    return restored["model"]["params"], restored["model"]["rest"], dict(restored["meta"])
