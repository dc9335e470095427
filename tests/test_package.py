"""Package-level checks: every public name imports, `import qflax` stays cheap, the CLI parses."""

import importlib
import subprocess
import sys

import pytest

import qflax
from qflax import cli

PUBLIC_MODULES = [
    "qflax.numerics",
    "qflax.quantizers",
    "qflax.calibration",
    "qflax.data",
    "qflax.models",
    "qflax.studies",
    "qflax.ops",
    "qflax.layers",
    "qflax.export",
    "qflax.runs",
    "qflax.train",
]


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_imports(module_name):
    module = importlib.import_module(module_name)
    assert module.__all__, f"{module_name} exports nothing"
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{module_name}.{name}"
    # The curated list is complete: every public (non-underscore) attribute that is not a
    # submodule is listed.
    public = {
        n
        for n, v in vars(module).items()
        if not n.startswith("_") and type(v).__name__ != "module" and n != "annotations"
    }
    assert public <= set(module.__all__), public - set(module.__all__)


def test_lazy_submodules():
    assert qflax.numerics.__name__ == "qflax.numerics"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        qflax.nope  # noqa: B018


def test_import_qflax_does_no_heavy_work():
    """`import qflax` must not import jax, flax, tfds or sklearn (that is what keeps it cheap)."""
    code = (
        "import sys, qflax; heavy = [m for m in ('jax', 'flax', 'tensorflow_datasets', "
        "'sklearn', 'mlxtend', 'optax') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_cli_parser_knows_report():
    args = cli.build_parser().parse_args(["report", "--seed", "3"])
    assert args.command == "report" and args.seed == 3
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["nonsense"])
