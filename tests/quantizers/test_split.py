"""The split-learning compressor (Quantized-TinyLLaVA; METHODS.md §8): forward values against
the formula, codes and decoding, edge values, the straight-through gradient and the alignment
loss against its formula, jit/vmap, the byte count against the packed payload, the entropy
of the codes and the choice of K."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from qflax import quantizers as qz
from qflax.layers import TensorQuant
from qflax.numerics import pack_bits
from qflax.quantizers import NotExportable, SplitConfig, get_family

KEY = jax.random.key(0)


def reference(x, levels, c=3.0, side=np.float16):
    """The METHODS.md formula in numpy, per sample (float64 after rounding μ, σ to ``side``)."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    for b in range(x.shape[0]):
        mu = float(np.float32(side(np.mean(x[b]))))
        sigma = float(np.float32(side(np.std(x[b]))))
        r = c * sigma
        u = np.clip((x[b] - mu) / r, -1, 1) if r > 0 else np.zeros_like(x[b])
        q = np.round((u + 1) / 2 * (levels - 1))
        out[b] = mu + r * (2 * q / (levels - 1) - 1)
    return out


@pytest.mark.parametrize("levels", [2, 3, 4, 16, 255])
def test_forward_matches_the_formula(levels):
    x = jax.random.normal(KEY, (5, 3, 7)) * jnp.arange(1.0, 6.0)[:, None, None] + 2.0
    out = qz.split_quantize(x, SplitConfig(levels=levels))
    np.testing.assert_allclose(out, reference(x, levels), rtol=1e-5, atol=1e-5)
    assert out.dtype == x.dtype and out.shape == x.shape
    # every sample takes at most K values, inside μ ± 3σ
    for b in range(5):
        assert len(np.unique(np.asarray(out[b]))) <= levels


def test_golden_values_and_exact_decoding():
    # μ = 0, σ = 1, r = 3: u = ±1/3 sits exactly on the levels −1 and +1 of K = 4
    x = jnp.array([[-1.0, 1.0, -1.0, 1.0]])
    config = SplitConfig(levels=4)
    np.testing.assert_array_equal(qz.split_quantize(x, config), x)
    codes, mu, sigma = qz.split_codes(x, config)
    np.testing.assert_array_equal(codes, [[1, 2, 1, 2]])
    assert mu.dtype == jnp.float16 and float(mu[0]) == 0.0 and float(sigma[0]) == 1.0
    # decoding what was sent gives the sender's x̂ exactly (μ, σ rounded to float16 first)
    y = jax.random.normal(KEY, (4, 2, 9)) * 3.3 + 0.1
    for levels in (2, 5, 64):
        config = SplitConfig(levels=levels)
        q, m, s = qz.split_codes(y, config)
        assert int(q.min()) >= 0 and int(q.max()) <= levels - 1 and q.dtype == jnp.int32
        np.testing.assert_array_equal(
            qz.split_decode(q, m, s, config), qz.split_quantize(y, config)
        )


def test_ties_round_half_to_even():
    # K = 2 (levels μ ± r): u = 0 is the tie (u + 1)/2 = 0.5 → code 0 (half to even).
    x = jnp.array([[0.0, 3.0, -3.0]])  # μ = 0; u = 0 for the first element
    codes, _, _ = qz.split_codes(x, SplitConfig(levels=2))
    assert int(codes[0, 0]) == 0
    # K = 3, c = 2, x = [1, −1] (μ = 0, σ = 1): u = ±1/2 give u + 1 = 1.5, 0.5 → 2 and 0 (even)
    codes, _, _ = qz.split_codes(jnp.array([[1.0, -1.0]]), SplitConfig(levels=3, clip_sigmas=2.0))
    np.testing.assert_array_equal(codes, [[2, 0]])


def test_bounds_clip_and_the_constant_sample():
    x = jnp.concatenate([jnp.zeros((1, 99)), jnp.full((1, 1), 1000.0)], axis=1)
    config = SplitConfig(levels=8)
    out = np.asarray(qz.split_quantize(x, config))
    mu, sigma = float(jnp.mean(x)), float(jnp.std(x))
    # the outlier is clipped to μ + 3σ (the top level)
    assert out[0, -1] == pytest.approx(np.float16(mu) + 3 * np.float16(sigma), rel=1e-3)
    # a constant sample (σ = 0) decodes to its mean; zeros to zeros
    const = jnp.full((2, 5), 7.25)
    np.testing.assert_array_equal(qz.split_quantize(const, config), const)
    np.testing.assert_array_equal(qz.split_quantize(jnp.zeros((1, 4)), config), 0.0)


