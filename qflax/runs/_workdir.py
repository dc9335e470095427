"""A run's directory: the names of its files, its config (``load_config``) and its trained model
(``load_model``: the config's model rebuilt and its latest checkpoint restored into it).

``qflax train --workdir DIR`` writes ``config.json`` (the config it was started with),
``metrics.jsonl``, ``checkpoints/<step>/``, ``summary.json``, ``curves.png``,
``quantization.txt`` (quantized runs) and, with ``teacher.mode="train"``, the teacher's run in
``teacher/``.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import ml_collections
from flax import nnx

from qflax.runs._build import build_model, load_dataset
from qflax.runs._checkpoint import checkpoint_manager, has_checkpoint, restore_model_state
from qflax.runs._schema import OPEN_KEYS, default_config, lock_config
from qflax.runs._validate import validate_config

__all__ = [
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "CURVES_FILE",
    "METRICS_FILE",
    "QUANTIZATION_FILE",
    "SUMMARY_FILE",
    "TEACHER_DIR",
    "load_config",
    "load_model",
]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"
QUANTIZATION_FILE = "quantization.txt"
CHECKPOINT_DIR = "checkpoints"
TEACHER_DIR = "teacher"


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a run in ``workdir`` was started with (``workdir/config.json``), locked."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{path} does not exist; allowed: a workdir written by `qflax train`")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); it was not written by qflax"
        ) from error
    if isinstance(values.get("pair"), str):  # runs before the pair group: the name alone
        values["pair"] = {"name": values["pair"]}
    config = default_config()
    with config.unlocked():
        for key, value in values.items():
            if key not in config:
                config[key] = value  # validate_config reports it with near matches
            elif isinstance(config[key], ml_collections.ConfigDict) and isinstance(value, dict):
                if key in OPEN_KEYS:
                    config[key] = ml_collections.ConfigDict(value)
                else:
                    with config[key].unlocked():
                        config[key].update(value)
            else:
                config[key] = value
    return lock_config(config)


def load_model(
    workdir: str | os.PathLike, *, step: int | None = None
) -> tuple[nnx.Module, ml_collections.ConfigDict, dict[str, Any]]:
    """Rebuilds the model of the run in ``workdir`` from its latest (or given) checkpoint.

    Returns:
      ``(model, config, meta)``; ``meta`` holds ``step`` and ``epoch`` of the checkpoint.

    Raises:
      ValueError: no config or no checkpoint in ``workdir``; CheckpointError (a ValueError)
        when the checkpoint is corrupt or its model differs from the checksum recorded at save
        (read-only: the workdir is not changed).
    """
    workdir = pathlib.Path(workdir)
    config = validate_config(load_config(workdir))
    directory = workdir / CHECKPOINT_DIR
    if not has_checkpoint(directory):
        raise ValueError(f"{directory} holds no checkpoint; train first (`qflax train`)")
    dataset = load_dataset(config)
    model, _ = build_model(config, dataset)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # as qflax.train splits it
    manager = checkpoint_manager(directory, max_to_keep=config.checkpoint.max_to_keep)
    try:  # closed on errors too: orbax's threads otherwise print noise at exit
        step = manager.latest_step() if step is None else step
        params, rest, meta = restore_model_state(manager, step, params, rest)
    finally:
        manager.close()
    return nnx.merge(graphdef, params, rest), config, meta
