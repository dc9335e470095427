"""Tests of the GDNSQ bit-width penalty (qflax/train/_penalty.py, METHODS.md §3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qflax.train._penalty import (
    PenaltyState,
    bit_penalty,
    penalty_init,
    penalty_loss,
    violated_count,
    violated_share,
)

MARGIN = 1e-3


def test_bit_penalty_golden_and_pytree():
    bits = jnp.array([2.0, 5.0, 4.5])
    assert float(bit_penalty(bits, 4.0)) == pytest.approx((1.001 + 0.501) / 3, rel=1e-6)
    assert float(bit_penalty(bits, 4.0, p=2)) == pytest.approx((1.001**2 + 0.501**2) / 3, rel=1e-6)
    per_layer = [jnp.array([2.0]), jnp.array([[5.0, 4.5]])]
    assert float(bit_penalty(per_layer, 4.0)) == pytest.approx(float(bit_penalty(bits, 4.0)))
    assert float(violated_count(per_layer, 4.0)) == 2.0
    assert float(violated_share(bits, 4.0)) == pytest.approx(2 / 3)
    # The margin: a width exactly at the target violates; one margin below does not.
    assert float(violated_count(jnp.array([4.0, 4.0 - 2 * MARGIN]), 4.0)) == 1.0


@given(
    bits=st.lists(st.floats(0.0, 12.0, width=32), min_size=1, max_size=8),
    target=st.integers(1, 8),
)
def test_penalty_zero_iff_all_meet_the_target_and_gradient_sign(bits, target):
    b = jnp.asarray(bits, jnp.float32)
    value = float(bit_penalty(b, target))
    over = np.asarray(bits) > target - MARGIN
    if over.any():
        assert value > 0
    else:
        assert value == 0.0
    grad = np.asarray(jax.grad(lambda b: bit_penalty(b, target))(b))
    np.testing.assert_allclose(grad, np.where(over, 1.0 / len(bits), 0.0), rtol=1e-6)
    # A gradient step lowers the widths that exceed the target and leaves the others.
    assert np.all(grad[over] > 0) and np.all(grad[~over] == 0)


def test_penalty_loss_golden_sequence():
    w_bits = [jnp.array([5.0, 2.0]), jnp.array([3.0])]  # target 4: one violation (excess 1.001)
    a_bits = jnp.array([9.0])  # target 8: one violation (excess 1.001)
    state = penalty_init()
    kwargs = dict(target_w=4, target_a=8, lr=0.1, warmup_steps=2)
    losses, states = [], []
    for task in (2.0, 4.0, 6.0, 8.0):
        loss, state = penalty_loss(jnp.asarray(task), w_bits, a_bits, state, **kwargs)
        losses.append(float(loss))
        states.append(state)
    np.testing.assert_array_equal([int(s.step) for s in states], [1, 2, 3, 4])
    np.testing.assert_allclose([float(s.loss_mean) for s in states], [2, 3, 4, 5], rtol=1e-6)
    np.testing.assert_allclose([float(s.t) for s in states], [0, 0, 0.2, 0.4], rtol=1e-6)
    p_w, p_a = 1.001 / 3, 1.001  # ω_w = ω_a = (1 + ε)/(2 + ε)
    omega = (1 + 1e-3) / (2 + 1e-3)
    pen = omega * (p_w + p_a)
    np.testing.assert_allclose(
        losses, [2.0, 4.0, 6.0 + 4 * 0.2 * pen, 8.0 + 5 * 0.4 * pen], rtol=1e-5
    )


def test_omega_is_each_groups_share_of_violations():
    w_bits = jnp.array([5.0, 6.0, 7.0])  # 3 violations of target 4
    a_bits = jnp.array([9.0, 1.0])  # 1 violation of target 8
    state = PenaltyState(jnp.asarray(10, jnp.int32), jnp.asarray(1.0), jnp.asarray(0.5))
    loss, new = penalty_loss(
        jnp.asarray(0.0), w_bits, a_bits, state, target_w=4, target_a=8, lr=0.25
    )
    eps = 1e-3
    p_w, p_a = (1.001 + 2.001 + 3.001) / 3, 1.001 / 2
    want = (10 / 11) * 1.0 * ((3 + eps) * p_w + (1 + eps) * p_a) / (4 + eps)
    assert float(new.t) == 1.0 and float(new.loss_mean) == pytest.approx(10 / 11)
    assert float(loss) == pytest.approx(want, rel=1e-5)


def test_zero_when_all_widths_meet_the_targets():
    state = PenaltyState(jnp.asarray(5, jnp.int32), jnp.asarray(3.0), jnp.asarray(1.0))
    loss, _ = penalty_loss(
        jnp.asarray(1.5),
        jnp.array([3.0, 2.0]),
        jnp.array([4.0]),
        state,
        target_w=4,
        target_a=8,
        lr=0.1,
    )
    assert float(loss) == 1.5


def test_gradients_lower_exceeding_widths_only():
    state = PenaltyState(jnp.asarray(3, jnp.int32), jnp.asarray(2.0), jnp.asarray(1.0))

    def total(task, w_bits, a_bits):
        return penalty_loss(task, w_bits, a_bits, state, target_w=2, target_a=4, lr=0.5)[0]

    w_bits, a_bits = jnp.array([3.0, 1.0]), jnp.array([6.0, 4.5, 3.0])
    g_task, g_w, g_a = jax.grad(total, argnums=(0, 1, 2))(jnp.asarray(1.0), w_bits, a_bits)
    assert float(g_task) == 1.0  # c̄ is a stop-gradient
    assert float(g_w[0]) > 0 and float(g_w[1]) == 0
    assert float(g_a[0]) > 0 and float(g_a[1]) > 0 and float(g_a[2]) == 0
    # Magnitude: c̄·t·ω/n with c̄ = (3·2 + 1)/4, t = 1 + 2·0.5, ω_w = (1+ε)/(3+ε), n_w = 2.
    c_bar, t, eps = 7 / 4, 2.0, 1e-3
    assert float(g_w[0]) == pytest.approx(c_bar * t * (1 + eps) / (3 + eps) / 2, rel=1e-5)
    assert float(g_a[0]) == pytest.approx(c_bar * t * (2 + eps) / (3 + eps) / 3, rel=1e-5)


def test_jit_scan_and_vmap():
    kwargs = dict(target_w=4, target_a=8, warmup_steps=3)

    @jax.jit
    def run(tasks, lrs):
        def body(state, inputs):
            task, lr = inputs
            loss, state = penalty_loss(
                task, jnp.array([5.0]), jnp.array([7.0]), state, lr=lr, **kwargs
            )
            return state, loss

        return jax.lax.scan(body, penalty_init(), (tasks, lrs))

    tasks = jnp.arange(1.0, 7.0)
    state, losses = run(tasks, jnp.full(6, 0.05))
    assert int(state.step) == 6
    np.testing.assert_allclose(float(state.t), 3 * 0.1, rtol=1e-6)  # 3 warm-up steps at t = 0
    np.testing.assert_allclose(float(state.loss_mean), 3.5, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(losses[:3]), [1.0, 2.0, 3.0])
    assert np.all(np.asarray(losses[3:]) > np.asarray(tasks[3:]))
    # vmap over independent runs (e.g. a sweep over targets' inputs).
    batched = jax.vmap(lambda b: bit_penalty(b, 4))(jnp.array([[5.0, 3.0], [1.0, 2.0]]))
    np.testing.assert_allclose(np.asarray(batched), [1.001 / 2, 0.0], rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(p=0), "p"), (dict(p=True), "p"), (dict(warmup_steps=-1), "warmup_steps")],
)
def test_bad_arguments_raise(kwargs, field):
    with pytest.raises(ValueError, match=rf"{field}=.*allowed"):
        penalty_loss(
            jnp.asarray(1.0),
            jnp.ones(2),
            jnp.ones(2),
            penalty_init(),
            target_w=4,
            target_a=4,
            lr=0.1,
            **kwargs,
        )
    with pytest.raises(ValueError, match="bits=.*allowed"):
        bit_penalty([], 4)
    with pytest.raises(ValueError, match="scalar"):
        penalty_loss(
            jnp.ones(2), jnp.ones(2), jnp.ones(2), penalty_init(), target_w=4, target_a=4, lr=0.1
        )
