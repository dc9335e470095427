"""Quantized ops: forward equals the lax op on quantized operands, STE gradients reach every
input (the AQT conv bug: zero kernel gradients), the gradient slot changes only the backward,
and the jaxpr holds exactly the products it should."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from qflax import quantizers as qz
from qflax.ops import quantized_conv_general_dilated, quantized_dot_general, quantized_einsum

DN = (((1,), (0,)), ((), ()))  # (batch, in) x (in, out), as nnx.Linear calls it
CONV_DN = ("NHWC", "HWIO", "NHWC")


def absmax_quantizer(bits: int, granularity: str = "tensor", signed: bool = True):
    """Dynamic absmax uniform quantizer (scale from the tensor, no gradient to it; STE)."""
    config = qz.UniformConfig(bits=bits, granularity=granularity, signed=signed)

    def q(x):
        scale = lax.stop_gradient(qz.uniform_init(x, config)["scale"])
        return qz.uniform(x, {"scale": scale}, config)

    return q


def learned_quantizer(scale: jax.Array, bits: int = 4):
    config = qz.UniformConfig(bits=bits, learn_scale=True)
    return lambda x: qz.uniform(x, {"scale": scale}, config)


def operands(key: int = 0, lhs_shape=(3, 5), rhs_shape=(5, 4)):
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    lhs = jax.random.normal(k1, lhs_shape)
    rhs = jax.random.normal(k2, rhs_shape)
    return lhs, rhs, k3


def conv(lhs, rhs, **kw):
    return lax.conv_general_dilated(lhs, rhs, (1, 1), "SAME", dimension_numbers=CONV_DN, **kw)


def qconv(lhs, rhs, **kw):
    return quantized_conv_general_dilated(lhs, rhs, (1, 1), "SAME", dimension_numbers=CONV_DN, **kw)


def qdot(lhs, rhs, **kw):
    return quantized_dot_general(lhs, rhs, DN, **kw)


def qeinsum(lhs, rhs, **kw):
    return quantized_einsum("bi,io->bo", lhs, rhs, **kw)


# Each case: quantized op, reference op, operand shapes.
OPS = {
    "dot_general": (qdot, lambda a, b: lax.dot_general(a, b, DN), (3, 5), (5, 4)),
    "conv": (qconv, conv, (2, 5, 5, 3), (3, 3, 3, 4)),
    "einsum": (qeinsum, lambda a, b: jnp.einsum("bi,io->bo", a, b), (3, 5), (5, 4)),
}


@settings(max_examples=10)
@given(
    bits=st.integers(2, 8),
    rhs_granularity=st.sampled_from(["tensor", "channel"]),
    op_name=st.sampled_from(sorted(OPS)),
)
def test_forward_equals_reference_on_quantized_operands(bits, rhs_granularity, op_name):
    qop, ref, lhs_shape, rhs_shape = OPS[op_name]
    lhs, rhs, _ = operands(bits, lhs_shape, rhs_shape)
    q_lhs, q_rhs = absmax_quantizer(bits), absmax_quantizer(bits, rhs_granularity)
    got = qop(lhs, rhs, lhs_quantizer=q_lhs, rhs_quantizer=q_rhs)
    np.testing.assert_array_equal(got, ref(q_lhs(lhs), q_rhs(rhs)))
    # The quantizers did something (the test could fail): the float result differs.
    assert not np.array_equal(got, ref(lhs, rhs))


@pytest.mark.parametrize("op_name", sorted(OPS))
def test_none_slots_are_the_float_op(op_name):
    qop, ref, lhs_shape, rhs_shape = OPS[op_name]
    lhs, rhs, _ = operands(1, lhs_shape, rhs_shape)
    np.testing.assert_array_equal(qop(lhs, rhs), ref(lhs, rhs))


@pytest.mark.parametrize("op_name", sorted(OPS))
def test_ste_gradients_reach_both_operands(op_name):
    """With absmax STE quantizers, d/dlhs = vjp_lhs(op at quantized operands)(g), same for rhs."""
    qop, ref, lhs_shape, rhs_shape = OPS[op_name]
    lhs, rhs, key = operands(2, lhs_shape, rhs_shape)
    q = absmax_quantizer(3)
    out = ref(q(lhs), q(rhs))
    g = jax.random.normal(key, out.shape)

    def loss(a, b):
        return jnp.sum(g * qop(a, b, lhs_quantizer=q, rhs_quantizer=q))

    dlhs, drhs = jax.jit(jax.grad(loss, argnums=(0, 1)))(lhs, rhs)
    _, vjp = jax.vjp(ref, q(lhs), q(rhs))  # the STE formula: identity through the quantizers
    want_lhs, want_rhs = vjp(g)
    np.testing.assert_allclose(dlhs, want_lhs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(drhs, want_rhs, rtol=1e-5, atol=1e-5)
    assert np.all(np.abs(np.asarray(drhs)).sum(axis=tuple(range(drhs.ndim - 1))) > 0)
    assert np.abs(np.asarray(dlhs)).sum() > 0


def test_dot_general_ste_formula_by_hand():
    lhs, rhs, key = operands(3)
    q = absmax_quantizer(4)
    g = jax.random.normal(key, (3, 4))
    dlhs, drhs = jax.grad(
        lambda a, b: jnp.sum(g * qdot(a, b, lhs_quantizer=q, rhs_quantizer=q)), argnums=(0, 1)
    )(lhs, rhs)
    np.testing.assert_allclose(dlhs, g @ q(rhs).T, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(drhs, q(lhs).T @ g, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op_name", sorted(OPS))
def test_gradients_reach_learned_quantizer_params(op_name):
    qop, ref, lhs_shape, rhs_shape = OPS[op_name]
    lhs, rhs, _ = operands(4, lhs_shape, rhs_shape)

    def loss(op, s_lhs, s_rhs):
        out = op(
            lhs, rhs, lhs_quantizer=learned_quantizer(s_lhs), rhs_quantizer=learned_quantizer(s_rhs)
        )
        return jnp.sum(out**2)

    def loss_ref(s_lhs, s_rhs):
        return jnp.sum(ref(learned_quantizer(s_lhs)(lhs), learned_quantizer(s_rhs)(rhs)) ** 2)

    s = (jnp.full((1,) * len(lhs_shape), 0.3), jnp.full((1,) * len(rhs_shape), 0.2))
    got = jax.grad(functools.partial(loss, qop), argnums=(0, 1))(*s)
    want = jax.grad(loss_ref, argnums=(0, 1))(*s)
    for a, b in zip(got, want, strict=True):
        assert np.abs(a).sum() > 0
        np.testing.assert_allclose(a, b, rtol=1e-5)


@pytest.mark.parametrize("op_name", sorted(OPS))
def test_grad_quantizer_changes_only_the_backward(op_name):
    qop, ref, lhs_shape, rhs_shape = OPS[op_name]
    lhs, rhs, key = operands(5, lhs_shape, rhs_shape)
    q = absmax_quantizer(4)
    g_q = absmax_quantizer(2)  # coarse, so the backward visibly changes
    out = ref(q(lhs), q(rhs))
    g = jax.random.normal(key, out.shape)

    def run(**slots):
        f = lambda a, b: qop(a, b, lhs_quantizer=q, rhs_quantizer=q, **slots)
        y, vjp = jax.vjp(f, lhs, rhs)
        return y, vjp(g)

    y_float, (dl_float, dr_float) = run()
    y_quant, (dl, dr) = run(grad_quantizer=g_q)
    np.testing.assert_array_equal(y_quant, y_float)  # forward unchanged
    _, vjp = jax.vjp(ref, q(lhs), q(rhs))
    want_l, want_r = vjp(g_q(g))
    np.testing.assert_allclose(dl, want_l, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dr, want_r, rtol=1e-5, atol=1e-5)
    assert not np.allclose(dl, dl_float) and not np.allclose(dr, dr_float)

    # A pair quantizes the two backward products independently: float for dlhs here.
    _, (dl_pair, dr_pair) = run(grad_quantizer=(None, g_q))
    np.testing.assert_allclose(dl_pair, dl_float, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dr_pair, want_r, rtol=1e-5, atol=1e-5)


def test_grad_quantizer_may_close_over_traced_values():
    """A stochastic gradient quantizer closing over a key, and one over a learned param, jit."""
    lhs, rhs, key = operands(6)

    @jax.jit
    def grads(lhs, rhs, key, s):
        noisy = lambda g: g + jax.random.normal(key, g.shape)
        scaled = lambda g: g * s

        def loss(a, b, s):
            y = qdot(a, b, lhs_quantizer=lambda x: x * s, grad_quantizer=(noisy, scaled))
            return jnp.sum(y)

        return jax.grad(loss, argnums=(0, 1, 2))(lhs, rhs, s)

    s = jnp.float32(2.0)
    dlhs, drhs, ds = grads(lhs, rhs, key, s)
    ones = jnp.ones((3, 4))
    np.testing.assert_allclose(
        dlhs, s * ((ones + jax.random.normal(key, (3, 4))) @ rhs.T), rtol=1e-5
    )
    np.testing.assert_allclose(drhs, (s * lhs).T @ (s * ones), rtol=1e-5)
    # ds flows only through the forward lhs quantizer (the grad quantizer's s gets none).
    np.testing.assert_allclose(ds, jnp.sum(dlhs / s * lhs), rtol=1e-5)


def count_primitive(jaxpr, name: str) -> int:
    """Occurrences of primitive ``name`` in ``jaxpr`` and its sub-jaxprs (pjit, custom_vjp...)."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for param in eqn.params.values():
            sub = getattr(param, "jaxpr", param)  # ClosedJaxpr -> Jaxpr
            if hasattr(sub, "eqns"):
                n += count_primitive(sub, name)
    return n


