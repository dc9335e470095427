"""The foundation's main job: every quantizer on real bundled data."""

import math

import numpy as np
import pytest

from qflax import report


def test_sqnr_db_golden():
    x = np.array([1.0, -2.0, 3.0])
    assert report.sqnr_db(x, x) == math.inf
    # signal 14, noise 0.14 -> 20 dB
    noise = np.sqrt(0.14 / 3)
    assert report.sqnr_db(x, x + noise) == pytest.approx(20.0)


@pytest.fixture(scope="module")
def result():
    return report.quantizer_report(seed=0)


def test_report_covers_every_quantizer_family(result):
    rows, context = result
    families = {r["family"] for r in rows}
    assert {"uniform", "power-of-two", "binary", "ternary"} <= families
    from qflax import quantizers as qz

    pair_rows = {r["name"].split()[0] for r in rows if r["family"].startswith("pair")}
    built_in = {
        n
        for n, f in qz.PAIRS.items()
        if (getattr(f, "__module__", None) or "").startswith("qflax.")
    }
    assert pair_rows == built_in
    assert context["shapes"] == {"images": (1000, 784), "W1": (784, 64), "W2": (64, 10)}


def test_report_values_are_sane(result):
    rows, context = result
    by_name = {r["name"]: r for r in rows}
    assert context["float_accuracy"] > 0.85
    # More bits, less error; finer granularity, less error on weights.
    assert by_name["int8 per-tensor"]["W1_sqnr"] > by_name["int4 per-tensor"]["W1_sqnr"]
    assert by_name["int4 per-tensor"]["W1_sqnr"] > by_name["int2 per-channel"]["W1_sqnr"]
    assert by_name["int4 per-channel"]["W1_sqnr"] > by_name["int4 per-tensor"]["W1_sqnr"]
    # ~6 dB per bit for uniform int8 vs int4 per tensor (4 bits -> ~24 dB).
    gap = by_name["int8 per-tensor"]["W1_sqnr"] - by_name["int4 per-tensor"]["W1_sqnr"]
    assert 20 < gap < 28
    # int8 weights keep the MLP's accuracy.
    assert abs(by_name["int8 per-tensor"]["mlp_accuracy"] - context["float_accuracy"]) < 0.01
    for r in rows:
        for t in ("images", "W1", "W2"):
            lv = r[f"{t}_levels"]
            assert lv is None or 0 < lv <= 1
    # Images are non-negative: a signed symmetric grid uses at most its upper half (+ zero).
    assert by_name["int8 per-tensor"]["images_levels"] <= 129 / 256
    table = report.format_table(rows, context)
    assert "int4 per-channel, MSE clip" in table and "float: " in table
