"""Tests of the latent quantizers (qflax/quantizers/_latent.py, _vq.py; METHODS.md §8): FSQ,
Q2D2's four grids, VQ / residual VQ with k-means, EMA and restarts, utilisation and families."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from qflax import layers as ql
from qflax import quantizers as qz

F32 = np.float32
H = math.sqrt(3) / 2


def _uniform(seed, shape, lo=-1.0, hi=1.0):
    return np.random.default_rng(seed).uniform(lo, hi, shape).astype(F32)


# ---------------------------------------------------------------------------------- FSQ


def _fsq_reference(z, levels, bound=True, eps=1e-3):
    """The paper's Appendix A.1 in float64: (bounded b, quantized values)."""
    L = np.asarray(levels, np.float64)
    half_l = (L - 1) * (1 - eps) / 2
    offset = np.where(np.asarray(levels) % 2 == 0, 0.5, 0.0)
    shift = np.tan(offset / half_l)
    z = np.asarray(z, np.float64)
    b = np.tanh(z + shift) * half_l - offset if bound else z * half_l - offset
    hw = np.floor(L / 2)
    codes = np.clip(np.round(b), -hw, L - 1 - hw)
    return b, codes / hw


def test_fsq_golden_ties_bounds_and_saturation():
    config = qz.FSQConfig(levels=(3, 4), bound=False, eps=0.0)
    z = np.array(
        [[0.5, 1.0], [-0.5, -1.0], [1.5, 0.0], [3.0, 5.0], [1.0, 2 / 3], [-1.0, -7.0]], F32
    )
    # L=3: b = z, ties 0.5 and -0.5 round to even (0), beyond ±1 clip. L=4: b = 1.5z - 0.5,
    # z=0 and z=2/3 are the ties -0.5 and 0.5 -> 0, z=1 -> 1 (value 1/2), z=-1 -> -2 (value
    # -1), 5 and -7 clip to the outer codes 1 and -2.
    want = [[0, 0.5], [0, -1], [1, 0], [1, 0.5], [1, 0], [-1, -1]]
    np.testing.assert_array_equal(np.asarray(qz.fsq(z, config)), np.asarray(want, F32))
    # bounded (the paper): ±1 and beyond are inside (-1, 1) after tanh; ±inf saturate too
    config = qz.FSQConfig(levels=(5, 8))
    z = np.array([[1.0, 1.0], [-1.0, -1.0], [1e30, 1e30], [-np.inf, np.inf], [0, 0]], F32)
    got = np.asarray(qz.fsq(z, config))
    np.testing.assert_array_equal(got, np.asarray(_fsq_reference(z, (5, 8))[1], F32))
    np.testing.assert_array_equal(got[2:4], [[1, 0.75], [-1, 0.75]])  # 8 levels: -1 .. 3/4
    np.testing.assert_array_equal(got[4], [0, 0])


@pytest.mark.parametrize("bound", [True, False])
def test_fsq_matches_the_paper_formula_and_its_range(bound):
    levels = (2, 3, 4, 5, 8)
    config = qz.FSQConfig(levels=levels, bound=bound)
    z = _uniform(0, (400, 5), -3, 3)
    got = np.asarray(qz.fsq(z, config))
    b, want = _fsq_reference(z, levels, bound)
    clear = np.abs(b - np.round(b)) < 0.5 - 1e-4  # float32 and float64 agree off near-ties
    np.testing.assert_array_equal(got[clear], want[clear].astype(F32))
    for c, L in enumerate(levels):  # every channel takes exactly its L levels, within [-1, 1]
        assert len(np.unique(got[:, c])) == L and np.abs(got[:, c]).max() <= 1


def test_fsq_non_finite_subnormal_and_zero():
    config = qz.FSQConfig(levels=(3, 5))
    z = np.array([[np.nan, 0.2], [1e-40, -1e-40], [0.0, -0.0]], F32)
    got = np.asarray(qz.fsq(z, config))
    assert np.isnan(got[0, 0]) and got[0, 1] == 0  # NaN stays in its element
    np.testing.assert_array_equal(got[1:], 0)  # subnormals quantize as zeros
    idx = np.asarray(qz.fsq_indices(z, config))
    assert idx[0] == -1 and idx[1] == idx[2] == 1 + 2 * 3  # digits (1, 2)
    back = np.asarray(qz.fsq_from_indices(jnp.array([-1, 15, 14]), config))
    assert np.isnan(back[:2]).all() and np.array_equal(back[2], [1.0, 1.0])
    nofloat = qz.FSQConfig(levels=(3,), bound=False)
    got = np.asarray(qz.fsq(np.array([[np.inf], [-np.inf], [np.nan]], F32), nofloat))
    assert got[0, 0] == 1 and got[1, 0] == -1 and np.isnan(got[2, 0])