def test_huge_subnormal_and_non_finite():
    config = SplitConfig(levels=4)
    # float16 side information saturates at 65504: a sample beyond it decodes to non-finite,
    # float32 side information carries it
    big = jax.random.normal(KEY, (2, 16)) * 1e6
    assert not np.isfinite(np.asarray(qz.split_quantize(big, config))).all()
    wide = SplitConfig(levels=4, side_dtype="float32")
    np.testing.assert_allclose(
        qz.split_quantize(big, wide), reference(big, 4, side=np.float32), rtol=1e-4
    )
    huge = jnp.array([[1e18, -1e18, 1e18, -1e18]])
    np.testing.assert_allclose(qz.split_quantize(huge, wide), huge, rtol=1e-5)
    # subnormal inputs (flushed to zero on XLA:CPU): finite, within a subnormal of the input
    tiny = jnp.array([[1e-40, -1e-40, 2e-40, 0.0]], jnp.float32)
    out = np.asarray(qz.split_quantize(tiny, config))
    assert np.isfinite(out).all() and np.abs(out - np.asarray(tiny)).max() <= 3e-40
    # NaN / inf poison only their own sample
    x = jax.random.normal(KEY, (3, 6))
    for bad in (jnp.nan, jnp.inf):
        out = np.asarray(qz.split_quantize(x.at[1, 2].set(bad), config))
        assert np.isnan(out[1]).all()
        np.testing.assert_array_equal(out[[0, 2]], np.asarray(qz.split_quantize(x, config))[[0, 2]])
    codes, _, _ = qz.split_codes(x.at[1, 2].set(jnp.nan), config)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 3


def test_gradient_is_straight_through():
    x = jax.random.normal(KEY, (3, 8))
    w = jax.random.normal(jax.random.key(1), (3, 8))
    grad = jax.grad(lambda v: jnp.sum(w * qz.split_quantize(v, SplitConfig(levels=4))))(x)
    np.testing.assert_array_equal(grad, w)


def test_alignment_loss_matches_its_formula_and_gradient():
    a = jax.random.normal(KEY, (4, 6))
    b = qz.split_quantize(a, SplitConfig(levels=4))
    loss = qz.split_alignment_loss(a, b, 0.25)
    an, bn = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = (an * bn).sum(1) / np.linalg.norm(an, axis=1) / np.linalg.norm(bn, axis=1)
    assert float(loss) == pytest.approx(0.25 * np.mean(1 - cos), rel=1e-5)
    grad = np.asarray(jax.grad(lambda v: qz.split_alignment_loss(v, b, 0.25))(a), np.float64)
    na, nb = np.linalg.norm(an, axis=1, keepdims=True), np.linalg.norm(bn, axis=1, keepdims=True)
    dot = (an * bn).sum(1, keepdims=True)
    expected = -0.25 / 4 * (bn / (na * nb) - dot * an / (na**3 * nb))
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)
    # x̂ gets no gradient (stop-gradient), and the loss is smooth in x
    assert not np.any(np.asarray(jax.grad(lambda v: qz.split_alignment_loss(a, v))(b)))
    check_grads(lambda v: qz.split_alignment_loss(v, b), (a,), order=1, modes=("rev",))
    assert float(qz.split_alignment_loss(a, a)) == pytest.approx(0.0, abs=1e-6)


def test_jit_and_vmap_agree_with_eager():
    x = jax.random.normal(KEY, (2, 5, 7))
    config = SplitConfig(levels=16)
    eager = qz.split_quantize(x, config)
    # (compiled reductions may differ from eager ones in the last bit of μ and σ)
    jitted = jax.jit(qz.split_quantize, static_argnums=1)(x, config)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)
    groups = jnp.stack([x, 2 * x + 1])  # vmap over groups of batches
    mapped = jax.vmap(lambda v: qz.split_quantize(v, config))(groups)
    for i in range(2):
        np.testing.assert_allclose(
            mapped[i], qz.split_quantize(groups[i], config), rtol=1e-6, atol=1e-6
        )
    codes = jax.jit(lambda v: qz.split_codes(v, config)[0])(x)
    np.testing.assert_array_equal(codes, qz.split_codes(x, config)[0])


