"""The training config: schema, validation (clear errors before work), overrides, diffs."""

import pathlib

import pytest

from qflax import runs
from qflax.train import config_diff, default_config, validate_config

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_default_config_has_every_key_and_is_valid():
    config = default_config()
    keys = set(runs.all_keys(config))
    for key in (
        "dataset",
        "model",
        "model_kwargs",
        "epochs",
        "batch_size",
        "seed",
        "optimizer.name",
        "optimizer.learning_rate",
        "optimizer.momentum",
        "optimizer.weight_decay",
        "optimizer.schedule",
        "optimizer.warmup_epochs",
        "quant.recipe",
        "quant.weight_bits",
        "quant.act_bits",
        "quant.first_last_float",
        "quant.learning_rate",
        "quant.rules",
        "teacher.mode",
        "teacher.path",
        "teacher.divergence",
        "teacher.weight",
        "teacher.temperature",
        "checkpoint.every_epochs",
        "checkpoint.max_to_keep",
        "log_every_steps",
        "eval_every_epochs",
    ):
        assert key in keys, key
    assert validate_config(config) is config


def test_config_is_locked_but_kwargs_are_open():
    config = default_config()
    with pytest.raises(AttributeError, match="learning_rat"):
        config.optimizer.learning_rat = 0.1
    with pytest.raises(AttributeError):
        config.epoch = 3
    config.model_kwargs.width = 0.5  # open: passed on to the model
    assert config.model_kwargs.width == 0.5


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("dataset", "mnist6k", r"dataset='mnist6k' is not known; allowed: 'digits'"),
        ("dataset", "tfds:", r"dataset='tfds:'"),
        ("model", "resnet21", r"model='resnet21' is not allowed; allowed: 'mlp'"),
        ("quant.weight_bits", 0, r"quant.weight_bits=0 is out of range; allowed: integers 1..32"),
        ("quant.act_bits", 33, r"quant.act_bits=33 is out of range"),
        ("quant.recipe", "hadamard", r"quant.recipe='hadamard' is not allowed; allowed: 'none'"),
        ("optimizer.name", "lamb", r"optimizer.name='lamb' is not allowed; allowed: 'adam'"),
        ("optimizer.schedule", "step", r"optimizer.schedule='step'"),
        ("optimizer.learning_rate", 0.0, r"optimizer.learning_rate=0.0"),
        ("optimizer.learning_rate", float("nan"), r"optimizer.learning_rate=nan"),
        ("optimizer.warmup_epochs", 20.0, r"warmup_epochs=20.0 is longer than epochs"),
        ("epochs", 0, r"epochs=0 is not allowed; allowed: integers >= 1"),
        ("teacher.mode", "self", r"teacher.mode='self'"),
        ("teacher.divergence", "js", r"teacher.divergence='js'"),
        ("teacher.weight", 1.5, r"teacher.weight=1.5"),
        ("teacher.mode", "checkpoint", r"teacher.path='' is not a workdir"),
        ("quant.rules", (("[", "absmax"),), r"pattern '\[' is not a regular expression"),
        ("quant.rules", (("^conv2", "hadamard"),), r"quant.rules\[0\] recipe='hadamard'"),
    ],
)
def test_bad_values_raise_naming_key_value_and_allowed(key, value, message):
    config = default_config()
    group, _, leaf = key.rpartition(".")
    (config[group] if group else config)[leaf] = value
    with pytest.raises(ValueError, match=message):
        validate_config(config)


def test_unknown_key_in_a_handmade_config_lists_near_matches():
    config = default_config()
    with config.unlocked():
        config.optimizer.learning_rat = 0.1
    with pytest.raises(
        ValueError,
        match=r"'optimizer.learning_rat' \(did you mean "
        r"'optimizer.learning_rate'",
    ):
        validate_config(config)


def test_overrides_are_parsed_with_the_type_of_the_default():
    config = default_config()
    runs.apply_overrides(
        config,
        [
            ("epochs", "3"),
            ("optimizer.learning_rate", "3e-4"),
            ("quant.first_last_float", "false"),
            ("dataset", "digits"),
            ("quant.rules", "[('^conv2', 'none')]"),
            ("model_kwargs.channels", "(8, 16)"),
            ("model_kwargs.name", "plain"),
        ],
    )
    assert config.epochs == 3 and isinstance(config.epochs, int)
    assert config.optimizer.learning_rate == 3e-4
    assert config.quant.first_last_float is False
    assert config.dataset == "digits"
    assert config.quant.rules == (("^conv2", "none"),)
    assert config.model_kwargs.channels == (8, 16)
    assert config.model_kwargs.name == "plain"


@pytest.mark.parametrize(
    "key, text, message",
    [
        ("optimizer.learning_rat", "0.1", r"did you mean 'optimizer.learning_rate'"),
        ("epoch", "2", r"unknown config key 'epoch'; did you mean 'epochs'"),
        ("epochs", "2.5", r"--config.epochs='2.5' cannot be read as int"),
        ("quant.first_last_float", "maybe", r"cannot be read as bool"),
        ("optimizer", "adam", r"names a group; set its keys instead: optimizer.learning_rate"),
    ],
)
def test_bad_overrides_raise(key, text, message):
    with pytest.raises(ValueError, match=message):
        runs.apply_overrides(default_config(), [(key, text)])


def test_config_diff_names_differing_keys():
    a, b = default_config(), default_config()
    b.optimizer.learning_rate = 0.5
    b.model_kwargs.width = 2.0
    diff = config_diff(a, b)
    assert diff == {
        "optimizer.learning_rate": (1e-3, 0.5),
        "model_kwargs": ({}, {"width": 2.0}),
    }
    assert config_diff(a, runs.config_to_dict(a)) == {}


def test_load_config_file_with_variant_and_errors(tmp_path):
    fp = REPO / "experiments" / "mnist5k" / "fp.py"
    config = runs.load_config_file(str(fp))
    smoke = runs.load_config_file(f"{fp}:smoke")
    assert config.dataset == "mnist5k" and smoke.dataset == "digits"
    assert smoke.epochs < config.epochs
    with pytest.raises(ValueError, match="does not exist"):
        runs.load_config_file(str(tmp_path / "nope.py"))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no get_config"):
        runs.load_config_file(str(empty))
