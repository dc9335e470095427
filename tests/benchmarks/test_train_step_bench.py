"""Smoke test of benchmarks/train_step.py: its measuring function runs on a tiny MLP with one
round and its table has a row for every variant (no timing asserts)."""

import importlib.util
import pathlib
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "train_step.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_step_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_script()


def test_measure_model_tabulates_every_variant(bench):
    tiny = bench.ModelSpec("mlp", (4, 4, 1), 10, {"hidden": (16, 16)})
    rows = bench.measure_model(tiny, bench.VARIANTS, rounds=1, batch_size=8)
    assert [r["variant"] for r in rows] == [v.name for v in bench.VARIANTS]
    table = bench.format_table(rows)
    for variant in bench.VARIANTS:
        assert f"| mlp | {variant.name} |" in table, variant.name
    by_name = {r["variant"]: r for r in rows}
    assert by_name["float"]["ratio"] == 1.0 and by_name["float"]["quantized"] == ()
    for name in ("W8A8", "W4A4", "GDNSQ", "BNN++", "FQT PSQ8", "FQT BHQ8", "INT4 HQ+LSS"):
        # stem and head stay float: only the middle layer is quantized
        assert by_name[name]["quantized"] == ("blocks.0",), name
        goal = by_name[name]["goal"]
        assert by_name[name]["met"] in ((None,) if goal is None else (True, False))
        assert by_name[name]["ratio"] > 0
    assert by_name["GDNSQ"]["penalty"] and not by_name["W4A4"]["penalty"]
    assert by_name["GDNSQ"]["goal"] == bench.GDNSQ_GOAL
    assert by_name["W8A8"]["goal"] == bench.FIXED_BIT_GOAL
    assert by_name["FQT BHQ8"]["goal"] == bench.FQT_GOAL
    for row in rows:  # one warm-up and one timed sample: losses are finite numbers
        assert row["loss_first"] == row["loss_first"] and row["ms"] > 0 and row["compile_s"] > 0


def test_bad_rounds_are_refused(bench):
    with pytest.raises(ValueError, match="rounds=0"):
        bench.measure_model(bench.MODELS["cnn"], bench.VARIANTS[:1], rounds=0, batch_size=8)