def test_fsq_index_round_trips():
    config = qz.FSQConfig(levels=(2, 3, 4, 5))
    every = jnp.arange(config.codebook_size, dtype=jnp.int32)
    points = qz.fsq_from_indices(every, config)
    assert points.shape == (120, 4) and len(np.unique(np.asarray(points), axis=0)) == 120
    np.testing.assert_array_equal(
        np.asarray(qz.fsq_indices(points, config, quantized=True)), np.asarray(every)
    )
    z = _uniform(1, (3, 50, 4), -2, 2)
    idx = qz.fsq_indices(z, config)
    assert idx.shape == (3, 50) and idx.dtype == jnp.int32
    np.testing.assert_array_equal(
        np.asarray(qz.fsq_from_indices(idx, config)), np.asarray(qz.fsq(z, config))
    )
    # mixed radix, first channel least significant: digits (1, 2, 3, 4) -> 1 + 2·2 + 3·6 + 4·24
    assert int(qz.fsq_indices(qz.fsq_from_indices(119, config), config, quantized=True)) == 119


@pytest.mark.parametrize("bound", [True, False])
def test_fsq_gradient_is_straight_through_the_bound(bound):
    levels = (3, 4, 8)
    config = qz.FSQConfig(levels=levels, bound=bound)
    z = _uniform(2, (6, 3), -2, 2)
    w = _uniform(3, (6, 3))
    g = np.asarray(jax.grad(lambda z: jnp.sum(qz.fsq(z, config) * w))(jnp.asarray(z)))
    L = np.asarray(levels, np.float64)
    half_l = (L - 1) * (1 - 1e-3) / 2
    shift = np.tan(np.where(L % 2 == 0, 0.5, 0.0) / half_l)
    slope = half_l * (1 - np.tanh(z + shift) ** 2) if bound else half_l
    np.testing.assert_allclose(g, w * slope / np.floor(L / 2), rtol=1e-5, atol=1e-7)


def test_fsq_jit_vmap_and_dtype():
    config = qz.FSQConfig(levels=(5, 5))
    z = jnp.asarray(_uniform(4, (3, 7, 2), -2, 2))
    fn = functools.partial(qz.fsq, config=config)
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(fn))(z)), np.asarray(fn(z)))
    assert qz.fsq(z.astype(jnp.bfloat16), config).dtype == jnp.bfloat16


# ---------------------------------------------------------------------------------- Q2D2

LATTICE_LEVELS = {
    "rectangular": (2, 2, 3, 5, 4, 6, 7, 7),
    "hexagonal": (2, 2, 3, 5, 4, 6, 7, 7),
    "rhombic": (2, 2, 3, 5, 4, 6, 7, 7),
    "hexagonal_upstream": (2, 2, 3, 3, 4, 4, 7, 7),
}


