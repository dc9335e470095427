"""Reading the orbax checkpoints of a run under ``workdir/checkpoints/<step>/``.

Each checkpoint holds four items: ``model`` (``params`` and ``rest``, enough to rebuild the
trained model), ``train`` (step, optimizer state, key, teacher), ``loop`` (the bit-width
penalty's state, the learning-rate scale and the converged flag; checkpoints before 2026-12-06
lack it) and ``meta`` (JSON: epochs done, wall time, and the checksums). ``qflax.train`` writes
them (:func:`save_items`) and restores the whole train state on resume; a run's model alone is
read back with :func:`restore_model_state`.

Integrity: at save, ``meta["sha256"]`` records one :func:`tree_digest` per array item
(``model``, ``train``, ``loop``), computed on the host from the arrays being saved (arrays
sharded over several processes are gathered for it). Every restore hashes the arrays it
read back and raises :class:`CheckpointError` naming the step and the item when they differ, so
bytes changed on disk fail loudly instead of evaluating (or resuming) a damaged model. Only the
items restored are checked: a model-only restore checks ``model``. Checkpoints written before
the checksums (no ``sha256`` in ``meta``) restore unchecked, with an INFO log line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "CHECKPOINT_ITEMS",
    "CheckpointError",
    "checkpoint_manager",
    "has_checkpoint",
    "restore_items",
    "restore_model_state",
    "save_items",
    "tree_digest",
]

CHECKPOINT_ITEMS = ("model", "train", "loop", "meta")
DIGEST_KEY = "sha256"  # meta[DIGEST_KEY] = {item name: tree_digest of that item}

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (corrupt, truncated, changed on disk since it was saved,
    or from another model).

    Attributes:
      problem: what is wrong, without the suggested remedy the message ends with.
    """

    def __init__(self, problem: str, remedy: str = "") -> None:
        super().__init__(f"{problem}; {remedy}" if remedy else problem)
        self.problem = problem


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


def tree_digest(tree: Any) -> str:
    """The sha256 (hex) of every array leaf of ``tree``: dtype, shape and C-order bytes, in
    ``jax.tree.leaves`` order (deterministic for a given structure). ``None`` leaves are skipped.

    >>> import numpy as np
    >>> tree = {"w": np.zeros((2, 3), np.float32)}
    >>> tree_digest(tree) == tree_digest({"w": np.zeros((2, 3), np.float32)})
    True
    >>> tree_digest(tree) == tree_digest({"w": np.zeros((3, 2), np.float32)})  # same bytes
    False
    """
    digest = hashlib.sha256()
    from qflax.parallel import addressable  # arrays over several processes: gathered

    for leaf in jax.tree.leaves(jax.device_get(addressable(tree))):
        array = np.ascontiguousarray(leaf)
        digest.update(f"{array.dtype.name}{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def save_items(
    manager: ocp.CheckpointManager, step: int, meta: dict[str, Any], **items: Any
) -> None:
    """Saves the array items (``model=``, ``train=``: pytrees) and the JSON ``meta`` at ``step``,
    with ``meta["sha256"]`` holding :func:`tree_digest` of each item; waits until written."""
    digests = {name: tree_digest(tree) for name, tree in items.items()}
    args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
    manager.save(
        step,
        args=ocp.args.Composite(**args, meta=ocp.args.JsonSave({**meta, DIGEST_KEY: digests})),
        force=True,
    )
    manager.wait_until_finished()


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


_REMEDY = (
    "`qflax train` with this workdir sets it aside and resumes from the newest earlier checkpoint "
    "that passes, if one is kept"
)


def _corrupt(manager: ocp.CheckpointManager, step: int, error: Exception) -> CheckpointError:
    path = pathlib.Path(manager.directory) / str(step)
    detail = re.sub(r"\s+", " ", str(error))[:300]  # orbax's messages span lines
    return CheckpointError(
        f"the checkpoint {path} (step {step}) is corrupt or does not match this model "
        f"({type(error).__name__}: {detail})",
        _REMEDY,
    )


def _check_digests(
    manager: ocp.CheckpointManager, step: int, restored: dict[str, Any], meta: dict[str, Any]
) -> None:
    recorded = meta.get(DIGEST_KEY)
    path = pathlib.Path(manager.directory) / str(step)
    if recorded is None:
        logger.info("%s has no checksums (saved before qflax recorded them); not verified", path)
        return
    for name, tree in restored.items():
        if name in recorded and tree_digest(tree) != recorded[name]:
            raise CheckpointError(
                f"the checkpoint {path} (step {step}) is corrupt: its {name!r} item does not match "
                "the sha256 recorded when it was saved (its files changed on disk)",
                _REMEDY,
            )


def restore_items(manager: ocp.CheckpointManager, step: int, **templates: Any) -> dict[str, Any]:
    """Restores the items named by ``templates`` (``model=``, ``train=``: pytrees whose
    structure, shapes and dtypes the stored arrays must have) and ``meta`` of the checkpoint at
    ``step``, and checks each restored item against its checksum in ``meta``.

    Returns:
      ``{name: restored tree for each template, "meta": dict}``.

    Raises:
      CheckpointError: the checkpoint cannot be read, does not fit the templates, or an item
        differs from the checksum recorded at save (the message names the step and the item).
    """
    args = {name: ocp.args.StandardRestore(_abstract(tree)) for name, tree in templates.items()}
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(**args, meta=ocp.args.JsonRestore())
        )
    except Exception as error:  # orbax raises many types for unreadable data
        raise _corrupt(manager, step, error) from error
    out = {name: restored[name] for name in templates}
    meta = dict(restored["meta"] or {})
    _check_digests(manager, step, out, meta)
    return {**out, "meta": meta}


def restore_model_state(
    manager: ocp.CheckpointManager, step: int, params: Any, rest: Any
) -> tuple[Any, Any, dict[str, Any]]:
    """Restores only the model item (``params``, ``rest``) and ``meta`` of the checkpoint,
    checked against the model's checksum (see :func:`restore_items`)."""
    restored = restore_items(manager, step, model={"params": params, "rest": rest})
    return restored["model"]["params"], restored["model"]["rest"], restored["meta"]
