"""Tests of the fused parameter-gradient sums (qflax/quantizers/_base.py: ``fused_sums``).

Large tensors (at least 2^16 elements) take the two-step sum that XLA:CPU fuses with the
expression it sums; the quantizer test files use small tensors, so the gradients of the
learned-scale quantizers are checked here again at a size that takes that path, against the
METHODS.md formulas in float64. The compiled programs are checked for what the change is for:
no full-size temporary besides the outputs (the value and the input gradient).
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qflax.quantizers._base import fused_sum, fused_sums, sum_to_shape
from qflax.quantizers._gdnsq import GDNSQActConfig, GDNSQWeightConfig, gdnsq_act, gdnsq_weight
from qflax.quantizers._lsq import LSQConfig, lsq, lsq_init
from qflax.quantizers._pact import PACTConfig, pact
from qflax.quantizers._uniform import UniformConfig, uniform, uniform_init
from tests.quantizers._reference import reduce_axes as _axes
from tests.quantizers._reference import view as _view

SHAPE = (256, 512)  # 2^17 elements: the fused path


def _normal(seed: int, shape=SHAPE, scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize(
    ("shape", "axes"),
    [
        ((256, 512), (0, 1)),
        ((256, 512), (0,)),
        ((256, 512), (1,)),
        ((64, 16, 128), (2,)),  # a group view
        ((64, 16, 128), (0, 1)),
        ((4, 65536), (0,)),  # a short reduced axis: window 4
        ((3, 5, 7, 1000), (0, 1, 2)),  # odd last reduced axis: a plain sum
        ((65536, 6), (0, 1)),  # window gcd(6, 8) = 2
        ((100,), (0,)),  # small: a plain sum
    ],
)
def test_fused_sums_equal_jnp_sum(shape, axes):
    a, b = _normal(0, shape), _normal(1, shape)
    got = jax.jit(lambda a, b: fused_sums((a * b, jnp.where(a > 0, b, 0.0)), axes))(a, b)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    for value, want in zip(got, (a64 * b64, np.where(a64 > 0, b64, 0.0)), strict=True):
        want_sum = np.sum(want, axis=axes)
        scale = np.sum(np.abs(want), axis=axes)
        assert value.shape == want_sum.shape and value.dtype == jnp.float32
        np.testing.assert_array_less(np.abs(np.asarray(value) - want_sum), 1e-6 * scale + 1e-6)


def test_fused_sum_of_no_axes_and_special_values():
    x = jnp.asarray(_normal(2))
    assert fused_sum(x, ()) is x
    for special in (np.inf, -np.inf, np.nan):
        y = x.at[3, 5].set(special)
        np.testing.assert_array_equal(
            np.asarray(jax.jit(lambda y: fused_sum(y, (0, 1)))(y)), np.sum(np.asarray(y))
        )
    # An all-(-0) sum: the value is 0 (its sign may differ from jnp.sum's).
    assert float(fused_sum(jnp.full(SHAPE, -0.0), (0, 1))) == 0.0
    np.testing.assert_array_equal(
        np.asarray(sum_to_shape(jnp.ones(SHAPE), (1, 512))), np.full((1, 512), 256.0)
    )


# --------------------------------------------------------------------------------------------
# The learned-scale gradients at a size that takes the fused path.

GRANULARITIES = [("tensor", -1, None), ("channel", -1, None), ("channel", 0, None)]
GRANULARITIES += [("group", -1, 128)]


@pytest.mark.parametrize(("granularity", "axis", "group_size"), GRANULARITIES)
def test_lsq_gradients_equal_the_formulas_at_size(granularity, axis, group_size):
    config = LSQConfig(bits=4, granularity=granularity, axis=axis, group_size=group_size)
    x, cot = _normal(3, scale=2.0), _normal(4)
    params = {"step": lsq_init(x, config)["step"] * 0.6}
    _, vjp = jax.vjp(lambda x, p: lsq(x, p, config), jnp.asarray(x), params)
    dx, dp = vjp(jnp.asarray(cot))

    qn, qp = 8, 7
    s = np.asarray(params["step"], np.float64)
    v = _view(x.astype(np.float64), config) / s
    below, above = v <= -qn, v >= qp
    inside = ~(below | above)
    g = _view(cot.astype(np.float64), config)
    np.testing.assert_array_equal(_view(np.asarray(dx), config), np.where(inside, g, 0.0))
    gamma = 1 / math.sqrt(x.size // s.size * qp)
    per_elem = g * np.where(inside, np.round(v) - v, np.where(below, -qn, qp))
    axes = _axes(config, 2)
    want = gamma * np.sum(per_elem, axis=axes, keepdims=True)
    atol = 1e-5 * gamma * np.sum(np.abs(per_elem), axis=axes, keepdims=True)
    # float32 and float64 may round an element within 1e-4 of a tie differently.
    tie = np.abs(np.abs(v - np.floor(v)) - 0.5) < 1e-4
    atol += gamma * np.sum(np.where(tie, np.abs(g), 0.0), axis=axes, keepdims=True)
    np.testing.assert_array_less(np.abs(np.asarray(dp["step"]) - want), atol + 1e-7)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_uniform_learned_scale_and_zero_point_gradients_at_size(granularity):
    config = UniformConfig(
        bits=4,
        symmetric=False,
        gradient="clipped_ste",
        learn_scale=True,
        learn_zero_point=True,
        granularity=granularity,
    )
    x, cot = _normal(5, scale=2.0), _normal(6)
    params = uniform_init(x, config)
    params = {"scale": params["scale"] * 0.6, "zero_point": params["zero_point"] + 0.3}
    _, vjp = jax.vjp(lambda x, p: uniform(x, p, config), jnp.asarray(x), params)
    dx, dp = vjp(jnp.asarray(cot))

    s = np.asarray(params["scale"], np.float64)
    z = np.round(np.asarray(params["zero_point"], np.float64))
    u = x.astype(np.float64) / s
    lo, hi = config.qmin, config.qmax
    inside = (u + z >= lo) & (u + z <= hi)
    q = np.clip(np.round(u) + z, lo, hi)
    g = cot.astype(np.float64)
    np.testing.assert_array_equal(np.asarray(dx), np.where(inside, g, 0.0))
    axes = (0, 1) if granularity == "tensor" else (0,)
    # float32 and float64 may round an element within 1e-4 of a tie differently (a jump of
    # at most one code, |g| in the sum): those elements widen the tolerance.
    tie = np.abs(np.abs(u - np.floor(u)) - 0.5) < 1e-4
    for name, per_elem in (
        ("scale", g * np.where(inside, np.round(u) - u, q - z)),
        ("zero_point", g * np.where(inside, 0.0, -np.broadcast_to(s, x.shape))),
    ):
        want = np.sum(per_elem, axis=axes, keepdims=True)
        atol = 1e-5 * np.sum(np.abs(per_elem), axis=axes, keepdims=True) + 1e-6
        atol += np.sum(np.where(tie, np.abs(g), 0.0), axis=axes, keepdims=True)
        np.testing.assert_array_less(np.abs(np.asarray(dp[name]) - want), atol)


def test_pact_alpha_gradient_at_size():
    x, cot = _normal(7, scale=2.0), _normal(8)
    alpha = jnp.asarray(1.5, jnp.float32)
    _, vjp = jax.vjp(lambda x, a: pact(x, {"alpha": a}, PACTConfig(bits=4)), jnp.asarray(x), alpha)
    dx, da = vjp(jnp.asarray(cot))
    g = cot.astype(np.float64)
    np.testing.assert_array_equal(np.asarray(dx), np.where((x >= 0) & (x < 1.5), g, 0.0))
    per_elem = np.where(x >= 1.5, g, 0.0)
    assert abs(float(da) - np.sum(per_elem)) <= 1e-5 * np.sum(np.abs(per_elem))


# --------------------------------------------------------------------------------------------
# The compiled forward+backward: no full-size temporary besides the outputs.

_FULL = re.compile(r"^\s*%[\w.\-]+ = f32\[(\d+),(\d+)\]")


def _full_size_results(fn, *args) -> int:
    """Instructions of the ENTRY computation (not parameters) with a full-size f32 result."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    entry = text[text.index("\nENTRY") :].split("\n}")[0].split("\n")[1:]
    count = 0
    for line in entry:
        match = _FULL.match(line)
        if match and "parameter(" not in line and " bitcast(" not in line:
            count += int(match.group(1)) * int(match.group(2)) == math.prod(SHAPE)
    return count