def test_q2d2_grids_are_defined_as_documented():
    def grid(levels, lattice):
        return qz.q2d2_grid(qz.Q2D2Config(levels=levels, lattice=lattice))

    np.testing.assert_array_equal(
        grid((2, 3), "rectangular"),
        [[-0.5, -1], [-0.5, 0], [-0.5, 1], [0.5, -1], [0.5, 0], [0.5, 1]],
    )
    np.testing.assert_array_equal(
        grid((3, 3), "rhombic")[9:], [[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]]
    )
    np.testing.assert_allclose(
        grid((3, 3), "hexagonal"),
        [[-1, 0], [0, 0], [1, 0], [-0.5, -H], [-0.5, H], [0.5, -H], [0.5, H]],
        atol=1e-12,
    )
    np.testing.assert_allclose(
        grid((2, 2), "hexagonal_upstream"), [[-0.25, -0.5], [0.75, -0.5], [-0.75, 0.5], [0.25, 0.5]]
    )
    sizes = {lat: qz.Q2D2Config(levels=(5, 5), lattice=lat).grid_sizes[0] for lat in LATTICE_LEVELS}
    assert sizes == {"rectangular": 25, "hexagonal": 23, "rhombic": 41, "hexagonal_upstream": 25}
    # the true hexagonal grid: every point's nearest neighbours are 1 apart, rows √3/2 apart
    g = grid((7, 7), "hexagonal")
    d = np.linalg.norm(g[:, None] - g[None], axis=-1) + np.eye(len(g)) * 9
    np.testing.assert_allclose(d.min(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.diff(np.unique(g[:, 1].round(9))), H, atol=1e-8)
    assert np.abs(g).max() <= 3 and len(g) == 45
    # upstream's: rows 1 apart, offset ±1/4 (not equilateral: diagonal neighbours sqrt(1.25))
    g = grid((3, 3), "hexagonal_upstream")
    np.testing.assert_allclose(np.linalg.norm(g[0] - g[6]), math.sqrt(1.25))
    half = qz.q2d2_grid(qz.Q2D2Config(levels=(3, 4, 5, 6)), 1, normalized=True)
    assert half.min() == -2 / 2 and half.max() == 2 / 2 and len(half) == 30


def _brute(points, grid):
    """Indices of the nearest grid point (float64) and the gap to the second nearest."""
    d = np.linalg.norm(points[:, None, :] - grid[None], axis=-1)
    order = np.sort(d, axis=1)
    return np.argmin(d, axis=1), order[:, 1] - order[:, 0], d


@pytest.mark.parametrize("lattice", list(LATTICE_LEVELS))
def test_q2d2_nearest_point_is_exact_against_brute_force(lattice):
    levels = LATTICE_LEVELS[lattice]
    config = qz.Q2D2Config(levels=levels, lattice=lattice, bound=False)
    P = config.pairs
    z = _uniform(5, (600, 2 * P), -1.6, 1.6)  # a good share of points outside the grid
    z[:20] *= np.float32(50.0)
    z[20:30] *= np.float32(1e6)
    idx = jax.jit(functools.partial(qz.q2d2_indices, config=config))(z)
    q = np.asarray(jax.jit(functools.partial(qz.q2d2, config=config))(z))
    scale = ((np.asarray(levels) - 1) * (1 + 1e-3) / 2).astype(F32)
    s = (z * scale).astype(np.float64)  # what the quantizer snaps (float32 product)
    local = (
        np.asarray(idx)[:, None]
        // np.cumprod((1,) + config.grid_sizes[:-1])
        % np.asarray(config.grid_sizes)
    )
    for p in range(P):
        grid = qz.q2d2_grid(config, p)
        best, gap, d = _brute(s[:, 2 * p : 2 * p + 2], grid)
        clear = gap > 1e-4 * (1 + np.abs(s[:, 2 * p : 2 * p + 2]).max(axis=1))
        assert clear.mean() > 0.95
        np.testing.assert_array_equal(local[clear, p], best[clear])
        chosen = d[np.arange(len(d)), local[:, p]]
        np.testing.assert_allclose(chosen, d.min(axis=1), rtol=1e-6, atol=1e-5)
        hw = np.floor(np.asarray(levels[2 * p : 2 * p + 2]) / 2)
        np.testing.assert_allclose(q[:, 2 * p : 2 * p + 2], grid[local[:, p]] / hw, rtol=1e-6)


@pytest.mark.parametrize("lattice", list(LATTICE_LEVELS))
def test_q2d2_index_round_trips_every_grid_point(lattice):
    levels = (3, 4, 2, 2) if lattice != "hexagonal_upstream" else (3, 3, 2, 2)
    config = qz.Q2D2Config(levels=levels, lattice=lattice)
    every = jnp.arange(config.codebook_size, dtype=jnp.int32)
    points = qz.q2d2_from_indices(every, config)
    assert len(np.unique(np.asarray(points), axis=0)) == config.codebook_size
    np.testing.assert_array_equal(
        np.asarray(qz.q2d2_indices(points, config, quantized=True)), np.asarray(every)
    )
    z = _uniform(6, (200, 4), -3, 3)
    np.testing.assert_array_equal(
        np.asarray(qz.q2d2_from_indices(qz.q2d2_indices(z, config), config)),
        np.asarray(qz.q2d2(z, config)),
    )


def test_q2d2_golden_ties_non_finite_and_gradient():
    hexagonal = qz.Q2D2Config(levels=(3, 3), lattice="hexagonal", bound=False, eps=0.0)
    z = np.array([[0, 0], [0.5, 0], [0.3, 0.6], [np.nan, 0.1], [np.inf, 0.2], [1e-40, 0]], F32)
    got = np.asarray(qz.q2d2(z, hexagonal))
    np.testing.assert_array_equal(got[0], [0, 0])
    np.testing.assert_array_equal(got[1], [1, 0])  # tie (0,0)/(1,0): the even position, x=1
    np.testing.assert_allclose(got[2], [0.5, H], rtol=1e-6)
    assert np.isnan(got[3]).all()  # a NaN poisons its pair
    np.testing.assert_array_equal(got[4], [1, 0])  # +inf: the far right point of the nearest row
    np.testing.assert_array_equal(got[5], [0, 0])
    idx = np.asarray(qz.q2d2_indices(z, hexagonal))
    assert idx[3] == -1 and idx[0] == 1 and idx[4] == 2
    assert np.isnan(np.asarray(qz.q2d2_from_indices(jnp.array([-1, 7]), hexagonal))).all()
    # bounded: tanh first; gradient (1 - tanh²)·(L - 1)(1 + ε)/(2⌊L/2⌋)
    config = qz.Q2D2Config(levels=(3, 4, 5, 8), lattice="rhombic")
    z = _uniform(7, (5, 4), -2, 2)
    w = _uniform(8, (5, 4))
    g = np.asarray(jax.grad(lambda z: jnp.sum(qz.q2d2(z, config) * w))(jnp.asarray(z)))
    L = np.asarray(config.levels, np.float64)
    slope = (1 - np.tanh(z.astype(np.float64)) ** 2) * (L - 1) * 1.001 / 2 / np.floor(L / 2)
    np.testing.assert_allclose(g, w * slope, rtol=1e-5, atol=1e-7)
    vm = jax.jit(jax.vmap(functools.partial(qz.q2d2, config=config)))(z.reshape(5, 1, 4))
    np.testing.assert_array_equal(np.asarray(vm)[:, 0], np.asarray(qz.q2d2(z, config)))


# ---------------------------------------------------------------------------------- VQ

CB = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], F32)


