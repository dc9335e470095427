"""The training config's schema: its keys and defaults (``default_config``), locking, and
comparing two configs (``config_diff``, ``near_matches`` for misspelt keys).

A training config is an ``ml_collections.ConfigDict`` holding every key of
:func:`default_config`, locked so that a misspelt key is an error. ``config_diff`` says which keys
two configs disagree on (a workdir holding a checkpoint of a different config is refused with it).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

__all__ = [
    "DIVERGENCES",
    "FLOAT_RECIPE",
    "OPEN_KEYS",
    "OPTIMIZERS",
    "RESUMABLE_KEYS",
    "SCHEDULES",
    "SHORTHAND_KEYS",
    "TEACHER_MODES",
    "all_keys",
    "config_diff",
    "config_to_dict",
    "default_config",
    "flatten_config",
    "lock_config",
    "near_matches",
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
# (``--config.target_bits=2``; an integer 1..32).
SHORTHAND_KEYS = ("target_bits",)

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
    "tensorboard",
    "profile.start_step",
    "profile.num_steps",
    # The device mesh: a run resumes on another device count (the checkpoint is restored onto
    # the new mesh); results agree within float summation order.
    "mesh.data",
    "mesh.fsdp",
    "mesh.model",
    # Several processes: the same run may resume with another process count.
    "distributed.enabled",
    "distributed.coordinator_address",
    "distributed.num_processes",
    "distributed.process_id",
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
    - ``quant.relative_steps``: learned step sizes (params their family tags ``"step"``:
      ``learned_step``'s scale, LSQ's step) move by ``lr·|s|`` times Adam's direction instead of
      ``lr`` (as on ``log s``; never through zero while ``lr·max_update < 1``; default False).
    - ``quant.{deadzone_decay, bits_decay, latent_clip}``: decoupled decay of CoDeQ's
      dead-zone and bit-width parameters (larger: sparser, fewer bits); ``latent_clip > 0``
      keeps the latent weights of 1-bit layers in ``[−latent_clip, latent_clip]``
      (BinaryConnect: 1).
    - ``mesh.{data, fsdp, model}``: the device mesh (:mod:`qflax.parallel`; ``-1``: the devices
      left): batches split over ``data × fsdp``, the train state sharded on its last axis over
      ``fsdp``; ``model`` must be 1. All 1 (the default): one device, unsharded.
    - ``compute_dtype``: "float32" (default), or "bfloat16" / "float16" for mixed precision:
      every weight layer's product takes its operands in that dtype and accumulates in float32;
      parameters, optimizer state, quantizers (scales, rounding, gradients) and the activations
      between the products stay float32 (:func:`qflax.layers.set_compute_dtype`).
    - ``tensorboard``: also write every logged metric (steps and epochs; per-layer bits) and
      histograms of the quantizer parameters as TensorBoard event files in
      ``workdir/tensorboard`` (without TensorFlow: :mod:`qflax.runs._events`); default True.
    - ``profile.{start_step, num_steps}``: with ``num_steps > 0``, a ``jax.profiler`` trace
      of the train steps ``start_step + 1 .. start_step + num_steps`` (after compilation when
      ``start_step`` > 0) in ``workdir/profile`` (TensorBoard's profile plugin or Perfetto read
      it: ``plugins/profile/<time>/<host>.xplane.pb`` and ``.trace.json.gz``).
    - ``distributed.{enabled, coordinator_address, num_processes, process_id}``: several
      processes (hosts) in one run (``jax.distributed``; CPU collectives over gloo): the mesh
      spans every process's devices, each process puts only its rows of a batch on its devices,
      and process 0 alone writes the workdir's files (checkpoints: every process its shards).
      ``""``, ``0``, ``-1``: from ``$JAX_COORDINATOR_ADDRESS``, ``$JAX_NUM_PROCESSES``,
      ``$JAX_PROCESS_ID`` or JAX's cluster detection (SLURM, Open MPI, Cloud TPU).
    - ``anneal.mu_end``: pairs with a ``μ`` (``pc``, ``proxquant``, ``bnn++``) go geometrically
      from the recipe's ``μ`` at the first epoch to ``mu_end`` at the last (0: no annealing).
      DBSSQ's ``ε`` always follows ``dbssq_epsilon_schedule`` over ``epochs`` and is 0 (the
      exact quantizer) for the final evaluation and checkpoint.
    - ``recipe_kwargs``: further arguments of the recipe factory (e.g. ``backward`` of
      ``gdnsq``, ``weight_granularity``); open.
    - ``pair.{name, forward, backward}``: the ProxConnect++ pair of every recipe that takes one
      (``binary``): ``name`` in ``qflax.quantizers.PAIRS`` (the catalogue or a registered pair;
      ``--config.pair=NAME`` sets it), or ``forward`` in ``FORWARDS`` and ``backward`` in
      ``BACKWARDS`` together (a composed pair, which replaces the name); "" = the recipe's
      default. Every run with a pair writes its criterion (``pair_criterion`` in
      ``summary.json``) and its plot (``pair_*.png``).
    - ``imports``: Python files or module names imported before anything is built (and when
      the run is evaluated or exported later), so a config can use the user's own quantizer
      families, pairs and recipes; a config file that registers any is added by itself.
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
            relative_steps=False,
            rules=(),
        )
    )
    config.penalty = ml_collections.ConfigDict(
        dict(warmup_epochs=1.0, power=1.0, lr_decay=0.9985, patience=0)
    )
    config.anneal = ml_collections.ConfigDict(dict(mu_end=0.0))
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, model=1))
    config.compute_dtype = "float32"
    config.tensorboard = True
    config.profile = ml_collections.ConfigDict(dict(start_step=10, num_steps=0))
    config.distributed = ml_collections.ConfigDict(
        dict(enabled=False, coordinator_address="", num_processes=0, process_id=-1)
    )
    config.pair = ml_collections.ConfigDict(dict(name="", forward="", backward=""))
    config.imports = ()
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


def all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted key of ``config``, nested ones included (``optimizer.name``, ...)."""
    keys = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, ml_collections.ConfigDict):
            keys += all_keys(value, prefix=path + ".")
    return keys
