"""Runs on disk: the training config and what a run's workdir holds.

What ``qflax train``, ``qflax eval``, ``qflax ptq`` and ``qflax summary`` share about a run,
with no training code (``qflax.train`` and ``qflax.export`` both build on this package):

* the config schema: :func:`default_config` (every key and its default), :func:`lock_config`,
  :func:`config_diff`, :func:`flatten_config`, :func:`config_to_dict`, :func:`near_matches`,
  :func:`all_keys`, and the key lists (``RESUMABLE_KEYS``, ``OPEN_KEYS``, ...);
* checking a config: :func:`validate_config`, and :func:`ensure_valid` (validates a config once:
  a config validated already and unchanged since is not checked again);
* config files and overrides: :func:`load_config_file` (``path.py[:arg]``),
  :func:`apply_overrides` and :func:`parse_value` (``--config.KEY=VALUE``);
* building what a config describes: :func:`build_recipe`, :func:`quantization_rules`,
  :func:`load_dataset`, :func:`build_model`, :func:`quantize_for_config`, :func:`first_batch`,
  :func:`teacher_config`;
* a workdir: its file names (``CONFIG_FILE``, ``CHECKPOINT_DIR``, ...), :func:`load_config`,
  the guards of a directory a command writes (:func:`check_output_dir`, :func:`check_run_dir`,
  :func:`lock_dir`: one writer at a time, :class:`DirInUseError`),
  :func:`load_model`, and reading its checkpoints (:func:`checkpoint_manager`,
  :func:`has_checkpoint`, :func:`save_items`, :func:`restore_items`,
  :func:`restore_model_state`, :func:`tree_digest` (the checksum each restore checks),
  :class:`CheckpointError`).
* TensorBoard event files without TensorFlow: :class:`EventWriter`, :func:`read_scalars`.
"""

from qflax.runs._build import (
    build_model,
    build_recipe,
    first_batch,
    import_extension,
    import_extensions,
    load_dataset,
    pair_selection,
    quantization_rules,
    quantize_for_config,
    recipe_kwargs_for,
    teacher_config,
)
from qflax.runs._checkpoint import (
    CHECKPOINT_ITEMS,
    CheckpointError,
    checkpoint_manager,
    has_checkpoint,
    restore_items,
    restore_model_state,
    save_items,
    tree_digest,
)
from qflax.runs._events import EventWriter, read_scalars
from qflax.runs._files import extension_files, load_config_file
from qflax.runs._guard import (
    LOCK_FILE,
    DirInUseError,
    check_output_dir,
    check_run_dir,
    lock_dir,
)
from qflax.runs._overrides import apply_overrides, parse_value
from qflax.runs._schema import (
    DIVERGENCES,
    FLOAT_RECIPE,
    OPEN_KEYS,
    OPTIMIZERS,
    RESUMABLE_KEYS,
    SCHEDULES,
    SHORTHAND_KEYS,
    TEACHER_MODES,
    all_keys,
    config_diff,
    config_to_dict,
    default_config,
    flatten_config,
    lock_config,
    near_matches,
)
from qflax.runs._validate import ensure_valid, is_validated, validate_config
from qflax.runs._workdir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    CURVES_FILE,
    METRICS_FILE,
    QUANTIZATION_FILE,
    SUMMARY_FILE,
    TEACHER_DIR,
    load_config,
    load_model,
)

__all__ = [
    "EventWriter",
    "read_scalars",
    "extension_files",
    "import_extension",
    "import_extensions",
    "pair_selection",
    "recipe_kwargs_for",
    "CHECKPOINT_DIR",
    "CHECKPOINT_ITEMS",
    "CONFIG_FILE",
    "CURVES_FILE",
    "DIVERGENCES",
    "FLOAT_RECIPE",
    "METRICS_FILE",
    "OPEN_KEYS",
    "OPTIMIZERS",
    "QUANTIZATION_FILE",
    "RESUMABLE_KEYS",
    "SCHEDULES",
    "SHORTHAND_KEYS",
    "SUMMARY_FILE",
    "TEACHER_DIR",
    "TEACHER_MODES",
    "CheckpointError",
    "DirInUseError",
    "LOCK_FILE",
    "all_keys",
    "apply_overrides",
    "build_model",
    "build_recipe",
    "check_output_dir",
    "check_run_dir",
    "checkpoint_manager",
    "config_diff",
    "config_to_dict",
    "default_config",
    "ensure_valid",
    "first_batch",
    "flatten_config",
    "has_checkpoint",
    "is_validated",
    "load_config",
    "load_config_file",
    "load_dataset",
    "load_model",
    "lock_config",
    "lock_dir",
    "near_matches",
    "parse_value",
    "quantization_rules",
    "quantize_for_config",
    "restore_items",
    "restore_model_state",
    "save_items",
    "teacher_config",
    "tree_digest",
    "validate_config",
]
