"""Statistical gradient quantizers (Chen et al. 2020): formulas against a numpy reference with
the same draws, the grid, unbiasedness and variance bounds over 2000 keys, BHQ's grouping and
reflection, edge values, jit/vmap, the families, a quant layer's gradients, and a tiny FQT run."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qflax.numerics
from qflax import data
from qflax import layers as ql
from qflax import quantizers as qz
from qflax.layers import QuantLinear, recipes

KEY = jax.random.key(0)
K = 2000  # keys of the statistical tests
KEYS = jax.random.split(jax.random.key(7), K)


def one_large_row(seed=0, shape=(12, 24)):
    """The case BHQ is designed for: small rows and one row of 100× their range."""
    rng = np.random.default_rng(seed)
    g = 0.01 * rng.normal(size=shape).astype(np.float32)
    g[3] *= 100.0
    return jnp.asarray(g)


def ptq(g, bits, key):
    return qz.ptq_gradient(g, bits=bits, key=key)


def psq(g, bits, key):
    return qz.psq_gradient(g, bits=bits, key=key)


def bhq(g, bits, key):
    return qz.bhq_gradient(g, bits=bits, key=key)


def dorefa(g, bits, key):
    spec = ql.TensorQuant(kind="dorefa_grad", config=qz.StatGradConfig(bits=bits))
    return spec.apply(g, key=key)


QUANTIZERS = {"ptq": ptq, "psq": psq, "bhq": bhq, "dorefa_grad": dorefa}
NAMES = list(QUANTIZERS)


@jax.jit
def all_8bit(g, key):
    """Every quantizer at 8 bits (one compilation per input shape: CPU time is shared)."""
    return {name: fn(g, 8, key) for name, fn in QUANTIZERS.items()}


BOUNDS = {
    "ptq": lambda g, bits: qz.ptq_variance_bound(g, bits=bits),
    "psq": lambda g, bits: qz.psq_variance_bound(g, bits=bits),
    "bhq": lambda g, bits: qz.bhq_variance_bound(g, bits=bits),
    "dorefa_grad": lambda g, bits: qz.dorefa_gradient_variance_bound(g, bits=bits),
}


# ------------------------------------------------------------------------------- references


def noise_draws(key, shape, noise):
    """The uniform variates stochastic_round(..., noise=noise) uses."""
    if noise == "hash":
        return np.asarray(qflax.numerics.hash_uniform(key, shape), np.float64)
    return np.asarray(jax.random.uniform(key, shape, jnp.float32), np.float64)


def rows_reference(g, bits, key, noise="hash"):
    """Per-row stochastic rounding in numpy (float64) with the draws stochastic_round makes."""
    g = np.asarray(g, np.float64)
    u = noise_draws(key, g.shape, noise)
    lo, hi = g.min(1, keepdims=True), g.max(1, keepdims=True)
    step = (hi - lo) / (2**bits - 1)
    t = (g - lo) / np.where(step > 0, step, 1.0)
    k = np.floor(t) + (u < t - np.floor(t))
    return lo + k * step


def bhq_reference(g, bits, key, noise="hash"):
    """BHQ with an explicit N×N matrix T: the C++ get_transform's grouping, blocks H·diag(s)."""
    g = np.asarray(g, np.float64)
    n_rows = g.shape[0]
    offset = g.min(1, keepdims=True)
    x = g - offset
    lam = x.max(1)
    rank = np.argsort(-lam, kind="stable")
    ls = lam[rank]
    k = next((z for z in range(1, n_rows) if z * ls[n_rows - z - 1] > ls[: n_rows - z].sum()), 0)
    large = n_rows - k
    cum = np.floor(k * np.cumsum(ls[:large]) / ls[:large].sum() + 0.5).astype(int)
    t_mat, t_inv = np.zeros((n_rows, n_rows)), np.zeros((n_rows, n_rows))
    prev = 0
    for i in range(large):
        members = [rank[i]] + [rank[large + j] for j in range(prev, cum[i])]
        n = len(members)
        h = np.asarray(qz.householder_uniform(n), np.float64)
        s = np.ones(n)
        if n > 1:
            t = np.cbrt(ls[large + prev] * np.abs(h).max() / ((n - 1) * ls[i] / np.sqrt(n)))
            s[1:] = 1.0 / t if t > 0 else 0.0
        inv_s = np.where(s > 0, 1.0 / np.where(s > 0, s, 1.0), 0.0)
        t_mat[np.ix_(members, members)] = h * s[None, :]
        t_inv[np.ix_(members, members)] = inv_s[:, None] * h
        prev = cum[i]
    back = t_inv @ rows_reference(t_mat @ x, bits, key, noise)
    back[lam == 0] = 0.0  # constant rows are exact
    return back + offset