def test_vq_golden_ties_and_non_finite():
    config = qz.VQConfig(codebook_size=3, dim=2)
    z = np.array([[0.4, 0.1], [0.5, 0.0], [0.0, 1.0], [0.1, 5.0], [np.nan, 0], [np.inf, 0]], F32)
    idx = np.asarray(qz.vq_indices(z, CB, config))
    np.testing.assert_array_equal(idx, [0, 0, 0, 2, -1, -1])  # ties: the lower index
    got = np.asarray(qz.vq(z, CB, config))
    np.testing.assert_array_equal(got[:4], CB[idx[:4]])
    assert np.isnan(got[4:]).all()
    assert np.isnan(np.asarray(qz.vq_from_indices(jnp.array([3, -1]), CB, config))).all()


def test_vq_nearest_codeword_against_brute_force_and_round_trips():
    config = qz.VQConfig(codebook_size=32, dim=5)
    cb = _uniform(9, (32, 5), -2, 2)
    z = _uniform(10, (4, 100, 5), -3, 3)
    idx = np.asarray(qz.vq_indices(z, cb, config)).reshape(-1)
    d = ((z.reshape(-1, 1, 5).astype(np.float64) - cb[None]) ** 2).sum(-1)
    chosen = d[np.arange(len(d)), idx]
    np.testing.assert_allclose(chosen, d.min(axis=1), rtol=1e-5, atol=1e-5)
    assert np.mean(idx == d.argmin(axis=1)) > 0.99
    np.testing.assert_array_equal(np.asarray(qz.vq_indices(cb, cb, config)), np.arange(32))
    np.testing.assert_array_equal(np.asarray(qz.vq_from_indices(jnp.arange(32), cb, config)), cb)
    np.testing.assert_array_equal(
        np.asarray(qz.vq_from_indices(qz.vq_indices(z, cb, config), cb, config)),
        np.asarray(qz.vq(z, cb, config)),
    )


