"""The training config: its schema (``default_config``), its checks and its comparison.

A training config is an ``ml_collections.ConfigDict`` holding every key of
:func:`default_config`, locked so that a misspelt key is an error. ``validate_config`` checks the
values before any work starts; ``config_diff`` says which keys two configs disagree on (a workdir
holding a checkpoint of a different config is refused with it).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

__all__ = [
    "all_keys",
    "apply_overrides",
    "build_recipe",
    "load_config_file",
    "lock_config",
    "parse_value",
    "DIVERGENCES",
    "OPEN_KEYS",
    "SHORTHAND_KEYS",
    "OPTIMIZERS",
    "RESUMABLE_KEYS",
    "SCHEDULES",
    "TEACHER_MODES",
    "config_diff",
    "config_to_dict",
    "default_config",
    "flatten_config",
    "near_matches",
    "validate_config",
]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")
TEACHER_MODES = ("none", "train", "checkpoint")
DIVERGENCES = ("kl", "jeffreys")
FLOAT_RECIPE = "none"

# Keyword-argument dicts whose keys are free (passed on to the loader, the model, the recipe).
OPEN_KEYS = ("dataset_kwargs", "model_kwargs", "recipe_kwargs")

# Optional top-level keys a config file may add as ``ml_collections.FieldReference`` s that
# other keys point to: ``target_bits`` sets ``quant.weight_bits`` and ``quant.act_bits`` at once
# (``--config.target_bits=2``; an integer 1..32); ``pair`` names the ProxConnect++ pair of a
# binary recipe (``--config.pair=bnn++``; a name in ``qflax.quantizers.PAIRS``).
SHORTHAND_KEYS = ("target_bits", "pair")

# Keys that may differ when a run is resumed in the same workdir: they change how long it runs
# and how often it logs or saves, never what one step computes. (With a cosine schedule a new
# `epochs` also stretches the rest of the schedule.)
RESUMABLE_KEYS = (
    "epochs",
    "log_every_steps",
    "eval_every_epochs",
    "progress_bar",
    "checkpoint.every_epochs",
    "checkpoint.max_to_keep",
    "penalty.patience",
)


def default_config() -> ml_collections.ConfigDict:
    """Returns the training config with every key at its default, locked against new keys.

    Keys (dotted paths, as the command line spells them):

    - ``dataset``: dataset name, see :func:`qflax.data.load` ("digits", "mnist5k",
      "pydoc_text", "tfds:<name>").
    - ``dataset_kwargs``: options passed to :func:`qflax.data.load` (e.g. ``seq_len``); open.
    - ``model``: a name of :data:`qflax.models.MODELS`; the input shape and the number of
      classes (text: the vocabulary size) come from the dataset.
    - ``model_kwargs``: model knobs (``width``, ``channels``, ``dim``, ...); open.
    - ``epochs``, ``batch_size``, ``eval_batch_size``, ``seed``: the run's length, batch sizes
      and the seed of the data split, the initialisation and the shuffling.
    - ``augment_shift``: image datasets: translate each training image by a random whole
      number of pixels in ``[-augment_shift, augment_shift]`` along each axis (zero fill), drawn
      from ``(seed, epoch)``; 0 = no augmentation.
    - ``optimizer.{name, learning_rate, momentum, weight_decay, schedule, warmup_epochs}``:
      ``name`` in adam, adamw, sgd; ``momentum`` is SGD's (0 = none); ``weight_decay`` is L2
      for adam/sgd and decoupled for adamw; ``schedule`` constant or cosine (to 0 at the end),
      both after ``warmup_epochs`` of linear warm-up.
    - ``quant.{recipe, weight_bits, act_bits, first_last_float, learning_rate, clip_decay,
      max_update, rules}``: ``recipe`` "none" trains in float, else a name of
      ``qflax.layers.RECIPES`` built with ``weight_bits``/``act_bits`` (the targets for
      ``gdnsq``) and ``recipe_kwargs``; ``first_last_float`` keeps ``stem`` and ``head`` in
      float; ``learning_rate`` is the peak rate of quantizer parameters (``QuantParam``: no
      weight decay); ``clip_decay`` is the L2 coefficient on learned clipping levels (PACT's
      ``α``: ``λ·α`` added to its gradient); ``max_update`` bounds every quantizer parameter's
      step to ``max_update·lr`` (0: no bound; Adam's steps after a sudden large gradient reach
      ~31·lr); ``rules`` are ``(pattern, recipe_name)`` pairs tried before the default ones
      (recipe "none" keeps matching layers float).
    - ``quant.{deadzone_decay, bits_decay, latent_clip}``: decoupled decay of CoDeQ's
      dead-zone and bit-width parameters (larger: sparser, fewer bits); ``latent_clip > 0``
      keeps the latent weights of 1-bit layers in ``[−latent_clip, latent_clip]``
      (BinaryConnect: 1).
    - ``anneal.mu_end``: pairs with a ``μ`` (``pc``, ``proxquant``, ``bnn++``) go geometrically
      from the recipe's ``μ`` at the first epoch to ``mu_end`` at the last (0: no annealing).
      DBSSQ's ``ε`` always follows ``dbssq_epsilon_schedule`` over ``epochs`` and is 0 (the
      exact quantizer) for the final evaluation and checkpoint.
    - ``recipe_kwargs``: further arguments of the recipe factory (e.g. ``backward`` of
      ``gdnsq``, ``weight_granularity``); open.
    - ``penalty.{warmup_epochs, power, lr_decay, patience}``: the exterior-point bit-width
      penalty, added to the loss whenever the model has learned bit-widths (GDNSQ): weight 0
      for ``warmup_epochs``, then growing by ``2·lr`` per step (``lr`` the quantizer
      parameters' rate), exponent ``power``. Once every layer's integer bit-width is within its
      target at an evaluation, both learning rates are multiplied by ``lr_decay`` every step,
      and with ``patience > 0`` training stops after that many epochs without a lower
      training loss.
    - ``teacher.{mode, path, divergence, weight, temperature}``: ``mode`` none, train (train the
      float model first in ``workdir/teacher``) or checkpoint (the workdir ``path`` of a finished
      float run); the loss is ``(1 - weight) * CE + weight * T^2 * D(student/T, teacher/T)`` with
      ``divergence`` kl (``KL(p_t || p_s)``) or jeffreys (``KL(p_s || p_t) + KL(p_t || p_s)``);
      ``init_student`` starts the student from the teacher's weights (fine-tuning, as GDNSQ
      and PTQ-then-QAT do) instead of a fresh initialisation.
    - ``checkpoint.{every_epochs, max_to_keep}``: save every so many epochs (and at the end),
      keep the newest so many.
    - ``log_every_steps``, ``eval_every_epochs``, ``progress_bar``: logging.

    Returns:
      A locked ``ConfigDict``; ``dataset_kwargs`` and ``model_kwargs`` stay open.
    """
    config = ml_collections.ConfigDict()
    config.dataset = "mnist5k"
    config.dataset_kwargs = ml_collections.ConfigDict()
    config.model = "cnn"
    config.model_kwargs = ml_collections.ConfigDict()
    config.recipe_kwargs = ml_collections.ConfigDict()
    config.epochs = 10
    config.batch_size = 128
    config.eval_batch_size = 500
    config.seed = 0
    config.augment_shift = 0
    config.optimizer = ml_collections.ConfigDict(
        dict(
            name="adam",
            learning_rate=1e-3,
            momentum=0.9,
            weight_decay=0.0,
            schedule="cosine",
            warmup_epochs=0.0,
        )
    )
    config.quant = ml_collections.ConfigDict(
        dict(
            recipe=FLOAT_RECIPE,
            weight_bits=4,
            act_bits=4,
            first_last_float=True,
            learning_rate=1e-3,
            clip_decay=0.0,
            deadzone_decay=0.0,
            bits_decay=0.0,
            latent_clip=0.0,
            max_update=1.0,
            rules=(),
        )
    )
    config.penalty = ml_collections.ConfigDict(
        dict(warmup_epochs=1.0, power=1.0, lr_decay=0.9985, patience=0)
    )
    config.anneal = ml_collections.ConfigDict(dict(mu_end=0.0))
    config.teacher = ml_collections.ConfigDict(
        dict(
            mode="none",
            path="",
            divergence="kl",
            weight=1.0,
            temperature=1.0,
            init_student=False,
        )
    )
    config.checkpoint = ml_collections.ConfigDict(dict(every_epochs=1, max_to_keep=3))
    config.log_every_steps = 50
    config.eval_every_epochs = 1
    config.progress_bar = True
    return lock_config(config)


def lock_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Locks ``config`` against new keys, except inside the open kwargs dicts."""
    config.lock()
    for key in OPEN_KEYS:
        if key in config and isinstance(config[key], ml_collections.ConfigDict):
            config[key].unlock()
    return config


