"""Reading the orbax checkpoints of a run under ``workdir/checkpoints/<step>/``.

Each checkpoint holds three items: ``model`` (``params`` and ``rest``, enough to rebuild the
trained model), ``train`` (step, optimizer state, key, teacher) and ``meta`` (JSON: epochs done,
wall time). ``qflax.train`` writes them (``save_checkpoint``) and restores the whole train state
on resume; a run's model alone is read back with :func:`restore_model_state`.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = [
    "CHECKPOINT_ITEMS",
    "CheckpointError",
    "checkpoint_manager",
    "has_checkpoint",
    "restore_items",
    "restore_model_state",
]

CHECKPOINT_ITEMS = ("model", "train", "meta")


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
        pathlib.Path(directory).absolute(), options=options, item_names=CHECKPOINT_ITEMS
    )


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _corrupt(manager: ocp.CheckpointManager, step: int, error: Exception) -> CheckpointError:
    path = pathlib.Path(manager.directory) / str(step)
    return CheckpointError(
        f"the checkpoint {path} is corrupt or does not match this model "
        f"({type(error).__name__}: {str(error)[:300]}); delete that folder to resume from an "
        "earlier checkpoint, or train in a fresh workdir"
    )


def restore_items(manager: ocp.CheckpointManager, step: int, **templates: Any) -> dict[str, Any]:
    """Restores the items named by ``templates`` (``model=``, ``train=``: pytrees whose
    structure, shapes and dtypes the stored arrays must have) and ``meta`` of the checkpoint at
    ``step``.

    Returns:
      ``{name: restored tree for each template, "meta": dict}``.

    Raises:
      CheckpointError: the checkpoint cannot be read or does not fit the templates.
    """
    args = {name: ocp.args.StandardRestore(_abstract(tree)) for name, tree in templates.items()}
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(**args, meta=ocp.args.JsonRestore())
        )
    except Exception as error:  # orbax raises many types for unreadable data
        raise _corrupt(manager, step, error) from error
    out = {name: restored[name] for name in templates}
    out["meta"] = dict(restored["meta"])
    return out


def restore_model_state(
    manager: ocp.CheckpointManager, step: int, params: Any, rest: Any
) -> tuple[Any, Any, dict[str, Any]]:
    """Restores only the model item (``params``, ``rest``) and ``meta`` of the checkpoint."""
    restored = restore_items(manager, step, model={"params": params, "rest": rest})
    return restored["model"]["params"], restored["model"]["rest"], restored["meta"]
