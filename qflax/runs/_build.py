"""Building what a config describes: the recipes (``build_recipe``), the quantization rules
(``quantization_rules``), the dataset (``load_dataset``), the model, quantized and calibrated
(``build_model``, ``quantize_for_config``), and the float config of a distillation teacher
(``teacher_config``)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from qflax.runs._schema import FLOAT_RECIPE

__all__ = [
    "build_model",
    "build_recipe",
    "import_extension",
    "import_extensions",
    "pair_selection",
    "recipe_kwargs_for",
    "first_batch",
    "load_dataset",
    "quantization_rules",
    "quantize_for_config",
    "teacher_config",
]

logger = logging.getLogger("qflax.train")


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

    accepted = dict(inspect.signature(ql.RECIPES[name]).parameters)
    for key in ql.RECIPE_KEYWORDS:  # every recipe takes these (recipes.build)
        accepted.setdefault(key, None)
    extra = {k: _plain(v) for k, v in dict(recipe_kwargs or {}).items()}
    bits = {"weight_bits": weight_bits, "act_bits": act_bits}
    bits.update({k: extra.pop(k) for k in list(extra) if k in bits and k in accepted})
    kwargs = {k: v for k, v in bits.items() if k in accepted}
    takes_any = any(
        p is not None and p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()
    )
    # (`binary` passes its extra keywords to the pair's factory, which checks them.)
    unknown = [] if takes_any else sorted(set(extra) - set(accepted) - set(bits))
    if unknown:
        allowed = ", ".join(k for k in accepted if k not in bits) or "none"
        raise ValueError(
            f"recipe_kwargs {unknown} are not arguments of recipe {name!r}; allowed: {allowed}"
        )
    return ql.recipes.build(name, **kwargs, **{k: v for k, v in extra.items() if k not in bits})


def _plain(value: Any) -> Any:
    """A ConfigDict (e.g. ``recipe_kwargs.grad_config``) as a plain dict."""
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def pair_selection(pair: Mapping[str, Any] | None) -> dict[str, Any]:
    """The recipe keywords the config's ``pair`` group selects: ``{"pair": name}``, or
    ``{"pair": None, "forward": F, "backward": B}`` when both are given (they win over a
    name); ``{}`` when the group is empty."""
    pair = dict(pair or {})
    forward, backward = pair.get("forward") or "", pair.get("backward") or ""
    if forward and backward:
        return {"pair": None, "forward": forward, "backward": backward}
    return {"pair": pair["name"]} if pair.get("name") else {}


def recipe_kwargs_for(config: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
    """The keywords recipe ``name`` is built with: ``recipe_kwargs`` for the main recipe, and the
    ``pair`` group's selection for every recipe whose factory takes a pair (explicit
    ``recipe_kwargs`` keep precedence)."""
    import inspect

    from qflax import layers as ql

    kwargs = dict(config.recipe_kwargs) if name == config.quant.recipe else {}
    if name in ql.RECIPES and "pair" in config:
        accepted = inspect.signature(ql.RECIPES[name]).parameters
        for key, value in pair_selection(config.pair).items():
            if key in accepted and key not in kwargs:
                kwargs[key] = value
    return kwargs


def import_extension(entry: str) -> None:
    """Imports one extension: a ``.py`` file (by path; inside a package under its dotted name,
    so it is not run twice) or a module name. ValueError names an entry that fails."""
    import importlib
    import pathlib

    from qflax.runs._files import _import_config_module

    if not isinstance(entry, str) or not entry:
        raise ValueError(
            f"imports entry {entry!r} is not allowed; allowed: a .py path or a module name"
        )
    try:
        if entry.endswith(".py") or "/" in entry:
            file = pathlib.Path(entry)
            if not file.is_file():
                raise FileNotFoundError(f"{entry} does not exist")
            _import_config_module(file)
        else:
            importlib.import_module(entry)
    except Exception as error:  # the user's code: report any failure with its entry
        raise ValueError(
            f"imports entry {entry!r} failed to import ({type(error).__name__}: {error}); "
            "allowed: a .py file or module that imports cleanly"
        ) from error


def import_extensions(config: ml_collections.ConfigDict) -> list[str]:
    """Imports ``config.imports`` (Python files or module names that register the user's own
    quantizer families, pairs or recipes) so the config's names resolve. Returns them."""
    entries = list(tuple(config.get("imports", ()) or ()))
    for entry in entries:
        import_extension(entry)
    return entries