# ------------------------------------------------------------------------------- formulas


def test_golden_values():
    g = jnp.array([[0.0, 0.25, 1.0], [-2.0, 0.0, 2.0]])
    third = 2.0 / 3.0
    # threefry draws of KEY: [[0.948, 0.979, 0.332], [0.469, 0.570, 0.166]];
    # k = ⌊t⌋ + 1[u < t − ⌊t⌋]
    np.testing.assert_allclose(
        qz.ptq_gradient(g, bits=2, key=KEY, noise="threefry"),
        [[-third, -third, third], [-2.0, -third, 2.0]],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        qz.psq_gradient(g, bits=2, key=KEY, noise="threefry"),
        [[0.0, 0.0, 1.0], [-2.0, -third, 2.0]],
        rtol=1e-6,
    )
    # hash draws of KEY (the default): [[0.084, 0.615, 0.307], [0.598, 0.684, 0.798]];
    # t = (g + 2)·3/4 = [[1.5, 1.6875, 2.25], [0, 1.5, 3]]
    np.testing.assert_allclose(
        noise_draws(KEY, (2, 3), "hash"), [[0.084, 0.615, 0.307], [0.598, 0.684, 0.798]], atol=5e-4
    )
    np.testing.assert_allclose(
        qz.ptq_gradient(g, bits=2, key=KEY),
        [[third, third, third], [-2.0, -third, 2.0]],
        rtol=1e-6,
    )