@pytest.mark.parametrize(
    ("name", "apply", "params"),
    [
        ("lsq/tensor", lambda x, p: lsq(x, p, LSQConfig(bits=4)), {"step": jnp.ones((1, 1))}),
        (
            "lsq/channel",
            lambda x, p: lsq(x, p, LSQConfig(bits=4, granularity="channel")),
            {"step": jnp.ones((1, 512))},
        ),
        (
            "uniform/affine",
            lambda x, p: uniform(
                x,
                p,
                UniformConfig(
                    bits=8,
                    symmetric=False,
                    gradient="clipped_ste",
                    learn_scale=True,
                    learn_zero_point=True,
                ),
            ),
            {"scale": jnp.full((1, 1), 0.05), "zero_point": jnp.full((1, 1), 3.0)},
        ),
        ("pact", lambda x, p: pact(x, p, PACTConfig(bits=4)), {"alpha": jnp.asarray(1.0)}),
        (
            "gdnsq_weight/channel",
            lambda x, p: gdnsq_weight(x, p, GDNSQWeightConfig(backward="ste")),
            {"log_step": jnp.full((1, 512), -4.0)},
        ),
        (
            "gdnsq_act/signed",
            lambda x, p: gdnsq_act(
                x, p, GDNSQActConfig(signed=True, backward="ste", init_log_range=None)
            ),
            {
                "log_step": jnp.asarray(-4.0),
                "log_range": jnp.asarray(1.0),
                "lower": jnp.asarray(-1.0),
            },
        ),
    ],
)
def test_forward_backward_has_no_full_size_temporary(name, apply, params):
    def fb(x, p, g):
        y, vjp = jax.vjp(apply, x, p)
        return y, *vjp(g)

    x = jnp.asarray(_normal(9))
    # Two full-size results: the value and the input gradient; the parameter sums read x and g
    # in one fused pass and write 1/8-size partial sums.
    assert _full_size_results(fb, x, params, x) == 2, name