@pytest.mark.parametrize(("levels", "bits"), [(2, 1), (3, 2), (4, 2), (16, 4), (200, 8)])
def test_payload_bytes_equal_the_packed_codes_and_side_information(levels, bits):
    config = SplitConfig(levels=levels)
    assert config.bits == bits
    x = jax.random.normal(KEY, (3, 7, 7, 5))
    codes, mu, sigma = qz.split_codes(x, config)
    width = {1: 1, 2: 2, 4: 4, 8: 8}[bits]
    sent = pack_bits(codes[0], width).size + mu[:1].nbytes + sigma[:1].nbytes
    assert qz.split_payload_bytes(7 * 7 * 5, config) == sent
    spec = TensorQuant(kind="split", config=config)
    assert get_family("split").payload_bytes(spec, (7, 7, 5)) == sent
    # against 16-bit floats: 2-bit codes send 1/8 of the values' bytes plus 4 bytes of μ, σ
    if levels == 4:
        assert sent == math.ceil(245 * 2 / 8) + 4


def test_entropy_and_the_choice_of_levels():
    assert qz.code_entropy(jnp.array([0, 1, 2, 3]), 4) == pytest.approx(2.0)
    assert qz.code_entropy(jnp.zeros(10, jnp.int32), 4) == 0.0
    x = jax.random.normal(KEY, (64, 256))
    chosen, table = qz.choose_levels(x, (4, 8, 16, 32, 64, 128, 256))
    # Gaussian at μ ± 3σ: each doubling buys ~6 dB per bit until the clipping error dominates
    gains = [
        (table[h]["sqnr_db"] - table[lo]["sqnr_db"]) / (table[h]["entropy"] - table[lo]["entropy"])
        for lo, h in zip(list(table), list(table)[1:], strict=False)
    ]
    assert 5.0 < gains[1] < 7.5 and gains[-1] < 3.0
    assert chosen in table and all(g >= 3.0 for g in gains[: list(table).index(chosen)]), (
        chosen,
        gains,
    )
    for k, row in table.items():
        assert 0 < row["entropy"] <= math.log2(k) + 1e-9
    with pytest.raises(ValueError, match="candidates=.*increasing distinct"):
        qz.choose_levels(x, (8, 4))


def test_family_losses_indices_and_errors():
    family = get_family("split")
    spec = TensorQuant(kind="split", config=SplitConfig(levels=4))
    x = jax.random.normal(KEY, (3, 10))
    losses = family.losses(spec, x, {}, {})
    assert set(losses) == {"align"}
    np.testing.assert_allclose(
        losses["align"], qz.split_alignment_loss(x, qz.split_quantize(x, spec.config)), rtol=1e-6
    )
    silent = TensorQuant(kind="split", config=SplitConfig(levels=4, align_weight=0.0))
    assert family.losses(silent, x, {}, {}) == {}
    np.testing.assert_array_equal(
        family.indices(spec, x, {}, {}), qz.split_codes(x, spec.config)[0]
    )
    assert (family.codebook_size(spec), family.bits(spec), family.describe(spec)) == (
        4,
        2,
        "split4",
    )
    with pytest.raises(NotExportable, match="split_decode"):
        family.from_indices(spec, jnp.zeros((3, 10), jnp.int32), {}, {})
    with pytest.raises(ValueError, match="per-sample axes"):
        qz.split_quantize(jnp.ones(4), spec.config)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"levels": 1}, "levels=1 is not allowed; allowed: an int 2..65536"),
        ({"levels": 4.0}, "levels=4.0 is not allowed"),
        ({"levels": 70000}, "levels=70000"),
        ({"clip_sigmas": 0.0}, "clip_sigmas=0.0 is not allowed; allowed: a float > 0"),
        ({"clip_sigmas": float("nan")}, "clip_sigmas=nan"),
        ({"align_weight": -1.0}, "align_weight=-1.0 is not allowed; allowed: a float >= 0"),
        ({"side_dtype": "int8"}, "side_dtype='int8' is not allowed; allowed: 'float16'"),
    ],
)
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SplitConfig(**kwargs)