def test_vq_gradients_and_losses_against_hand_formulas():
    config = qz.VQConfig(codebook_size=3, dim=2, beta=0.25)
    z = jnp.asarray(_uniform(11, (4, 2)))
    w = jnp.asarray(_uniform(12, (4, 2)))
    dz, dcb = jax.grad(lambda z, cb: jnp.sum(qz.vq(z, cb, config) * w), argnums=(0, 1))(z, CB)
    np.testing.assert_array_equal(np.asarray(dz), np.asarray(w))  # straight through
    np.testing.assert_array_equal(np.asarray(dcb), 0)  # the codebook learns from its loss only
    idx = qz.vq_indices(z, CB, config)

    def losses(z, cb):
        return qz.vq_losses(z, jnp.asarray(cb)[idx], beta=0.25)

    (lc, lm), (gz_c, gcb_c) = losses(z, CB), jax.grad(lambda *a: losses(*a)[0], (0, 1))(z, CB)
    q = CB[np.asarray(idx)]
    n = z.size
    assert float(lc) == pytest.approx(np.mean((np.asarray(z) - q) ** 2), rel=1e-6)
    assert float(lm) == pytest.approx(0.25 * np.mean((np.asarray(z) - q) ** 2), rel=1e-6)
    np.testing.assert_array_equal(np.asarray(gz_c), 0)
    want = np.zeros_like(CB)
    np.add.at(want, np.asarray(idx), 2 * (q - np.asarray(z)) / n)
    np.testing.assert_allclose(np.asarray(gcb_c), want, rtol=1e-6, atol=1e-7)
    gz_m, gcb_m = jax.grad(lambda *a: losses(*a)[1], (0, 1))(z, CB)
    np.testing.assert_allclose(np.asarray(gz_m), 2 * 0.25 * (np.asarray(z) - q) / n, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(gcb_m), 0)
    # smooth in what each loss differentiates (the other argument held constant)
    q = jnp.asarray(q)
    check_grads(lambda z: qz.vq_losses(z, q)[1], (z,), 2, modes=["rev"])
    check_grads(lambda q: qz.vq_losses(z, q)[0], (q,), 2, modes=["rev"])


def test_vq_under_jit_and_vmap():
    config = qz.VQConfig(codebook_size=3, dim=2)
    z = jnp.asarray(_uniform(13, (3, 6, 2), -2, 2))
    fn = jax.jit(jax.vmap(lambda z: qz.vq(z, CB, config)))
    np.testing.assert_array_equal(np.asarray(fn(z)), np.asarray(qz.vq(z, CB, config)))


def test_kmeans_recovers_separated_clusters_and_reseeds_empty_ones():
    centres = np.array([[5, 5], [-5, 5], [5, -5], [-5, -5]], F32)
    x = centres[np.arange(200) % 4] + 0.1 * _uniform(14, (200, 2))
    for init in qz.KMEANS_INITS:
        got = np.asarray(qz.kmeans_codebook(x, 4, key=jax.random.key(0), init=init))
        match = np.linalg.norm(got[:, None] - centres[None], axis=-1).min(axis=0)
        assert match.max() < 0.1, (init, got)
    # 100 copies of A and one B, one C: random seeds repeat A; the empty clusters take B and C
    a, b, c = [0.0, 0.0], [9.0, 0.0], [0.0, 9.0]
    x = np.array([a] * 100 + [b, c], F32)
    got = np.asarray(qz.kmeans_codebook(x, 3, key=jax.random.key(1), iters=3, init="random"))
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, [a, b, c]))


def test_ema_update_against_a_hand_computation():
    config = qz.VQConfig(codebook_size=3, dim=2, decay=0.9, epsilon=1e-5)
    state = qz.vq_ema_init(CB)
    z = np.array([[1.0, 1.0], [0.8, 0.2], [0.1, 0.1], [np.nan, 0.0]], F32)
    idx = qz.vq_indices(z, CB, config)
    np.testing.assert_array_equal(np.asarray(idx), [1, 1, 0, -1])
    new = qz.vq_ema_update(state, z, idx, config)
    counts = np.array([1.0, 2.0, 0.0])
    sums = np.array([[0.1, 0.1], [1.8, 1.2], [0, 0]])
    size = 0.9 * 1 + 0.1 * counts
    embed = 0.9 * CB + 0.1 * sums
    n = size.sum()
    smoothed = (size + 1e-5) / (n + 3e-5) * n
    np.testing.assert_allclose(np.asarray(new["cluster_size"]), size, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new["embed_sum"]), embed, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new["codebook"]), embed / smoothed[:, None], rtol=1e-6)