def config_to_dict(config: Mapping[str, Any] | ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-ready plain dict of ``config`` (tuples become lists), as ``config.json`` holds it."""
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    return json.loads(json.dumps(config))


def flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"name": "adam"}}`` -> ``{"optimizer.name": "adam"}``; the open kwargs
    dicts stay whole (``{"model_kwargs": {...}}``)."""
    if isinstance(tree, ml_collections.ConfigDict):
        tree = tree.to_dict()
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and path not in OPEN_KEYS:
            flat.update(flatten_config(value, prefix=path + "."))
        else:
            flat[path] = value
    return flat


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ between two configs: ``{dotted key: (old, new)}``.

    A key missing on one side shows ``"<missing>"`` there.
    """
    flat_old = flatten_config(config_to_dict(old))
    flat_new = flatten_config(config_to_dict(new))
    missing = "<missing>"
    diff = {}
    for key in sorted(set(flat_old) | set(flat_new)):
        a, b = flat_old.get(key, missing), flat_new.get(key, missing)
        if a != b:
            diff[key] = (a, b)
    return diff


def near_matches(key: str, candidates: Sequence[str]) -> list[str]:
    """The candidates closest to a misspelt ``key`` (best first), for error messages.

    Abbreviations and prefixes of a leaf count first (``optimizer.lr`` ->
    ``optimizer.learning_rate``), then leaves spelt alike (difflib), then whole keys spelt
    alike; keys of the same group come first.

    >>> near_matches("optimizer.lr", ["optimizer.learning_rate", "optimizer.momentum", "seed"])
    ['optimizer.learning_rate']
    """
    group, _, leaf = key.rpartition(".")
    found = []
    for candidate in candidates:
        c_leaf = candidate.rpartition(".")[2]
        initials = "".join(word[:1] for word in c_leaf.split("_"))
        if leaf and (leaf == initials or c_leaf.startswith(leaf)):
            found.append(candidate)
    found.sort(key=lambda c: c.rpartition(".")[0] != group)  # same group first
    leaves: dict[str, list[str]] = {}
    for candidate in candidates:
        leaves.setdefault(candidate.rpartition(".")[2], []).append(candidate)
    for close in difflib.get_close_matches(leaf, list(leaves), n=3, cutoff=0.6):
        found += sorted(leaves[close], key=lambda c: c.rpartition(".")[0] != group)
    found += difflib.get_close_matches(key, candidates, n=3, cutoff=0.8)
    return list(dict.fromkeys(found))[:5]


def _schema_keys() -> list[str]:
    """Dotted keys of the default config (open dicts count as one key)."""
    keys = []
    for key, value in default_config().items():
        if isinstance(value, ml_collections.ConfigDict) and key not in OPEN_KEYS:
            keys += [f"{key}.{sub}" for sub in value]
        else:
            keys.append(key)
    return keys


def _config_keys(config: ml_collections.ConfigDict) -> list[str]:
    keys = []
    for key, value in config.items():
        if isinstance(value, Mapping | ml_collections.ConfigDict) and key not in OPEN_KEYS:
            keys += [f"{key}.{sub}" for sub in value]
        else:
            keys.append(key)
    return keys


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
        kwargs = dict(config.recipe_kwargs) if name == config.quant.recipe else {}
        build_recipe(name, config.quant.weight_bits, config.quant.act_bits, kwargs)
    except ValueError as error:
        raise ValueError(f"{field}={name!r}: {error}") from error


def build_recipe(
    name: str, weight_bits: int, act_bits: int, recipe_kwargs: Mapping[str, Any] | None = None
):
    """``qflax.layers.recipes.build(name, ...)`` with the bit-widths the recipe takes.

    Recipes with fixed levels ignore what they do not take (``binary`` both bit-widths,
    ``ternary`` the weight bits). ``recipe_kwargs`` go to the factory; a keyword it does not
    take is a ValueError naming the ones it does. ``recipe_kwargs.weight_bits``/``act_bits``
    replace the ``quant`` ones (CoDeQ: ``weight_bits=None`` learns the bit-width).
    """
    import inspect

    from qflax import layers as ql

    accepted = inspect.signature(ql.RECIPES[name]).parameters
    extra = dict(recipe_kwargs or {})
    bits = {"weight_bits": weight_bits, "act_bits": act_bits}
    bits.update({k: extra.pop(k) for k in list(extra) if k in bits and k in accepted})
    kwargs = {k: v for k, v in bits.items() if k in accepted}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    # (`binary` passes its extra keywords to the pair's factory, which checks them.)
    unknown = [] if takes_any else sorted(set(extra) - set(accepted) - set(bits))
    if unknown:
        allowed = ", ".join(k for k in accepted if k not in bits) or "none"
        raise ValueError(
            f"recipe_kwargs {unknown} are not arguments of recipe {name!r}; allowed: {allowed}"
        )
    return ql.recipes.build(name, **kwargs, **{k: v for k, v in extra.items() if k not in bits})


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every value of a training config; raises before any training work starts.

    Args:
      config: a config with the keys of :func:`default_config`.

    Returns:
      ``config`` itself (unchanged), for chaining.

    Raises:
      ValueError: a key that is not in the schema (with the nearest known keys), a missing key,
        or a bad value; the message names the key, the value and what is allowed.
    """
    from qflax.data import DATASETS, TFDS_PREFIX
    from qflax.models import MODELS
    from qflax.numerics import MAX_BITS, MIN_BITS

    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(
            f"config of type {type(config).__name__} is not allowed; allowed: "
            "an ml_collections.ConfigDict (see qflax.train.default_config)"
        )
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
    _check_recipe(quant.recipe, "quant.recipe", config)
    rules = quant.rules
    if not isinstance(rules, (list, tuple)):
        raise ValueError(f"quant.rules={rules!r} is not allowed; allowed: (pattern, recipe) pairs")
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(
                f"quant.rules[{i}]={rule!r} is not allowed; allowed: a (pattern, recipe) pair"
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
    if "pair" in config:
        from qflax.quantizers import PAIRS

        _check_choice(config.pair, "pair", tuple(PAIRS))
    for key in ("clip_decay", "deadzone_decay", "bits_decay", "latent_clip", "max_update"):
        _check_number(quant[key], f"quant.{key}", 0.0)
    _check_number(config.anneal.mu_end, "anneal.mu_end", 0.0)
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
    return config


# --------------------------------------------------------------------------- config files


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads ``get_config()`` from a config file; ``"path.py:arg"`` calls ``get_config(arg)``.

    Args:
      spec: path of a ``.py`` file defining ``get_config()``, optionally followed by ``:arg``.

    Returns:
      The config, locked against new keys (see :func:`lock_config`).

    Raises:
      ValueError: the file does not exist or defines no ``get_config``, or it returns no
        ``ConfigDict``.
    """
    import pathlib

    path, arg = spec, None
    if ":" in spec and not pathlib.Path(spec).is_file():
        path, arg = spec.rsplit(":", 1)
    file = pathlib.Path(path)
    if not file.is_file():
        raise ValueError(
            f"config file {path!r} does not exist; allowed: a .py file with get_config()"
        )
    module = _import_config_module(file)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ValueError(f"config file {path!r} defines no get_config(); allowed: one that does")
    config = get_config() if arg is None else get_config(arg)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(
            f"get_config() of {path!r} returned {type(config).__name__}; allowed: a ConfigDict"
        )
    return lock_config(config)


def _import_config_module(file: Any):
    """Imports a config file; inside a package (``experiments/mnist5k/w4a4.py``) under its
    dotted name with the package's root on ``sys.path``, so configs can import each other."""
    import importlib
    import importlib.util
    import sys

    file = file.resolve()
    parts = [file.stem]
    root = file.parent
    while (root / "__init__.py").is_file():
        parts.insert(0, root.name)
        root = root.parent
    if len(parts) > 1 and all(p.isidentifier() for p in parts):
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        return importlib.import_module(".".join(parts))
    module_name = "_qflax_config_" + re.sub(r"\W", "_", str(file))
    module_spec = importlib.util.spec_from_file_location(module_name, file)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"config file {str(file)!r} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted key of ``config``, nested ones included (``optimizer.name``, ...)."""
    keys = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, ml_collections.ConfigDict):
            keys += all_keys(value, prefix=path + ".")
    return keys


def _lookup(config: ml_collections.ConfigDict, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def parse_value(text: str, default: Any, key: str) -> Any:
    """Parses a command-line value with the type of the key's current value ``default``."""
    import ast

    def literal() -> Any:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text

    try:
        if isinstance(default, bool):
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, str):
            return text
        if isinstance(default, (tuple, list)):
            value = ast.literal_eval(text)
            if not isinstance(value, (tuple, list)):
                raise ValueError
            return tuple(value)
    except (ValueError, SyntaxError):
        kind = type(default).__name__
        raise ValueError(
            f"--config.{key}={text!r} cannot be read as {kind} (the type of its default "
            f"{default!r}); allowed: a {kind} literal"
        ) from None
    return literal()


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]
) -> ml_collections.ConfigDict:
    """Sets dotted ``(key, text)`` overrides on ``config``, each parsed with its default's type.

    Keys inside ``dataset_kwargs``/``model_kwargs`` may be new (their values are read as Python
    literals, else as strings); any other unknown key is an error listing the nearest keys.

    Raises:
      ValueError: an unknown key, a key naming a whole group, or a value of the wrong type.
    """
    known = [
        k
        for k in all_keys(config)
        if k in OPEN_KEYS or not isinstance(_lookup(config, k), ml_collections.ConfigDict)
    ]
    for key, text in overrides:
        parts = key.split(".")
        node = config
        for part in parts[:-1]:
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                node = None
                break
            node = node[part]
        leaf = parts[-1]
        is_open = len(parts) == 2 and parts[0] in OPEN_KEYS
        if not isinstance(node, ml_collections.ConfigDict) or (leaf not in node and not is_open):
            near = near_matches(key, known)
            hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
            raise ValueError(f"unknown config key {key!r}{hint} (known keys: {', '.join(known)})")
        current = node[leaf] if leaf in node else None
        if isinstance(current, ml_collections.ConfigDict) and leaf not in OPEN_KEYS:
            raise ValueError(
                f"--config.{key} names a group; set its keys instead: "
                + ", ".join(f"{key}.{k}" for k in current)
            )
        if leaf in OPEN_KEYS and len(parts) == 1:
            import ast

            value = ast.literal_eval(text)
            if not isinstance(value, dict):
                raise ValueError(f"--config.{key}={text!r}; allowed: a dict literal")
            node[leaf] = ml_collections.ConfigDict(value)
            continue
        value = parse_value(text, current, key)
        try:
            node[leaf] = value
        except TypeError as error:
            raise ValueError(f"--config.{key}={text!r}: {error}") from error
    return config