@pytest.mark.parametrize("noise", qflax.numerics.NOISE_SOURCES)
def test_ptq_and_psq_match_the_numpy_reference(noise):
    g = one_large_row(1)
    np.testing.assert_allclose(
        qz.psq_gradient(g, bits=5, key=KEY, noise=noise),
        rows_reference(g, 5, KEY, noise),
        rtol=1e-5,
        atol=1e-6,
    )
    flat = rows_reference(g.reshape(1, -1), 5, KEY, noise).reshape(g.shape)
    np.testing.assert_allclose(
        qz.ptq_gradient(g, bits=5, key=KEY, noise=noise), flat, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("noise", qflax.numerics.NOISE_SOURCES)
def test_bhq_matches_the_explicit_matrix_reference(noise):
    g = np.array(one_large_row(2))
    g[5] = 0.0  # a zero row and a constant row inside the groups
    g[7] = 0.3
    got = np.asarray(qz.bhq_gradient(jnp.asarray(g), bits=5, key=KEY, noise=noise))
    ref = bhq_reference(g, 5, KEY, noise)
    # (a rounding decision may flip where t lands within float error of the draw)
    close = np.isclose(got, ref, rtol=1e-4, atol=1e-5)
    assert close.mean() > 0.99, close.mean()
    np.testing.assert_array_equal(got[5], 0.0)
    np.testing.assert_array_equal(got[7], np.float32(0.3))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_lie_on_the_grid_of_each_row(dtype):
    g = one_large_row(3, (6, 3, 5)).astype(dtype)
    bits = (2, 8, 16)
    out, rest = jax.jit(
        lambda g, k: ([(ptq(g, b, k), psq(g, b, k)) for b in bits], [bhq(g, 5, k), dorefa(g, 5, k)])
    )(g, KEY)
    for q in rest:  # shape and dtype kept; within a step of g
        assert q.shape == g.shape and q.dtype == g.dtype
        np.testing.assert_allclose(np.asarray(q, np.float32), np.asarray(g, np.float32), atol=0.25)
    for b, pair in zip(bits, out, strict=True):
        for rows, q in zip(("all", "sample"), pair, strict=True):
            assert q.shape == g.shape and q.dtype == g.dtype
            x = np.asarray(g, np.float64).reshape(1 if rows == "all" else 6, -1)
            y = np.asarray(q, np.float64).reshape(x.shape)
            lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
            assert np.all((y >= lo) & (y <= hi))
            if dtype == jnp.float32:
                codes = (y - lo) / ((hi - lo) / (2**b - 1))
                np.testing.assert_allclose(codes, np.round(codes), atol=2e-3 * max(1, 2**b / 4096))


def test_token_rows_share_a_range_per_position():
    g = jnp.zeros((2, 3, 4)).at[1, 2].set(jnp.array([1.0, 2.0, 3.0, 4.0]))
    outs = jax.jit(
        lambda g, k: [
            qz.psq_gradient(g, bits=4, key=k, rows="token"),
            qz.bhq_gradient(g, bits=4, key=k, rows="token"),
        ]
    )(g, KEY)
    for out in outs[:2]:  # per token, the zero positions of sample 1 are exact
        np.testing.assert_array_equal(out[0], 0.0)
        np.testing.assert_array_equal(out[1, :2], 0.0)
        np.testing.assert_allclose(out[1, 2], g[1, 2])  # (a grid of 3/15 holds 1, 2, 3, 4)


# ------------------------------------------------------------------------------- statistics


@pytest.fixture(scope="module")
def draws():
    """K draws of each quantizer at 8 and 5 bits on the one-large-row matrix (one compilation)."""
    g = one_large_row()

    def one(k):
        return {(n, b): fn(g, b, k) for b in (8, 5) for n, fn in QUANTIZERS.items()}

    return g, jax.tree.map(np.asarray, jax.jit(jax.vmap(one))(KEYS))


@pytest.mark.parametrize("bits", [8, 5])
def test_unbiased_over_keys(draws, bits):
    g, out = draws
    x = np.asarray(g, np.float64)
    b = 2**bits - 1
    for name in NAMES:
        samples = out[name, bits].astype(np.float64)
        # σ of an element <= half its step (stochastic rounding); BHQ mixes rows: measured σ
        if name == "ptq":
            sigma = np.full_like(x, (x.max() - x.min()) / b / 2)
        elif name == "psq":
            sigma = np.broadcast_to((x.max(1) - x.min(1))[:, None] / b / 2, x.shape)
        elif name == "dorefa_grad":
            sigma = np.broadcast_to(np.abs(x).max(1)[:, None] / b, x.shape)
        else:
            sigma = samples.std(0)
        tol = 5.0 * sigma / np.sqrt(K) + 1e-6 * np.abs(x).max()
        err = np.abs(samples.mean(0) - x)
        assert np.all(err <= tol), (name, np.max(err / tol))


@pytest.mark.parametrize("bits", [8, 5])
def test_variance_within_bounds_and_bhq_below_psq_below_ptq(draws, bits):
    g, out = draws
    x = np.asarray(g, np.float64)
    var = {n: np.mean(np.sum((out[n, bits] - x) ** 2, axis=(1, 2))) for n in NAMES}
    bound = {n: float(BOUNDS[n](g, bits)) for n in NAMES}
    for name in NAMES:
        assert var[name] <= bound[name], (name, var[name], bound[name])
    assert var["bhq"] < var["psq"] < var["ptq"]
    assert bound["bhq"] < bound["psq"] < bound["ptq"]
    assert var["bhq"] < 0.25 * var["psq"]  # measured ~0.1 (one row of 100× the others' range)


def test_family_variance_bound_is_the_function():
    g = one_large_row()
    for kind, fn in BOUNDS.items():
        spec = ql.TensorQuant(kind=kind, config=qz.StatGradConfig(bits=8))
        assert float(spec.family.variance_bound(spec, g)) == pytest.approx(float(fn(g, 8)))
    # the closed forms
    b = 255.0
    x = np.asarray(g, np.float64)
    r, ri = x.max() - x.min(), x.max(1) - x.min(1)
    assert float(qz.ptq_variance_bound(g, bits=8)) == pytest.approx(x.size * r**2 / (4 * b**2))
    want = x.shape[1] * np.sum(ri**2) / (4 * b**2)
    assert float(qz.psq_variance_bound(g, bits=8)) == pytest.approx(want, rel=1e-5)
    want = x.shape[1] * np.sum(np.abs(x).max(1) ** 2) / b**2
    assert float(qz.dorefa_gradient_variance_bound(g, bits=8)) == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------------------- BHQ pieces


def test_householder_is_an_orthogonal_reflection_sending_e1_to_uniform():
    for n in (1, 2, 3, 5, 16):
        h = np.asarray(qz.householder_uniform(n), np.float64)
        np.testing.assert_allclose(h.T @ h, np.eye(n), atol=1e-6)
        np.testing.assert_allclose(h, h.T, atol=1e-7)
        np.testing.assert_allclose(h[:, 0], np.ones(n) / np.sqrt(n), atol=1e-6)
        if n > 1:  # a reflection: one eigenvalue −1, the rest +1
            np.testing.assert_allclose(np.linalg.eigvalsh(h), [-1.0] + [1.0] * (n - 1), atol=1e-6)


def test_groups_follow_the_reference_rule():
    # two large rows of 8 share six rows of 1: c = round(6·8/16) = 3, then 6
    lam = jnp.array([1.0, 8.0, 1.0, 1.0, 1.0, 8.0, 1.0, 1.0])
    gr = qz.bhq_groups(lam)
    assert gr.leader.tolist() == [False, True, False, False, False, True, False, False]
    groups = np.asarray(gr.group)
    assert groups[0] == groups[2] == groups[3] == groups[1]  # the first three small rows
    assert groups[4] == groups[6] == groups[7] == groups[5] != groups[1]
    assert np.all(np.asarray(gr.size) == 4.0)
    t = np.cbrt(1.0 * np.abs(np.asarray(qz.householder_uniform(4))).max() / (3 * 8.0 / 2))
    np.testing.assert_allclose(gr.ratio, t, rtol=1e-6)
    # the C++ rule is strict (k·λ > Σ): equal rows make one group, not two pairs
    assert np.asarray(qz.bhq_groups(jnp.ones(4)).size).tolist() == [4.0] * 4
    # all zero, or fewer than three rows: no grouping
    assert np.asarray(qz.bhq_groups(jnp.zeros(4)).size).tolist() == [1.0] * 4
    assert np.asarray(qz.bhq_groups(jnp.array([5.0, 0.0])).size).tolist() == [1.0, 1.0]
    # constant small rows: t = 0 (the leader is spread, the small rows stay exact)
    gr = qz.bhq_groups(jnp.array([5.0, 0.0, 0.0, 0.0]))
    assert np.asarray(gr.ratio).tolist() == [0.0] * 4


def test_bhq_with_constant_small_rows_averages_the_leader():
    # one row with three zero rows: λ²/n of PSQ's variance (n = 4), the zero rows exact
    g = jnp.zeros((4, 32)).at[0].set(jnp.linspace(-1.0, 1.0, 32))
    out = np.asarray(jax.jit(jax.vmap(lambda k: bhq(g, 4, k)))(KEYS[:500]))
    np.testing.assert_array_equal(out[:, 1:], 0.0)
    var = np.mean(np.sum((out - np.asarray(g)) ** 2, axis=(1, 2)))
    bound = float(qz.bhq_variance_bound(g, bits=4))
    assert bound == pytest.approx(float(qz.psq_variance_bound(g, bits=4)) / 4, rel=1e-5)
    assert var <= bound


# ------------------------------------------------------------------------------- edge values
# (every input (6, 5) float32: one compilation of all_8bit serves them all)


def test_zeros_zero_rows_and_constant_rows_are_exact():
    for name, out in all_8bit(jnp.zeros((6, 5)), KEY).items():
        np.testing.assert_array_equal(out, 0.0, err_msg=name)
    g = one_large_row(4, (6, 5)).at[2].set(0.0).at[4].set(-0.7)
    for name, out in all_8bit(g, KEY).items():
        assert np.all(np.isfinite(out)), name
        if name != "ptq":  # (per tensor, a zero row lies inside the tensor's range)
            np.testing.assert_array_equal(out[2], 0.0, err_msg=name)
        if name in ("psq", "bhq"):
            np.testing.assert_array_equal(out[4], np.float32(-0.7), err_msg=name)


def test_huge_values_do_not_overflow():
    g = jnp.zeros((6, 5)).at[0, :2].set(jnp.array([3e38, -3e38])).at[1].set(jnp.arange(5.0))
    step = 6e38 / 255
    for key in KEYS[:3]:
        for name, out in all_8bit(g, key).items():
            out = np.asarray(out, np.float64)
            assert np.all(np.isfinite(out)), name
            assert np.all(np.abs(out) <= 3e38 * (1 + 1e-6)), name
            np.testing.assert_allclose(out[0, :2], [3e38, -3e38], atol=2 * step, err_msg=name)
            if name != "ptq":
                np.testing.assert_array_equal(out[2:], 0.0, err_msg=name)
            if name == "psq":  # a normal row beside a huge one keeps its own grid
                np.testing.assert_allclose(out[1], np.arange(5.0), atol=4.0 / 255)


def test_subnormal_and_tiny_values_stay_finite():
    g = (
        jnp.zeros((6, 5))
        .at[0, :2]
        .set(jnp.array([1e-40, -2e-40]))
        .at[1, :3]
        .set(jnp.array([1e-37, 3e-37, 2e-37]))
    )
    for name, out in all_8bit(g, KEY).items():
        out = np.asarray(out)
        assert np.all(np.isfinite(out)), name
        assert np.all(np.abs(out) <= 3e-37 * (1 + 1e-5)), name


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_nan_and_inf_propagate(bad):
    g = one_large_row(5, (6, 5)).at[1, 2].set(bad)
    for name, out in all_8bit(g, KEY).items():
        out = np.asarray(out)
        assert np.all(np.isnan(out[1])), name  # the row holding it is never finite
        if name in ("psq", "dorefa_grad"):
            assert np.all(np.isfinite(np.delete(out, 1, axis=0))), name  # only its row
        else:
            assert np.all(np.isnan(out)), name  # one range (ptq) or mixed rows (bhq)


def test_vmap_agrees_with_one_call_per_item():
    g = one_large_row(6, (6, 5))
    stack = jnp.stack([g, 2.0 * g, -g])
    keys = jax.random.split(KEY, 3)
    # (PSQ and BHQ: the per-row reductions and the grouping are what vmap could get wrong)
    batched = jax.jit(jax.vmap(lambda g, k: (psq(g, 8, k), bhq(g, 8, k))))(stack, keys)
    for i in range(3):
        out = all_8bit(stack[i], keys[i])
        np.testing.assert_allclose(batched[0][i], out["psq"], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(batched[1][i], out["bhq"], rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------- config, families


def test_config_refusals_name_the_value_and_what_is_allowed():
    with pytest.raises(ValueError, match=r"bits=1 is out of range; allowed: integers 2\.\.16"):
        qz.StatGradConfig(bits=1)
    with pytest.raises(ValueError, match=r"bits=17 is out of range"):
        qz.StatGradConfig(bits=17)
    with pytest.raises(ValueError, match=r"bits=4\.0 is not an integer"):
        qz.StatGradConfig(bits=4.0)
    with pytest.raises(ValueError, match=r"rows='channel' is not allowed; allowed: 'sample'"):
        qz.StatGradConfig(rows="channel")
    with pytest.raises(ValueError, match="bits=32 is out of range"):
        qz.psq_gradient(jnp.ones(3), bits=32, key=KEY)
    with pytest.raises(ValueError, match="key=None is not allowed for bhq_gradient"):
        qz.bhq_gradient(jnp.ones(3), bits=8, key=None)
    with pytest.raises(TypeError, match="floating"):
        qz.ptq_gradient(jnp.ones(3, jnp.int32), bits=8, key=KEY)
    with pytest.raises(ValueError, match="grad='psq': bits=20 is out of range"):
        recipes.build("absmax", weight_bits=8, act_bits=8, grad="psq", grad_bits=20)
    with pytest.raises(dataclasses.FrozenInstanceError):
        qz.StatGradConfig().bits = 4  # type: ignore[misc]


def test_families_describe_themselves_and_quantize_twice():
    g = one_large_row(8, (6, 5))
    specs = {k: ql.TensorQuant(kind=k, config=qz.StatGradConfig(bits=8)) for k in NAMES}
    # the default grad_slots: two slots with independent keys (∇Y quantized twice)
    # (the default grad_slots is shared: its two keys are checked on PSQ and BHQ)
    stochastic = {n: specs[n] for n in ("psq", "bhq")}
    slots = jax.jit(
        lambda g, k: {n: [q(g) for q in s.grad_quantizer(k)] for n, s in stochastic.items()}
    )
    outs = slots(g, KEY)
    for kind, spec in specs.items():
        family = spec.family
        assert family.roles(spec) == ("grad",) and family.needs_key(spec)
        assert family.bits(spec) == 8 and family.granularity(spec) == "none"
        assert family.describe(spec) == f"{kind}8"
        token = ql.TensorQuant(kind=kind, config=qz.StatGradConfig(bits=5, rows="token"))
        assert family.describe(token) == (f"{kind}5" if kind == "ptq" else f"{kind}5/token")
        recipe = recipes.build("absmax", weight_bits=8, act_bits=8, grad=kind, grad_bits=6)
        assert str(recipe) == f"w:absmax8/channel a:absmax8 g:{kind}6"
        pair = spec.grad_quantizer(KEY)
        assert isinstance(pair, tuple) and len(pair) == 2 and all(map(callable, pair))
        if kind in outs:
            assert not np.array_equal(*outs[kind]), kind
        with pytest.raises(ValueError, match="needs a PRNG key"):
            spec.grad_quantizer(None)
    with pytest.raises(ValueError, match="params=.* is not allowed for kind='psq'"):
        specs["psq"].family.apply(specs["psq"], g, {"scale": 1.0}, key=KEY)


# ------------------------------------------------------------------------------- layers, training


X = jax.random.normal(jax.random.key(3), (4, 4))
FQT = recipes.build("absmax", weight_bits=8, act_bits=8, grad="psq", grad_bits=8)
QAT = recipes.build("absmax", weight_bits=8, act_bits=8)


def layer_grads(recipe, key_data):
    """∇W and ∇X of ``Σ sin(layer(x))`` with the layer's noise key set to ``key_data``."""
    layer = QuantLinear(4, 4, recipe=recipe, use_bias=False, rngs=nnx.Rngs(1))
    if hasattr(layer, "noise_key"):
        layer.noise_key[...] = key_data

    def loss(layer, x):
        return jnp.sum(jnp.sin(3.0 * layer(x)) * jnp.arange(1.0, 5.0))

    dlayer, dx = nnx.grad(loss, argnums=(0, 1))(layer, X)
    return dlayer["inner"]["kernel"][...], dx


def test_quant_linear_fqt_gradients_are_unbiased_with_independent_products():
    dw_qat, dx_qat = jax.jit(lambda: layer_grads(QAT, None))()
    datas = jax.vmap(jax.random.key_data)(KEYS)
    dw, dx = jax.jit(jax.vmap(lambda d: layer_grads(FQT, d)))(datas)
    for got, want in ((dw, dw_qat), (dx, dx_qat)):
        got = np.asarray(got, np.float64)
        tol = 5.0 * got.std(0) / np.sqrt(K) + 1e-6
        assert np.all(np.abs(got.mean(0) - np.asarray(want)) <= tol)
        assert got.std(0).max() > 0  # (it is quantized)
    # the quantized ∇Y behind ∇W and behind ∇X: ∇W = x̂ᵀ·ĝ₁, ∇X = ĝ₂·Ŵᵀ (STE), both on the
    # grid of the float ∇Y's rows, drawn with independent keys
    layer = QuantLinear(4, 4, recipe=FQT, use_bias=False, rngs=nnx.Rngs(1))
    x_hat = np.asarray(FQT.act.apply(X), np.float64)
    w_hat = np.asarray(FQT.weight.apply(layer.inner.kernel[...]), np.float64)
    g1 = np.linalg.solve(x_hat.T[None], np.asarray(dw, np.float64))
    g2 = np.swapaxes(
        np.linalg.solve(w_hat[None], np.swapaxes(np.asarray(dx, np.float64), 1, 2)), 1, 2
    )
    y = x_hat @ w_hat
    g_float = 3.0 * np.cos(3.0 * y) * np.arange(1.0, 5.0)
    step = (g_float.max(1) - g_float.min(1)) / 255
    assert np.all(np.abs(g1 - g_float) <= 1.01 * step[:, None])
    assert np.all(np.abs(g2 - g_float) <= 1.01 * step[:, None])
    differ = np.any(np.abs(g1 - g2) > 0.5 * step[:, None], axis=(1, 2))
    assert differ.mean() > 0.5  # (elements at a row's min or max are exact in both)
    e1, e2 = g1 - g_float, g2 - g_float
    corr = np.mean(e1 * e2) / np.sqrt(np.mean(e1**2) * np.mean(e2**2))
    assert abs(corr) < 0.1, corr  # one key for both would give 1


def test_tiny_fqt_run_with_5_bit_bhq_gradients_learns_digits():
    ds = data.load("digits", seed=0)
    x_train = jnp.asarray(ds.train_x.reshape(len(ds.train_x), -1))
    x_test = jnp.asarray(ds.test_x.reshape(len(ds.test_x), -1))
    recipe = recipes.build("absmax", weight_bits=8, act_bits=8, grad="bhq", grad_bits=5)
    # (one layer: the quickest program to compile; its ∇W runs through BHQ)
    model = QuantLinear(64, 10, recipe=recipe, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        def loss(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        value, grads = nnx.value_and_grad(loss)(model)
        opt.update(model, grads)
        return value

    rng = np.random.default_rng(0)
    for _ in range(60):
        idx = rng.integers(0, len(x_train), 64)
        step(model, opt, x_train[idx], jnp.asarray(ds.train_y[idx]))
    predict = nnx.jit(lambda model, x: jnp.argmax(model(x), -1))
    accuracy = float(jnp.mean(predict(model, x_test) == jnp.asarray(ds.test_y)))
    assert accuracy > 0.6, accuracy  # measured 0.91; chance 0.1


def test_bhq_reflections_dense_and_by_segment_sums_agree(monkeypatch):
    """Up to _DENSE_REFLECT_ROWS rows the group reflections are one (N, N) matrix product,
    beyond by segment sums: the same H·x to float rounding, and H·H = I (a reflection)."""
    from qflax.quantizers import _statquant

    x = jnp.asarray(one_large_row(4))
    x = x.reshape(x.shape[0], -1)
    groups = qz.bhq_groups(jnp.max(x, 1) - jnp.min(x, 1))
    assert int(jnp.max(groups.size)) >= 3  # groups of several rows are mixed
    dense = _statquant._reflect(x, groups)
    monkeypatch.setattr(_statquant, "_DENSE_REFLECT_ROWS", 0)
    by_segments = _statquant._reflect(x, groups)
    np.testing.assert_allclose(dense, by_segments, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_statquant._reflect(by_segments, groups), x, rtol=1e-5, atol=1e-5)
    assert not np.allclose(dense, x)
