"""Smoke test of benchmarks/quantizers.py: it runs on a tiny array and covers every quantizer.

No timing asserts: only that the script runs end to end and that its table has a row for every
quantizer entry point of ``qflax.quantizers`` (so a new quantizer cannot be left out silently).
"""

import importlib.util
import inspect
import json
import pathlib
import sys

import pytest

from qflax import quantizers

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "quantizers.py"

# Public functions of qflax.quantizers that are not quantizers themselves: parameter inits,
# integer codes, statistics and schedules, and the elementwise pieces and factories of pairs
# (the pairs are covered through the PAIRS catalogue rows).
HELPER_SUFFIXES = (
    "_init",
    "_codes",
    "_bits",
    "_scale",
    "_dequantize",
    "_levels",
    "_numel",
    "_l2",
    "_sparsity",
    "_deadzone",
    "_schedule",
    "_level_set",
    "_transform",
    "_bound",
)
# The registry, codes at rest and pair composition: not quantizers.
HELPER_PREFIXES = ("register_", "quantize_")
HELPERS = {
    # pieces of the FQT gradient quantizers (timed through their *_gradient / *_quantize rows)
    "bhq_groups",
    "householder_uniform",
    "hadamard_matrix",
    "hadamard_block",
    "block_hadamard",
    "bit_split",
    "leverage_rows",
    "leverage_probabilities",
    "leverage_sample",
    "water_fill",
    # the split compressor's decoder, alignment loss, byte count and level choice
    "split_decode",
    "split_alignment_loss",
    "split_payload_bytes",
    "code_entropy",
    "choose_levels",
    # DBSSQ's running activation statistics (an update between steps, not a quantizer)
    "dbssq_running_stats",
    "affine_params",
    "check_granularity",
    "grouped",
    "reduce_axes",
    "reduce_stat",
    "symmetric_params",
    "ungrouped",
    "composed_pair",
    "compact",
    "container_bits",
    "dequantize",
    "expand",
    "get_family",
    "nbytes",
    "pack",
    "unpack",
    "dbssq_quantize",  # the hard level function Q of dbssq (no custom gradient)
    # latent quantizers' codes, losses, codebook fitting and updates, utilisation (the
    # quantizers fsq, q2d2, vq, rvq have rows)
    "fsq_indices",
    "fsq_from_indices",
    "q2d2_indices",
    "q2d2_from_indices",
    "q2d2_grid",
    "vq_indices",
    "vq_from_indices",
    "vq_losses",
    "vq_ema_update",
    "vq_restart_dead",
    "rvq_indices",
    "rvq_from_indices",
    "rvq_losses",
    "rvq_ema_update",
    "rvq_restart_dead",
    "kmeans_codebook",
    "code_perplexity",
    "code_utilisation",
    "bits_per_vector",
    "dorefa",  # dispatches on its config's role to dorefa_weights / dorefa_activations (rows)
    "pair",
    *(f.__name__ for f in quantizers.PAIRS.values()),
    *quantizers.FORWARDS,
    *quantizers.BACKWARDS,
}


def _load_script():
    spec = importlib.util.spec_from_file_location("quantizer_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_script()


def _quantizer_entry_points() -> set[str]:
    names = set()
    for name in quantizers.__all__:
        obj = getattr(quantizers, name)
        if not inspect.isfunction(obj) or name in HELPERS or name.endswith(HELPER_SUFFIXES):
            continue
        if name.startswith(HELPER_PREFIXES):
            continue
        names.add(name)
    return names | {f"pair:{key}" for key in quantizers.PAIRS}


def test_cases_cover_every_quantizer(bench):
    cases = bench.build_cases((32, 32))
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "row names must be unique"
    missing = _quantizer_entry_points() - {c.entry for c in cases}
    assert not missing, f"benchmarks/quantizers.py has no row for {sorted(missing)}"
    for expected in ("uniform/ste/tensor", "uniform/clipped_ste/channel", "uniform/true/group"):
        assert expected in names
    assert any(n.startswith("uniform/learn_scale") for n in names)
    assert any("stochastic" in n for n in names) and any("binary/det/channel" in n for n in names)


def test_kernel_count_reads_entry_computation(bench):
    hlo = """HloModule m
%fused (p: f32[64]) -> f32[64] {
  ROOT %n = f32[64]{0} negate(%p)
}
ENTRY %main (x.1: f32[8,8], s.1: f32[1,1]) -> (f32[8,8], f32[]) {
  %x.1 = f32[8,8]{1,0} parameter(0)
  %s.1 = f32[1,1]{1,0} parameter(1)
  %small = f32[1,1]{1,0} fusion(%s.1), kind=kLoop, calls=%fused
  %big = f32[8,8]{1,0} fusion(%x.1, %small), kind=kLoop, calls=%fused
  %red = f32[] fusion(%big), kind=kLoop, calls=%fused
  ROOT %t = (f32[8,8]{1,0}, f32[]) tuple(%big, %red)
}
"""
    # %big writes and %red reads a full-size array; %small, parameters and the tuple do not count.
    assert bench.count_kernels(hlo, 64) == 2


def test_main_runs_tiny_and_tabulates_every_row(bench, tmp_path, capsys):
    # Every row runs its forward+backward program (which holds the forward); the forward-only
    # program and both goal columns are checked on two rows (one compile per row and mode).
    out = tmp_path / "rows.json"
    argv = ["--size", "1024", "--repeats", "1", "--modes", "fb_inplace"]
    rows = bench.main([*argv, "--json", str(out)])
    table = capsys.readouterr().out
    cases = bench.build_cases((32, 32))
    assert [r["name"] for r in rows] == [c.name for c in cases]
    for case in cases:
        assert f"| {case.name} |" in table, case.name
    assert "| **floor**" in table
    for row in rows:
        assert row["fb_inplace"]["ratio"] > 0 and row["fb_inplace"]["kernels"] >= 1, row["name"]
        assert row["fb_met"] in (True, False) and row["fwd_met"] is None
    saved = json.loads(out.read_text())
    assert [r["name"] for r in saved["rows"]] == [c.name for c in cases]
    both = ["--modes", "fwd_inplace", "fb_inplace", "--only", "^(uniform/ste/tensor|pact/4bit)$"]
    rows = bench.main(["--size", "1024", "--repeats", "1", *both])
    assert [r["name"] for r in rows] == ["uniform/ste/tensor", "pact/4bit"]
    for row in rows:
        for mode in ("fwd_inplace", "fb_inplace"):
            assert row[mode]["ratio"] > 0 and row[mode]["kernels"] >= 1, (row["name"], mode)
        assert row["fwd_met"] in (True, False) and row["fb_met"] in (True, False)


def test_bad_size_is_refused(bench):
    with pytest.raises(ValueError, match="--size=1000"):
        bench.main(["--size", "1000", "--repeats", "1"])