@pytest.mark.parametrize("scaling", ["tensor", "channel"])
def test_binary_and_ternary_scales_at_size(scaling):
    """``mean|x|`` (binary's α, ternary's threshold) and ternary's masked mean at a size that
    takes the fused path, against float64, with gradients through the quantizers unchanged."""
    from qflax.quantizers._binary import (
        BinaryConfig,
        TernaryConfig,
        binary,
        binary_scale,
        ternary,
        ternary_scale,
    )

    x = _normal(12)
    axes = (0, 1) if scaling == "tensor" else (0,)
    xd = np.abs(x.astype(np.float64))
    mean_abs = xd.mean(axis=axes, keepdims=True)
    got = binary_scale(jnp.asarray(x), BinaryConfig(scaling=scaling))
    np.testing.assert_allclose(got, mean_abs, rtol=1e-5)
    config = TernaryConfig(scaling=scaling)
    delta = float(config.threshold) * mean_abs
    kept = xd > delta
    want = (xd * kept).sum(axis=axes, keepdims=True) / np.maximum(
        kept.sum(axis=axes, keepdims=True), 1
    )
    np.testing.assert_allclose(ternary_scale(jnp.asarray(x), config), want, rtol=1e-5)
    # Straight-through gradients times the (constant) scale: the scales get none.
    g = jax.grad(lambda v: jnp.sum(ternary(v, {}, config) * 2.0))(jnp.asarray(x))
    np.testing.assert_allclose(g, np.broadcast_to(2.0 * want, x.shape), rtol=1e-5)
    g = jax.grad(lambda v: jnp.sum(binary(v, {}, BinaryConfig(scaling=scaling))))(jnp.asarray(x))
    ste = np.where(np.abs(x) <= 1, 1.0, 0.0) if BinaryConfig().gradient == "clipped_ste" else 1.0
    np.testing.assert_allclose(g, ste * np.broadcast_to(mean_abs, x.shape), rtol=1e-5)