def test_dead_code_restart_moves_only_dead_codes():
    config = qz.VQConfig(codebook_size=4, dim=2, restart_threshold=0.1)
    cb = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], F32)
    state = {
        "codebook": jnp.asarray(cb),
        "cluster_size": jnp.array([5.0, 5.0, 0.01, 5.0]),
        "embed_sum": jnp.asarray(cb * 5),
    }
    z = _uniform(15, (10, 2), 3, 4)
    new = qz.vq_restart_dead(state, z, jax.random.key(0), config)
    got = np.asarray(new["codebook"])
    np.testing.assert_array_equal(got[[0, 1, 3]], cb[[0, 1, 3]])
    assert any(np.array_equal(got[2], row) for row in z)  # a batch vector
    mean = (15 + 0.01) / 4
    np.testing.assert_allclose(np.asarray(new["cluster_size"]), [5, 5, mean, 5], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new["embed_sum"])[2], got[2] * mean, rtol=1e-6)
    off = qz.vq_restart_dead(
        state, z, jax.random.key(0), qz.VQConfig(codebook_size=4, dim=2, restart_threshold=0.0)
    )
    np.testing.assert_array_equal(np.asarray(off["codebook"]), cb)


# ---------------------------------------------------------------------------------- RVQ


def _hierarchical_codebooks():
    corners = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], F32)
    return np.stack([10 * corners, corners, 0.1 * corners])


def test_rvq_round_trips_and_shapes():
    config = qz.RVQConfig(stages=3, codebook_size=4, dim=2)
    books = _hierarchical_codebooks()
    combos = np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)
    points = qz.rvq_from_indices(jnp.asarray(combos, jnp.int32), books, config)
    np.testing.assert_array_equal(np.asarray(qz.rvq_indices(points, books, config)), combos)
    z = _uniform(16, (2, 30, 2), -12, 12)
    idx = qz.rvq_indices(z, books, config)
    assert idx.shape == (2, 30, 3) and idx.dtype == jnp.int32
    np.testing.assert_array_equal(
        np.asarray(qz.rvq_from_indices(idx, books, config)), np.asarray(qz.rvq(z, books, config))
    )
    # one stage is VQ
    one = qz.RVQConfig(stages=1, codebook_size=3, dim=2)
    vqc = qz.VQConfig(codebook_size=3, dim=2)
    np.testing.assert_array_equal(
        np.asarray(qz.rvq(z, CB[None], one)), np.asarray(qz.vq(z, CB, vqc))
    )


def test_rvq_losses_sum_the_stages():
    config = qz.RVQConfig(stages=2, codebook_size=4, dim=2, beta=0.5)
    books = jnp.asarray(_hierarchical_codebooks()[:2])
    z = jnp.asarray(_uniform(17, (8, 2), -11, 11))
    idx = np.asarray(qz.rvq_indices(z, books, config))
    q0 = np.asarray(books)[0][idx[:, 0]]
    q1 = np.asarray(books)[1][idx[:, 1]]
    r1 = np.asarray(z) - q0
    lc, lm = qz.rvq_losses(z, books, config)
    want = np.mean((np.asarray(z) - q0) ** 2) + np.mean((r1 - q1) ** 2)
    assert float(lc) == pytest.approx(want, rel=1e-5)
    assert float(lm) == pytest.approx(0.5 * want, rel=1e-5)
    gz = jax.grad(lambda z: qz.rvq_losses(z, books, config)[1])(z)
    want_gz = 0.5 * 2 * ((np.asarray(z) - q0) + (r1 - q1)) / z.size
    np.testing.assert_allclose(np.asarray(gz), want_gz, rtol=1e-5, atol=1e-6)


