"""Checking a training config before any work starts: ``validate_config``, and ``ensure_valid``,
which skips the checks for a config validated already and unchanged since (so one command
validates its config once, however many functions it passes through).
"""

from __future__ import annotations

import copy
import math
import re
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from qflax.runs._build import build_recipe, import_extensions, recipe_kwargs_for
from qflax.runs._schema import (
    DIVERGENCES,
    FLOAT_RECIPE,
    OPEN_KEYS,
    OPTIMIZERS,
    SCHEDULES,
    SHORTHAND_KEYS,
    TEACHER_MODES,
    _config_keys,
    _schema_keys,
    near_matches,
)

__all__ = ["ensure_valid", "is_validated", "validate_config"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(value: Any, field: str, lo: int) -> None:
    if not _is_int(value) or value < lo:
        raise ValueError(f"{field}={value!r} is not allowed; allowed: integers >= {lo}")


def _check_number(value: Any, field: str, lo: float, hi: float = math.inf, *, open_lo=False):
    ok = _is_number(value) and math.isfinite(value) and value <= hi
    ok = ok and (value > lo if open_lo else value >= lo)
    if not ok:
        bound = f"> {lo}" if open_lo else f">= {lo}"
        upper = "" if hi == math.inf else f" and <= {hi}"
        raise ValueError(
            f"{field}={value!r} is not allowed; allowed: finite numbers {bound}{upper}"
        )


def _check_choice(value: Any, field: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(
            f"{field}={value!r} is not allowed; allowed: {', '.join(map(repr, allowed))}"
        )


def _recipe_names() -> tuple[str, ...] | None:
    """The names of ``qflax.layers.RECIPES``, or None when qflax.layers is not available."""
    try:
        from qflax import layers as ql

        return tuple(ql.RECIPES)
    except (ImportError, AttributeError):
        return None


def _check_recipe(name: Any, field: str, config: ml_collections.ConfigDict) -> None:
    if name == FLOAT_RECIPE:
        return
    names = _recipe_names()
    if names is None:
        raise ValueError(
            f"{field}={name!r} needs qflax.layers, which is not available; allowed: 'none'"
        )
    _check_choice(name, field, (FLOAT_RECIPE, *names))
    try:
        kwargs = recipe_kwargs_for(config, name)
        build_recipe(name, config.quant.weight_bits, config.quant.act_bits, kwargs)
    except ValueError as error:
        raise ValueError(f"{field}={name!r}: {error}") from error


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every value of a training config; raises before any training work starts.

    A config that passes is remembered as validated (with a snapshot of its values), so
    :func:`ensure_valid` does not check it again while it stays unchanged.

    Args:
      config: a config with the keys of :func:`default_config`.

    Returns:
      ``config`` itself (unchanged), for chaining.

    Raises:
      ValueError: a key that is not in the schema (with the nearest known keys), a missing key,
        or a bad value; the message names the key, the value and what is allowed.
    """
    _check_config(config)
    _remember(config)
    return config


def ensure_valid(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """:func:`validate_config`, unless ``config`` was validated already and has not changed
    since (any value set after the validation, nested ones included, checks it again).

    Returns:
      ``config`` itself, for chaining.
    """
    if not is_validated(config):
        validate_config(config)
    return config


def is_validated(config: Any) -> bool:
    """Whether ``config`` passed :func:`validate_config` and holds the same values now."""
    entry = _VALIDATED.get(id(config))
    if entry is None or entry[0]() is not config:
        return False
    try:
        return _snapshot(config) == entry[1]
    except Exception:  # noqa: BLE001 - a value that cannot be copied: check again
        return False


# id(config) -> (weak reference to it, snapshot of its values when it passed validate_config).
_VALIDATED: dict[int, tuple[weakref.ref, Any]] = {}


def _snapshot(config: ml_collections.ConfigDict) -> Any:
    return copy.deepcopy(config.to_dict())


def _remember(config: ml_collections.ConfigDict) -> None:
    key = id(config)
    try:
        ref = weakref.ref(config, lambda _, key=key: _VALIDATED.pop(key, None))
        _VALIDATED[key] = (ref, _snapshot(config))
    except Exception:  # noqa: BLE001 - a value that cannot be copied: not remembered
        _VALIDATED.pop(key, None)


def _check_config(config: ml_collections.ConfigDict) -> None:
    """Every check of :func:`validate_config`; raises ValueError on the first bad value."""
    from qflax.data import DATASETS, TFDS_PREFIX
    from qflax.models import MODELS
    from qflax.numerics import MAX_BITS, MIN_BITS

    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(
            f"config of type {type(config).__name__} is not allowed; allowed: "
            "an ml_collections.ConfigDict (see qflax.train.default_config)"
        )
    imports = config.get("imports", ())
    if not isinstance(imports, (list, tuple)) or not all(isinstance(i, str) for i in imports):
        raise ValueError(
            f"imports={imports!r} is not allowed; allowed: a tuple of .py paths or module names"
        )
    import_extensions(config)  # the user's families, pairs and recipes, before names are checked
    schema = _schema_keys()
    present = _config_keys(config)
    unknown = [k for k in present if k not in schema and k not in SHORTHAND_KEYS]
    if unknown:
        hints = "; ".join(
            f"{k!r} (did you mean {', '.join(map(repr, near_matches(k, schema))) or 'nothing'}?)"
            for k in unknown
        )
        raise ValueError(f"unknown config key(s): {hints}; allowed keys: {', '.join(schema)}")
    missing = [k for k in schema if k not in present]
    if missing:
        raise ValueError(f"config misses key(s) {missing}; start from default_config()")

    dataset = config.dataset
    if not isinstance(dataset, str) or not (
        dataset in DATASETS or (dataset.startswith(TFDS_PREFIX) and len(dataset) > len(TFDS_PREFIX))
    ):
        allowed = ", ".join(map(repr, DATASETS)) + f", '{TFDS_PREFIX}<name>'"
        raise ValueError(f"dataset={dataset!r} is not known; allowed: {allowed}")
    _check_choice(config.model, "model", tuple(MODELS))
    _check_int(config.epochs, "epochs", 1)
    _check_int(config.batch_size, "batch_size", 1)
    _check_int(config.eval_batch_size, "eval_batch_size", 1)
    _check_int(config.seed, "seed", 0)
    _check_int(config.augment_shift, "augment_shift", 0)

    opt = config.optimizer
    _check_choice(opt.name, "optimizer.name", OPTIMIZERS)
    _check_number(opt.learning_rate, "optimizer.learning_rate", 0.0, open_lo=True)
    _check_number(opt.momentum, "optimizer.momentum", 0.0, 1.0)
    if opt.momentum == 1.0:
        raise ValueError("optimizer.momentum=1.0 is not allowed; allowed: numbers in [0, 1)")
    _check_number(opt.weight_decay, "optimizer.weight_decay", 0.0)
    _check_choice(opt.schedule, "optimizer.schedule", SCHEDULES)
    _check_number(opt.warmup_epochs, "optimizer.warmup_epochs", 0.0)
    if opt.warmup_epochs > config.epochs:
        raise ValueError(
            f"optimizer.warmup_epochs={opt.warmup_epochs!r} is longer than epochs="
            f"{config.epochs}; allowed: numbers in [0, epochs]"
        )

    quant = config.quant
    for field in ("weight_bits", "act_bits"):
        bits = quant[field]
        if not _is_int(bits) or not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(
                f"quant.{field}={bits!r} is out of range; allowed: integers {MIN_BITS}..{MAX_BITS}"
            )
    if not isinstance(quant.first_last_float, bool):
        raise ValueError(
            f"quant.first_last_float={quant.first_last_float!r} is not allowed; "
            "allowed: True, False"
        )
    _check_number(quant.learning_rate, "quant.learning_rate", 0.0, open_lo=True)
    pair = config.pair
    from qflax.quantizers import BACKWARDS, FORWARDS, PAIRS

    for field, registry in (("name", PAIRS), ("forward", FORWARDS), ("backward", BACKWARDS)):
        value = pair[field]
        if not isinstance(value, str) or (value and value not in registry):
            allowed = "'' or " + ", ".join(map(repr, registry))
            raise ValueError(f"pair.{field}={value!r} is not allowed; allowed: {allowed}")
    if bool(pair.forward) != bool(pair.backward):
        raise ValueError(
            f"pair.forward={pair.forward!r} with pair.backward={pair.backward!r} is not "
            "allowed; allowed: both (a composed pair, which replaces pair.name) or neither"
        )
    _check_recipe(quant.recipe, "quant.recipe", config)
    if quant.recipe == FLOAT_RECIPE and len(config.recipe_kwargs):
        raise ValueError(
            f"recipe_kwargs {sorted(config.recipe_kwargs)} are not arguments of recipe "
            f"{FLOAT_RECIPE!r}, which takes none; allowed: no recipe_kwargs, or a quant.recipe "
            "that takes them"
        )
    rules = quant.rules
    if not isinstance(rules, (list, tuple)):
        raise ValueError(f"quant.rules={rules!r} is not allowed; allowed: (pattern, recipe) pairs")
    for i, rule in enumerate(rules):
        if not (
            isinstance(rule, (list, tuple))
            and len(rule) in (2, 3)
            and isinstance(rule[0], str)
            and (len(rule) == 2 or isinstance(rule[2], (Mapping, ml_collections.ConfigDict)))
        ):
            raise ValueError(
                f"quant.rules[{i}]={rule!r} is not allowed; allowed: a (pattern, recipe) pair "
                "or (pattern, recipe, {recipe keywords})"
            )
        if len(rule) == 3 and rule[1] == FLOAT_RECIPE and rule[2]:
            raise ValueError(
                f"quant.rules[{i}]={rule!r} gives keywords to recipe {FLOAT_RECIPE!r}, which "
                "takes none; allowed: no keywords for a float rule"
            )
        try:
            re.compile(rule[0])
        except re.error as error:
            raise ValueError(
                f"quant.rules[{i}] pattern {rule[0]!r} is not a regular expression: {error}"
            ) from error
        _check_recipe(rule[1], f"quant.rules[{i}] recipe", config)

    teacher = config.teacher
    _check_choice(teacher.mode, "teacher.mode", TEACHER_MODES)
    _check_choice(teacher.divergence, "teacher.divergence", DIVERGENCES)
    _check_number(teacher.weight, "teacher.weight", 0.0, 1.0)
    _check_number(teacher.temperature, "teacher.temperature", 0.0, open_lo=True)
    if not isinstance(teacher.init_student, bool):
        raise ValueError(
            f"teacher.init_student={teacher.init_student!r} is not allowed; allowed: True, False"
        )
    if teacher.mode == "checkpoint":
        import pathlib

        path = pathlib.Path(teacher.path) if teacher.path else None
        if path is None or not (path / "config.json").is_file():
            raise ValueError(
                f"teacher.path={teacher.path!r} is not a workdir of a finished run; allowed: a "
                "directory holding config.json and checkpoints/ (from `qflax train`)"
            )

    if "target_bits" in config:
        value = config.target_bits
        if not _is_int(value) or not MIN_BITS <= value <= MAX_BITS:
            raise ValueError(
                f"target_bits={value!r} is out of range; allowed: integers {MIN_BITS}..{MAX_BITS}"
            )
    for key in ("clip_decay", "deadzone_decay", "bits_decay", "latent_clip", "max_update"):
        _check_number(quant[key], f"quant.{key}", 0.0)
    if not isinstance(quant.relative_steps, bool):
        raise ValueError(f"quant.relative_steps={quant.relative_steps!r}; allowed: True, False")
    if quant.relative_steps and not 0 < quant.learning_rate * quant.max_update < 1:
        raise ValueError(
            f"quant.relative_steps=True with quant.learning_rate={quant.learning_rate!r} and "
            f"quant.max_update={quant.max_update!r}; allowed: 0 < learning_rate·max_update < 1 "
            "(a relative step of 1 or more can reach zero)"
        )
    _check_number(config.anneal.mu_end, "anneal.mu_end", 0.0)
    from qflax.layers import COMPUTE_DTYPES

    if config.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"compute_dtype={config.compute_dtype!r} is not allowed; allowed: {COMPUTE_DTYPES}"
        )
    if not isinstance(config.tensorboard, bool):
        raise ValueError(f"tensorboard={config.tensorboard!r}; allowed: True, False")
    _check_int(config.profile.start_step, "profile.start_step", 0)
    _check_int(config.profile.num_steps, "profile.num_steps", 0)
    from qflax.parallel import check_distributed, check_mesh

    check_distributed(config.distributed)
    sizes = check_mesh(config.mesh)
    pieces = sizes["data"] * sizes["fsdp"]
    if pieces > 0 and _is_int(config.batch_size) and config.batch_size % pieces:
        raise ValueError(
            f"batch_size={config.batch_size} does not split over mesh data × fsdp = {pieces}; "
            f"allowed: a multiple of {pieces}"
        )
    pen = config.penalty
    _check_number(pen.warmup_epochs, "penalty.warmup_epochs", 0.0)
    _check_number(pen.power, "penalty.power", 0.0, open_lo=True)
    _check_number(pen.lr_decay, "penalty.lr_decay", 0.0, 1.0, open_lo=True)
    _check_int(pen.patience, "penalty.patience", 0)

    _check_int(config.checkpoint.every_epochs, "checkpoint.every_epochs", 1)
    _check_int(config.checkpoint.max_to_keep, "checkpoint.max_to_keep", 1)
    _check_int(config.log_every_steps, "log_every_steps", 1)
    _check_int(config.eval_every_epochs, "eval_every_epochs", 1)
    if not isinstance(config.progress_bar, bool):
        raise ValueError(f"progress_bar={config.progress_bar!r}; allowed: True, False")
    for key in OPEN_KEYS:
        if not isinstance(config[key], Mapping | ml_collections.ConfigDict):
            raise ValueError(f"{key}={config[key]!r} is not allowed; allowed: a dict")