def load_dataset(config: ml_collections.ConfigDict):
    """The dataset of ``config`` (:func:`qflax.data.load` with its seed and ``dataset_kwargs``)."""
    from qflax import data

    return data.load(config.dataset, seed=config.seed, **dict(config.dataset_kwargs))


def first_batch(config: ml_collections.ConfigDict, dataset) -> np.ndarray:
    """The inputs of the first training batch (epoch 0), used to calibrate quantizers."""
    from qflax import data

    x, _ = next(
        data.batches(
            dataset.train_x,
            dataset.train_y,
            min(config.batch_size, len(dataset.train_x)),
            seed=config.seed,
            epoch=0,
        )
    )
    return x


def quantization_rules(config: ml_collections.ConfigDict) -> list:
    """The ``qflax.layers.Rule`` list of ``config.quant``: its ``rules`` first, then the default
    recipe (with ``stem``/``head`` kept float when ``first_last_float``). ``recipe_kwargs`` go
    to every recipe named ``quant.recipe``."""
    from qflax import layers as ql

    quant = config.quant

    def recipe(name: str):
        if name == FLOAT_RECIPE:
            return None
        return build_recipe(
            name, quant.weight_bits, quant.act_bits, recipe_kwargs_for(config, name)
        )

    def rule_recipe(rule):
        # (pattern, recipe) or (pattern, recipe, {keywords}): the keywords replace the
        # config's for this rule (e.g. a per-layer gradient quantizer).
        if len(rule) == 2 or rule[1] == FLOAT_RECIPE:
            return recipe(rule[1])
        kwargs = {**recipe_kwargs_for(config, rule[1]), **dict(rule[2])}
        return build_recipe(rule[1], quant.weight_bits, quant.act_bits, kwargs)

    rules = [ql.Rule(rule[0], rule_recipe(rule)) for rule in quant.rules]
    main = recipe(quant.recipe)
    if quant.first_last_float:
        rules += list(ql.first_last_float_rules(main))
    else:
        rules.append(ql.Rule(".*", main))
    return rules


def build_model(
    config: ml_collections.ConfigDict, dataset, *, calibrate: bool = True
) -> tuple[nnx.Module, str | None]:
    """Builds the model of ``config`` for ``dataset`` and applies its quantization rules.

    The input shape and the number of classes come from the dataset (text: the vocabulary).
    With ``quant.recipe != "none"`` the model goes through ``qflax.layers.quantize_model`` and
    ``qflax.layers.calibrate`` on the first training batch.

    Returns:
      ``(model, report)``: the report of ``quantize_model`` as text, None for float models.
    """
    from qflax import models

    kwargs = dict(config.model_kwargs)
    try:
        model = models.build_model(
            config.model,
            input_shape=dataset.input_shape,
            num_classes=dataset.num_classes,
            rngs=nnx.Rngs(config.seed),
            **kwargs,
        )
    except TypeError as error:
        raise ValueError(
            f"model_kwargs={kwargs!r} are not accepted by model {config.model!r}: {error}"
        ) from error
    return quantize_for_config(config, model, dataset, calibrate=calibrate)


def quantize_for_config(
    config: ml_collections.ConfigDict, model: nnx.Module, dataset, *, calibrate: bool = True
) -> tuple[nnx.Module, str | None]:
    """Applies the quantization rules of ``config`` to a float ``model`` (in place) and
    calibrates learned quantizer params on the first training batch; ``(model, None)`` for
    float configs. Then the products take ``config.compute_dtype`` (mixed precision:
    :func:`qflax.layers.set_compute_dtype`; calibration runs in float32)."""
    from qflax import layers as ql

    if config.quant.recipe == FLOAT_RECIPE and not config.quant.rules:
        ql.set_compute_dtype(model, config.compute_dtype)
        return model, None
    model, report = ql.quantize_model(model, quantization_rules(config), copy=False)
    if getattr(report, "unmatched_rules", None):
        logger.warning("quantization rules that matched no layer: %s", report.unmatched_rules)
    if calibrate:
        ql.calibrate(model, first_batch(config, dataset))
    ql.set_compute_dtype(model, config.compute_dtype)
    return model, str(report)


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The float model of ``config``: same data, model and optimizer, no quantization."""
    teacher = copy.deepcopy(config)
    teacher.quant.recipe = FLOAT_RECIPE
    teacher.quant.rules = ()
    teacher.recipe_kwargs = ml_collections.ConfigDict()  # the student's recipe's keywords
    teacher.teacher.mode = "none"
    teacher.teacher.path = ""
    teacher.teacher.init_student = False
    return teacher