def test_rvq_ema_updates_each_stage_on_its_residuals():
    config = qz.RVQConfig(stages=2, codebook_size=4, dim=2, decay=0.5)
    books = _hierarchical_codebooks()[:2]
    z = _uniform(18, (12, 2), -11, 11)
    idx = qz.rvq_indices(z, books, config)
    new = qz.rvq_ema_update(qz.vq_ema_init(books), z, idx, config)
    vqc = qz.VQConfig(codebook_size=4, dim=2, decay=0.5)
    r1 = z - books[0][np.asarray(idx)[:, 0]]
    for s, x in ((0, z), (1, r1)):
        one = qz.vq_ema_update(qz.vq_ema_init(books[s]), x, idx[:, s], vqc)
        for key in one:
            np.testing.assert_allclose(np.asarray(new[key][s]), np.asarray(one[key]), rtol=1e-6)
    dead = dict(new, cluster_size=new["cluster_size"].at[1, 2].set(0.0))
    restarted = qz.rvq_restart_dead(dead, z, jax.random.key(2), config)
    changed = np.any(np.asarray(restarted["codebook"]) != np.asarray(new["codebook"]), axis=-1)
    np.testing.assert_array_equal(changed, [[False] * 4, [False, False, True, False]])


# ---------------------------------------------------------------------------------- utilisation


def test_perplexity_utilisation_and_bits():
    assert float(qz.code_perplexity(jnp.arange(8) % 4, 4)) == pytest.approx(4.0)
    assert float(qz.code_perplexity(jnp.full((10,), 3), 16)) == pytest.approx(1.0)
    # p = (1/2, 1/4, 1/4): exp(H) = 2^1.5; -1 (a NaN vector) and out-of-range are not counted
    got = qz.code_perplexity(jnp.array([0, 0, 1, 2, -1, 9]), 4)
    assert float(got) == pytest.approx(2**1.5, rel=1e-6)
    assert float(qz.code_perplexity(jnp.array([-1]), 4)) == 0.0
    assert float(qz.code_utilisation(jnp.arange(16), 32)) == pytest.approx(0.5)
    got = jax.jit(qz.code_perplexity, static_argnums=1)(jnp.arange(6), 6)
    assert float(got) == pytest.approx(6.0, rel=1e-6)
    assert qz.bits_per_vector(qz.FSQConfig(levels=(8, 5, 5, 5))) == pytest.approx(math.log2(1000))
    assert qz.bits_per_vector(qz.Q2D2Config(levels=(5, 5), lattice="hexagonal")) == pytest.approx(
        math.log2(23)
    )
    assert qz.bits_per_vector(qz.VQConfig(codebook_size=512, dim=64)) == 9.0
    assert qz.bits_per_vector(qz.RVQConfig(stages=4, codebook_size=256, dim=8)) == 32.0
    with pytest.raises(ValueError, match="config=.*allowed: an FSQConfig"):
        qz.bits_per_vector(qz.UniformConfig())


# ---------------------------------------------------------------------------------- families