def test_jaxpr_has_one_product_forward_and_three_with_backward():
    lhs, rhs, _ = operands(7)
    q = absmax_quantizer(4)
    fwd = jax.make_jaxpr(lambda a, b: qdot(a, b, lhs_quantizer=q, rhs_quantizer=q))(lhs, rhs)
    assert count_primitive(fwd.jaxpr, "dot_general") == 1
    grad = jax.make_jaxpr(
        jax.grad(lambda a, b: qdot(a, b, lhs_quantizer=q, grad_quantizer=q).sum(), (0, 1))
    )(lhs, rhs)
    assert count_primitive(grad.jaxpr, "dot_general") == 3  # forward, dlhs, drhs
    conv_fwd = jax.make_jaxpr(lambda a, b: qconv(a, b, rhs_quantizer=q))(
        *operands(7, (1, 4, 4, 2), (3, 3, 2, 2))[:2]
    )
    assert count_primitive(conv_fwd.jaxpr, "conv_general_dilated") == 1


def test_bad_slots_raise():
    lhs, rhs, _ = operands(8)
    with pytest.raises(ValueError, match="lhs_quantizer=3"):
        qdot(lhs, rhs, lhs_quantizer=3)
    with pytest.raises(ValueError, match="grad_quantizer has 3 entries"):
        qdot(lhs, rhs, grad_quantizer=(None, None, None))
    with pytest.raises(ValueError, match="rhs_quantizer returned shape"):
        qdot(lhs, rhs, rhs_quantizer=lambda x: x[:1])
    with pytest.raises(ValueError, match="exactly 2"):
        quantized_einsum("i,i,i->", lhs[0], lhs[0], lhs[0], lhs_quantizer=lambda x: x)
    np.testing.assert_allclose(
        quantized_einsum("i,i,i->", lhs[0], lhs[0], lhs[0]), jnp.sum(lhs[0] ** 3), rtol=1e-5
    )


def test_preferred_element_type_and_bf16():
    lhs, rhs, _ = operands(9)
    lhs16, rhs16 = lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16)
    q = absmax_quantizer(4)
    y = qdot(lhs16, rhs16, lhs_quantizer=q, preferred_element_type=jnp.float32, grad_quantizer=q)
    assert y.dtype == jnp.float32
    g = jax.grad(
        lambda a: qdot(
            a, rhs16, lhs_quantizer=q, grad_quantizer=q, preferred_element_type=jnp.float32
        ).sum()
    )(lhs16)
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))
