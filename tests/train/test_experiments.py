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
    # configs live in one folder per dataset; sweeps, shared row tables and private helpers
    # (`_base.py`) are not configs
    if not p.name.startswith(("sweep", "_")) and p.parent.name != "experiments"
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


def test_fashion_sweep_rows_load_and_compare_with_a_reference():
    from experiments.fashion_mnist import sweep

    root = pathlib.Path("runs/fashion_mnist")
    for name, row in sweep.ROWS.items():
        args = sweep.command(name, 1, root)
        spec = args[args.index("--config") + 1]
        overrides = [tuple(a[len("--config.") :].split("=", 1)) for a in args if "=" in a]
        overrides = [(k, v) for k, v in overrides if not k.startswith("teacher.")]
        config = validate_config(runs.apply_overrides(runs.load_config_file(spec), overrides))
        assert config.dataset == "fashion_mnist" and config.seed == 1
        if row.teacher is None:
            assert config.quant.recipe == "none" and config.epochs == 20
            continue
        assert row.teacher in sweep.ROWS and sweep.ROWS[row.teacher].teacher is None
        assert row.ref in sweep.ROWS and config.epochs == 10
        ref = runs.load_config_file(f"{sweep.CONFIGS}/{sweep.ROWS[row.ref].config}")
        if sweep.ROWS[row.ref].teacher is not None:  # a fine-tuned reference: the same budget
            assert (ref.batch_size, ref.optimizer.name, ref.teacher.weight) == (
                config.batch_size,
                config.optimizer.name,
                config.teacher.weight,
            ), name
            assert ref.quant.recipe == "none"


def test_fashion_sweep_table_says_when_a_difference_exceeds_two_standard_errors(tmp_path):
    import json

    from experiments.fashion_mnist import sweep

    def finish(name, accs):  # the records of finished runs
        for seed, acc in enumerate(accs):
            summary = dict(test_accuracy=acc, wall_seconds=1.0, avg_weight_bits=4, avg_act_bits=4)
            (tmp_path / f"{name}-s{seed}.json").write_text(json.dumps(summary))

    finish("fp", [0.90, 0.91, 0.92])
    finish("fp-ft-kd", [0.910, 0.912, 0.914])
    finish("lsq-w2a2", [0.900, 0.902, 0.904])  # 1 point below, SE 0.16: beyond 2 SE
    finish("gdnsq-w2a2", [0.900, 0.910, 0.920])  # +0.8 vs LSQ, SE 0.59: within 2 SE
    text = sweep.table(tmp_path, [0, 1, 2])
    lsq = next(line for line in text.splitlines() if line.startswith("| LSQ W2A2"))
    assert "| -1.00 ± 0.33 | yes | `fp-ft-kd` | -0.80 |" in lsq  # teacher: 91.0
    gdnsq = next(line for line in text.splitlines() if line.startswith("| GDNSQ target W2A2"))
    assert "| -0.20 ± 1.18 | no |" in gdnsq
    assert "GDNSQ − LSQ at W2A2: +0.80 points, within 2 SE (± 1.18)." in text
    finish("pact-w2a2", [0.88])  # one run: no standard error, the same columns
    header, _, *rows = text.splitlines()[: text.splitlines().index("")]
    pact = next(line for line in sweep.table(tmp_path, [0, 1, 2]).splitlines() if "PACT" in line)
    assert "| -3.20 (n < 2) | — |" in pact
    assert pact.count("|") == header.count("|")
    assert all(row.count("|") == header.count("|") for row in rows)
    delta, se = sweep.compare([1.0, 2.0], [1.0])
    assert delta == 0.5 and se != se  # one reference run: no standard error (NaN)


def test_fashion_sweep_resumes_from_records_and_keeps_teachers_consistent(tmp_path, monkeypatch):
    """A later session (empty runs/) skips the rows with records, reruns a teacher only for
    the rows that still need it, and stops a seed whose rerun teacher does not reproduce its
    record instead of mixing two teachers in one table."""
    import json

    from experiments import _sweeps
    from experiments.fashion_mnist import sweep

    accuracy = {"fp": 0.9, "fp-ft-kd": 0.91, "lsq-w2a2": 0.89, "lsq-w4a4": 0.905}
    trained = []

    def train(args, workdir):  # a fake qflax train: writes the summary a run would
        name = workdir.name.rsplit("-s", 1)[0]
        if name != "fp":
            assert args[args.index("--config.teacher.mode=checkpoint") + 1].endswith("/fp-s0")
            assert (workdir.parent / "fp-s0" / "summary.json").is_file()
        trained.append(name)
        workdir.mkdir(parents=True)
        (workdir / "summary.json").write_text(json.dumps({"test_accuracy": accuracy[name]}))

    monkeypatch.setattr(_sweeps, "train", train)
    results = tmp_path / "results"
    assert sweep.run_seed(["lsq-w2a2"], 0, tmp_path / "a", results, 2) == []
    assert trained[0] == "fp"  # the teacher first
    assert sorted(trained) == ["fp", "fp-ft-kd", "lsq-w2a2"]
    assert _sweeps.load_record(results, "lsq-w2a2", 0)["test_accuracy"] == 0.89
    trained.clear()  # a new session: runs/ is gone, the records are not
    assert sweep.run_seed(["lsq-w2a2"], 0, tmp_path / "b", results, 1) == []
    assert trained == []  # nothing to do: no teacher rerun either
    assert sweep.run_seed(["lsq-w2a2", "lsq-w4a4"], 0, tmp_path / "c", results, 1) == []
    assert trained == ["fp", "lsq-w4a4"]  # the teacher again, then the one missing row
    (results / "lsq-w4a4-s0.json").unlink()
    trained.clear()
    accuracy["fp"] = 0.8  # the rerun teacher differs from its record
    failures = sweep.run_seed(["lsq-w4a4"], 0, tmp_path / "d", results, 1)
    assert trained == ["fp"] and len(failures) == 1
    assert "remove that seed's records" in failures[0] and "0.8" in failures[0]
    assert _sweeps.load_record(results, "fp", 0)["test_accuracy"] == 0.9  # kept
    assert not (results / "lsq-w4a4-s0.json").exists()


def test_bnnpp_study_band_edge_is_where_signswish_saturates():
    import jax

    from experiments.fashion_mnist import sweep
    from qflax import quantizers as qz

    slope = jax.grad(lambda x: qz.sign_swish(x, 1.0))
    assert abs(float(slope(sweep.U))) < 1e-4  # SS′ = 0 at βx = U: the forward's maximum
    assert float(slope(sweep.U - 0.1)) > 0 > float(slope(sweep.U + 0.1))
    assert float(qz.sign_swish(sweep.U, 1.0)) > 1.0  # past U the forward is ±1 (and beyond)
    # every study setting has its BNN, BNN++ and normalised BNN++ row, teacher and reference
    for key in sweep.STUDY:
        for pair in ("bnn", "bnn++", "bnn++-norm"):
            row = sweep.ROWS[sweep._study_name(key, pair)]
            assert row.teacher == sweep.STUDY_TEACHERS[key] and row.ref == sweep.STUDY_REFS[key]
            assert dict(row.overrides)["pair"] == pair.removesuffix("-norm")
