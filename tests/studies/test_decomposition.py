"""Tests of the ProxConnect++ decomposition check and the pair plots (qflax/studies)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from qflax.quantizers._pairs import PAIRS, bc, bnn, hardtanh, identity, pair, sign
from qflax.studies import (
    check_catalogue,
    decomposition_violation,
    pair_criterion,
    plot_catalogue,
    plot_pair,
)


def test_bc_is_consistent():
    p = bc()
    r = decomposition_violation(p.forward, p.backward)
    assert r["consistent"] and r["violation"] == 0.0 and r["kind"] is None
    assert r["num_points"] == 2001 and r["x"] is None


def test_bnn_is_consistent():
    r = decomposition_violation(sign, hardtanh)  # B constant (±1) for |x| ≥ 1, where F is too
    assert r["consistent"] and r["max_spread"] == 0.0 and r["max_decrease"] == 0.0


def test_negated_sign_is_flagged():
    r = decomposition_violation(lambda x: -sign(x), identity)
    assert not r["consistent"]
    assert r["kind"] == "decrease" and r["violation"] == pytest.approx(2.0)
    (x1, x2), (b1, b2), (f1, f2) = r["x"], r["b"], r["f"]
    assert x1 < 0 <= x2 + 1e-6 and b1 <= b2 and f1 - f2 == pytest.approx(2.0)


def test_reversed_backward_is_flagged():
    r = decomposition_violation(sign, lambda x: -x)
    assert not r["consistent"] and r["violation"] == pytest.approx(2.0)
    assert r["kind"] == "decrease"


def test_non_function_of_b_is_flagged_as_spread():
    # B = x² cannot tell x from -x, but F = x can: spread |x - (-x)| up to 2·3 on [-3, 3].
    grid = jnp.linspace(-3.0, 3.0, 7)  # exact in float32: -3, -2, ..., 3
    r = decomposition_violation(identity, lambda x: x * x, grid=grid)
    assert r["kind"] == "spread" and r["violation"] == pytest.approx(6.0)
    # Along increasing b the minima -1, -2, -3 fall below the earlier maxima 0, 1, 2: 2 - (-3).
    assert r["max_decrease"] == pytest.approx(5.0)
    assert sorted(r["x"]) == [-3.0, 3.0]
    # With F = |x| (even), F is a monotone function of x²: consistent.
    assert decomposition_violation(jnp.abs, lambda x: x * x, grid=grid)["consistent"]


def test_small_violation_and_tolerance():
    grid = jnp.array([0.0, 1.0, 2.0, 3.0])
    f = lambda x: jnp.where(x == 2.0, 0.9, jnp.minimum(x, 1.0))  # noqa: E731  dips by 0.1
    r = decomposition_violation(f, identity, grid=grid)
    assert r["violation"] == pytest.approx(0.1, abs=1e-6) and not r["consistent"]
    assert r["x"] == (1.0, 2.0)
    assert decomposition_violation(f, identity, grid=grid, tol=0.2)["consistent"]


def test_b_tol_groups_nearly_equal_values():
    grid = jnp.array([0.0, 1.0])
    b = lambda x: 1e-7 * x  # noqa: E731
    assert decomposition_violation(lambda x: -x, b, grid=grid)["kind"] == "decrease"
    r = decomposition_violation(lambda x: -x, b, grid=grid, b_tol=1e-6)
    assert r["kind"] == "spread" and r["violation"] == pytest.approx(1.0)


def test_kwargs_are_passed():
    from qflax.quantizers._pairs import sign_swish

    r = decomposition_violation(
        sign_swish, sign_swish, forward_kwargs={"beta": 2.0}, backward_kwargs={"beta": 8.0}
    )
    # SS_2 and SS_8 have their extrema at different x: F is not a monotone function of B.
    assert not r["consistent"]
    same = decomposition_violation(
        sign_swish, sign_swish, forward_kwargs={"beta": 3.0}, backward_kwargs={"beta": 3.0}
    )
    assert same["consistent"]


def test_bad_inputs():
    with pytest.raises(ValueError, match="grid"):
        decomposition_violation(sign, identity, grid=jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="forward"):
        decomposition_violation(lambda x: x[:1], identity)
    with pytest.raises(ValueError, match="backward"):
        decomposition_violation(sign, lambda x: jnp.log(x))
    with pytest.raises(ValueError, match="backward"):
        decomposition_violation(sign, "identity")


def test_check_catalogue():
    results = check_catalogue()
    assert list(results) == list(PAIRS)
    for name, r in results.items():
        assert r["consistent"], (name, r)
    bad = check_catalogue({"bad": lambda: pair(lambda x: -sign(x), identity), "bnn": bnn})
    assert not bad["bad"]["consistent"] and bad["bnn"]["consistent"]


def test_plot_pair_and_catalogue(tmp_path):
    path = plot_pair(bnn(), tmp_path / "bnn.png")
    data = path.read_bytes()
    assert path.exists() and len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    grid = np.linspace(-2, 2, 201, dtype=np.float32)
    paths = plot_catalogue(tmp_path / "catalogue", grid=grid)
    assert list(paths) == list(PAIRS)
    assert paths["bnn++"].name == "bnn_plus_plus.png"
    assert len({p.name for p in paths.values()}) == len(PAIRS)
    for p in paths.values():
        assert p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------ criterion


def test_pair_criterion_passes_the_catalogue():
    from qflax.quantizers import PAIRS as ALL

    for name in ("bc", "pc", "proxquant", "bnn", "bnn+", "bnn++", "approx_sign", "multibit"):
        r = pair_criterion(ALL[name]())
        assert r["holds"] and r["failed"] == [], (name, r)
        assert {c["source"] for c in r["conditions"].values()} <= {"[paper]", "[inferred]"}
    # SignSwish overshoots: BNN+ passes the criterion with a non-monotone B (information only)
    assert pair_criterion(ALL["bnn+"]())["b_monotone"] is False


@pytest.mark.parametrize(
    ("forward", "backward", "failed"),
    [
        # a backward that loses the sign of x: F is not a function of B
        (sign, jnp.abs, ["f_function_of_b", "p_non_decreasing"]),
        # a backward that flips the sign: P would have to decrease
        (sign, lambda x: -x, ["p_non_decreasing"]),
        # a decreasing P: F = −sign against B = identity
        (lambda x: -sign(x), identity, ["p_non_decreasing"]),
        # a backward with zero derivative everywhere passes no gradient
        (sign, sign, ["b_passes_gradient"]),
        # a backward that oscillates: F non-monotone in B
        (sign, lambda x: jnp.sin(3 * x), ["p_non_decreasing"]),
    ],
)
def test_pair_criterion_flags_negative_controls(forward, backward, failed):
    r = pair_criterion(pair(forward, backward))
    assert not r["holds"] and r["failed"] == failed
    worst = r["conditions"][failed[0]]
    assert worst["violation"] > 0 and worst["source"] in ("[paper]", "[inferred]")
    if failed[0] != "b_passes_gradient":
        # where it fails: two grid points with b_first <= b_second
        (x1, x2), (b1, b2) = worst["where"]["x"], worst["where"]["b"]
        assert b1 <= b2 and x1 != x2


def test_pair_criterion_of_functions_and_errors():
    r = pair_criterion(forward=sign, backward=hardtanh)
    assert r["holds"] and r["num_points"] == 2001
    with pytest.raises(ValueError, match="forward/backward missing"):
        pair_criterion(forward=sign)
    with pytest.raises(ValueError, match="one of the two"):
        pair_criterion(bnn(), forward=sign)
