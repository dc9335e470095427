"""Every experiment config loads, validates, documents its command and result, has a smoke
variant, and takes the common overrides."""

import importlib
import pathlib

import pytest

from qflax import runs
from qflax.train import validate_config

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = sorted(
    p
    for p in (REPO / "experiments").rglob("*.py")
    # configs live in one folder per dataset; sweeps and shared row tables are not configs
    if p.name != "__init__.py" and not p.name.startswith("sweep") and p.parent.name != "experiments"
)


def test_there_are_configs():
    names = {p.relative_to(REPO).as_posix() for p in CONFIGS}
    assert {"experiments/mnist5k/fp.py", "experiments/mnist5k/w4a4.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_config_is_valid_documented_and_has_a_smoke_variant(path):
    config = validate_config(runs.load_config_file(str(path)))
    smoke = validate_config(runs.load_config_file(f"{path}:smoke"))
    # small bundled data: the 8x8 digits, or short windows of the text corpus
    assert smoke.epochs <= 2 and smoke.dataset in ("digits", "pydoc_text")
    if smoke.dataset == "pydoc_text":
        assert smoke.dataset_kwargs.seq_len <= 32
    module_doc = importlib.import_module(
        ".".join(path.relative_to(REPO).with_suffix("").parts)
    ).__doc__
    assert f"qflax train --config {path.relative_to(REPO).as_posix()}" in module_doc
    assert "Expected" in module_doc
    runs.apply_overrides(config, [("dataset", smoke.dataset), ("epochs", "2"), ("seed", "3")])
    validate_config(config)
    with pytest.raises(ValueError, match="variant='nope' is not known"):
        runs.load_config_file(f"{path}:nope")


def test_configs_import_as_a_package():
    from experiments.mnist5k import fp, w4a4

    assert fp.get_config().quant.recipe == "none"
    w4a4_config = w4a4.get_config()
    assert (w4a4_config.quant.weight_bits, w4a4_config.quant.act_bits) == (4, 4)
    assert w4a4_config.quant.first_last_float
