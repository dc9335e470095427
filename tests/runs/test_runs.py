"""qflax.runs: the home of a run on disk. Its dependency direction (export reads runs without
qflax.train), no private imports across packages, validating a config once per command, the
old names kept in qflax.train, and build_trainer (the one way steps are built)."""

import ast
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import qflax.train
from qflax import cli, runs
from qflax.train import build_trainer, train_and_evaluate
from tests.train.test_loop import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = REPO / "qflax"
FP = str(REPO / "experiments" / "mnist5k" / "fp.py")


def _imported_after(statement: str) -> list[str]:
    listing = "sorted(m for m in sys.modules if m.startswith('qflax'))"
    code = f"import sys; {statement}; print({listing})"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    return ast.literal_eval(out.stdout.strip())


def test_export_reads_runs_without_importing_train():
    modules = _imported_after("import qflax.export")
    assert "qflax.runs" in modules or "qflax.export" in modules
    assert not [m for m in modules if m == "qflax.train" or m.startswith("qflax.train.")], modules


def test_runs_imports_neither_train_nor_export():
    modules = _imported_after("import qflax.runs")
    bad = [m for m in modules if m.split(".")[1:2] in (["train"], ["export"], ["cli"])]
    assert not bad, bad


# Private modules another package may import (none: shared helpers are public names).
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str]] = set()


def _private_imports(path: pathlib.Path):
    """``(module, imported name)`` for every import of an underscore module or name of qflax."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qflax"):
            parts = node.module.split(".")
            if any(p.startswith("_") for p in parts[1:]):
                yield node.module, None
            for alias in node.names:
                if alias.name.startswith("_") and len(parts) <= 2:
                    yield f"{node.module}.{alias.name}", alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "qflax" and any(p.startswith("_") for p in parts[1:]):
                    yield alias.name, None


def test_no_package_imports_another_packages_private_modules():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).parts
        own = rel[0] if len(rel) > 1 else path.stem  # "train", or "cli" for qflax/cli.py
        for module, _ in _private_imports(path):
            target = module.split(".")[1]
            if target == own or (own, module) in KNOWN_PRIVATE_IMPORTS:
                continue
            found.append(f"{path.relative_to(REPO)}: {module}")
    assert not found, "private imports across packages:\n" + "\n".join(found)


def test_the_check_sees_a_private_import(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from qflax.train._loop import x\nfrom qflax.train import _config\n")
    assert [m for m, _ in _private_imports(path)] == ["qflax.train._loop", "qflax.train._config"]


def test_train_keeps_the_old_names():
    for name in (
        "default_config",
        "validate_config",
        "load_config",
        "load_model",
        "build_model",
        "config_diff",
        "RESUMABLE_KEYS",
        "OPTIMIZERS",
        "SCHEDULES",
        "TEACHER_MODES",
        "DIVERGENCES",
        "CheckpointError",
    ):
        assert getattr(qflax.train, name) is getattr(runs, name), name


def test_ensure_valid_checks_a_config_once_until_it_changes(monkeypatch):
    calls = []
    check = runs._validate._check_config
    monkeypatch.setattr(runs._validate, "_check_config", lambda c: calls.append(1) or check(c))
    config = tiny_config()
    assert not runs.is_validated(config)
    runs.ensure_valid(config)
    runs.ensure_valid(config)
    assert len(calls) == 1 and runs.is_validated(config)
    config.model_kwargs.width = 7  # a nested change: checked again
    assert not runs.is_validated(config)
    runs.ensure_valid(config)
    assert len(calls) == 2
    config.epochs = 0
    with pytest.raises(ValueError, match="epochs=0 is not allowed"):
        runs.ensure_valid(config)
    assert runs.validate_config(tiny_config()) is not None and len(calls) == 4
    with pytest.raises(ValueError, match="epochs=0 is not allowed"):
        train_and_evaluate(config, "never-written")


def test_qflax_train_validates_its_config_once(tmp_path, monkeypatch, capsys):
    calls = []
    check = runs._validate._check_config
    monkeypatch.setattr(runs._validate, "_check_config", lambda c: calls.append(1) or check(c))
    argv = ["train", "--config", f"{FP}:smoke", "--config.progress_bar=false"]
    assert cli.main([*argv, "--workdir", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    assert len(calls) == 1
    assert (tmp_path / "run" / "summary.json").is_file()


def test_build_trainer_builds_the_steps_of_a_config():
    config = tiny_config()
    dataset = runs.load_dataset(config)
    trainer = build_trainer(config, dataset=dataset)
    assert trainer.steps_per_epoch == len(dataset.train_x) // config.batch_size
    assert trainer.penalty is None and trainer.latent_clip_mask is None
    assert int(trainer.state.step) == 0
    x, y = dataset.train_x[: config.batch_size], dataset.train_y[: config.batch_size]
    state, metrics = trainer.train_step(trainer.state, (x, y))
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
    sums = trainer.eval_step(state.params, state.rest, (x, y), np.ones(len(x), np.float32))
    assert float(jax.device_get(sums["count"])) == len(x)


def test_build_trainer_of_learned_bits_and_binary_layers():
    config = tiny_config(quant__recipe="gdnsq")
    trainer = build_trainer(config, steps_per_epoch=10)
    assert trainer.penalty is not None and trainer.steps_per_epoch == 10
    config = tiny_config(quant__recipe="binary", quant__latent_clip=1.0)
    mask = build_trainer(config).latent_clip_mask
    assert any(jax.tree.leaves(mask)) and not all(jax.tree.leaves(mask))
