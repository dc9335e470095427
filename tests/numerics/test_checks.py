"""Tests of the value checks: concrete arrays are checked, traced ones pass through."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qflax.numerics import check_finite, check_nonempty, check_positive, is_concrete


def test_check_finite_names_count_size_and_first_index():
    x = jnp.array([[1.0, np.nan], [np.inf, -np.inf]])
    with pytest.raises(
        ValueError,
        match=r"^f: x holds 3 non-finite .* of 4, the first at index "
        r"\(0, 1\); allowed: finite values$",
    ):
        check_finite(x, "f")
    check_finite(jnp.array([1.0, -0.0, 3e38]), "f")  # finite: nothing
    check_finite(jnp.array([1, 2], jnp.int32), "f")  # integers are always finite


def test_check_finite_does_nothing_when_traced():
    def f(x):
        assert not is_concrete(x)
        check_finite(x, "f")
        return x + 1.0

    assert np.isnan(np.asarray(jax.jit(f)(jnp.array([np.nan])))).all()
    assert is_concrete(jnp.array([1.0])) and is_concrete(np.ones(2))


def test_check_positive_refuses_zero_negative_and_non_finite():
    cases = [(0.0, "0.0"), (-1.0, "-1.0"), (np.nan, "nan"), (np.inf, "inf")]
    cases.append((1e-40, r"9.9999\d*e-41"))
    for bad, first in cases:  # 1e-40: a subnormal, which XLA:CPU flushes to 0
        with pytest.raises(
            ValueError,
            match=rf"holds 1 value\(s\) that are not positive normal floats, "
            rf"the first "
            rf"{first} at index 1; allowed: finite values >= 1.17",
        ):
            check_positive(jnp.array([1.0, bad]), "g")
    check_positive(jnp.array([np.finfo(np.float32).tiny, 2.0]), "g")
    jax.jit(lambda s: check_positive(s, "g") or s)(jnp.array([-1.0]))  # traced: not checked


def test_check_nonempty_names_where_and_shape():
    with pytest.raises(ValueError, match=r"^h: x has shape \(3, 0\) with no elements"):
        check_nonempty(jnp.zeros((3, 0)), "h")
    check_nonempty(jnp.zeros(()), "h")  # a scalar has one element