def test_families_are_registered_and_describe_their_codes():
    fsq = ql.TensorQuant(kind="fsq", config=qz.FSQConfig(levels=(8, 5, 5, 5)))
    assert fsq.bits == 3 and fsq.codebook_size == 1000 and fsq.vector_dim == 4
    assert fsq.roles == ("act",) and not fsq.learnable and str(fsq) == "fsq1000/d4"
    q2 = ql.TensorQuant(kind="q2d2", config=qz.Q2D2Config(levels=(5, 5), lattice="hexagonal"))
    assert q2.codebook_size == 23 and q2.bits == 3 and str(q2) == "q2d2-hexagonal23/d2"
    vq = ql.TensorQuant(kind="vq", config=qz.VQConfig(codebook_size=512, dim=64, ema=False))
    assert vq.bits == 1 and vq.learnable and vq.codebook_size == 512
    rvq = ql.TensorQuant(kind="rvq", config=qz.RVQConfig(stages=2, codebook_size=16, dim=2))
    assert rvq.codebook_size == 256 and rvq.bits == 4 and str(rvq) == "rvq2x16/d2"
    assert set(rvq.stats_init(None)) == {"codebook", "cluster_size", "embed_sum"}
    with pytest.raises(ValueError, match="kind='vq' has no default config; allowed: VQConfig"):
        ql.TensorQuant(kind="vq")
    absmax = ql.TensorQuant(kind="absmax")
    assert absmax.codebook_size is None and absmax.vector_dim is None
    assert absmax.losses(jnp.ones((2, 2))) == {}
    with pytest.raises(qz.NotExportable, match="kind='absmax' has no code indices"):
        absmax.indices(jnp.ones((2, 2)))
    z = jnp.asarray(_uniform(19, (5, 2), -2, 2))
    for spec in (fsq, q2, rvq):
        x = z if spec.vector_dim == 2 else jnp.ones((5, 4))
        stats = spec.stats_init(None)
        idx = spec.indices(x, {}, stats)
        np.testing.assert_array_equal(
            np.asarray(spec.from_indices(idx, {}, stats)),
            np.asarray(spec.apply(x, {}, stats=stats)),
        )


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: qz.FSQConfig(levels=(1, 3)), r"levels=\(1, 3\) has 1 at position 0"),
        (lambda: qz.FSQConfig(levels=()), "levels=().*non-empty"),
        (lambda: qz.FSQConfig(levels=(2.0,)), "levels=.*allowed: integers >= 2"),
        (lambda: qz.FSQConfig(levels=(2,) * 31), "2147483648 codes; allowed: at most"),
        (lambda: qz.FSQConfig(eps=1.0), "eps=1.0 is out of range"),
        (lambda: qz.FSQConfig(bound=1), "bound=1 is not a bool"),
        (lambda: qz.Q2D2Config(levels=(3, 3, 3)), "odd number of channels"),
        (lambda: qz.Q2D2Config(lattice="hex"), "lattice='hex' is not allowed; allowed"),
        (
            lambda: qz.Q2D2Config(levels=(3, 5), lattice="hexagonal_upstream"),
            "L_x == L_y in every pair",
        ),
        (lambda: qz.VQConfig(codebook_size=1, dim=2), "codebook_size=1 is out of range"),
        (lambda: qz.VQConfig(codebook_size=4, dim=0), "dim=0 is out of range"),
        (lambda: qz.VQConfig(codebook_size=4, dim=2, decay=1.0), "decay=1.0 is out of range"),
        (lambda: qz.VQConfig(codebook_size=4, dim=2, epsilon=0.0), "epsilon=0.0 is not allowed"),
        (lambda: qz.VQConfig(codebook_size=4, dim=2, beta=-1), "beta=-1 is out of range"),
        (lambda: qz.VQConfig(codebook_size=4, dim=2, kmeans_iters=-1), "kmeans_iters=-1"),
        (lambda: qz.RVQConfig(stages=0, codebook_size=4, dim=2), "stages=0 is out of range"),
    ],
)
def test_bad_configs_raise_one_line_errors(make, field):
    with pytest.raises(ValueError, match=field) as info:
        make()
    assert "\n" not in str(info.value) and "allowed" in str(info.value)


def test_shape_and_dtype_errors():
    fsq = qz.FSQConfig(levels=(3, 3))
    with pytest.raises(ValueError, match=r"fsq: z.shape=\(2, 3\) has last axis 3; allowed: 2"):
        qz.fsq(jnp.ones((2, 3)), fsq)
    with pytest.raises(TypeError, match="floating"):
        qz.fsq(jnp.ones((2, 2), jnp.int32), fsq)
    with pytest.raises(TypeError, match="integer array"):
        qz.fsq_from_indices(jnp.ones((2,)), fsq)
    with pytest.raises(ValueError, match="last axis 3; allowed: 4"):
        qz.q2d2(jnp.ones((3,)), qz.Q2D2Config(levels=(3, 3, 3, 3)))
    vq = qz.VQConfig(codebook_size=3, dim=2)
    with pytest.raises(ValueError, match=r"codebook of shape \(3, 3\).*allowed: .*\(3, 2\)"):
        qz.vq(jnp.ones((4, 2)), jnp.ones((3, 3)), vq)
    with pytest.raises(ValueError, match="last axis 3; allowed: 2 \\(config.dim\\)"):
        qz.vq(jnp.ones((4, 3)), CB, vq)
    with pytest.raises(ValueError, match="state=.*allowed: a dict with keys"):
        qz.vq_ema_update({"codebook": CB}, jnp.ones((4, 2)), jnp.zeros((4,), jnp.int32), vq)
    with pytest.raises(ValueError, match="pair=1 is out of range; allowed: 0..0"):
        qz.q2d2_grid(qz.Q2D2Config(), 1)
    with pytest.raises(ValueError, match="init='lbg' is not allowed"):
        qz.kmeans_codebook(jnp.ones((4, 2)), 2, key=jax.random.key(0), init="lbg")
