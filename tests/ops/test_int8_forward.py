"""``forward_dtype="int8"``: the forward product on int8 codes (qflax.ops), the families' int8
scales, and training with it equal to fake-quant training up to float rounding (issue 19)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qflax import layers as ql
from qflax import ops
from qflax import quantizers as qz

DN = (((1,), (0,)), ((), ()))


def absmax(bits: int, axis=None):
    """``(quantizer, scale)`` of symmetric absmax codes per tensor (or along ``axis``)."""
    top = 2 ** (bits - 1) - 1

    def scale(x):
        keep = () if axis is None else tuple(a for a in range(x.ndim) if a != axis % x.ndim)
        red = tuple(range(x.ndim)) if axis is None else keep
        return jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=red, keepdims=True) / top)

    def quantize(x):
        s = scale(x)
        return x + jax.lax.stop_gradient(jnp.clip(jnp.round(x / s), -top, top) * s - x)

    return quantize, scale


def slots(lhs_bits=8, rhs_bits=4, rhs_axis=-1):
    ql_, ls = absmax(lhs_bits)
    qr, rs = absmax(rhs_bits, rhs_axis)
    return ops.int8_operand(ql_, ls), ops.int8_operand(qr, rs)


def operands(lhs_shape=(16, 64), rhs_shape=(64, 32), seed=0):
    kl, kr = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kl, lhs_shape), jax.random.normal(kr, rhs_shape)


# ------------------------------------------------------------------------------------ the op


@pytest.mark.parametrize("op_name", ["dot", "einsum"])
def test_int8_forward_equals_the_fake_quant_product(op_name):
    lhs, rhs = operands()
    a, w = slots()

    def run(fd):
        if op_name == "dot":
            return ops.quantized_dot_general(
                lhs, rhs, DN, lhs_quantizer=a, rhs_quantizer=w, forward_dtype=fd
            )
        return ops.quantized_einsum(
            "bd,dh->bh", lhs, rhs, lhs_quantizer=a, rhs_quantizer=w, forward_dtype=fd
        )

    ref, out = run("float32"), jax.jit(lambda: run("int8"))()
    assert out.dtype == ref.dtype == jnp.float32 and out.shape == ref.shape
    # Exact integer sums, rescaled once, against float sums of 64 products: float rounding only.
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6 * float(jnp.abs(ref).max()))
    # ... and the int product is exact: codes times the scales, summed in float64.
    cl = np.round(np.asarray(a(lhs)) / np.asarray(a.scale(lhs)))
    cr = np.round(np.asarray(w(rhs)) / np.asarray(w.scale(rhs)))
    exact = (cl @ cr) * np.asarray(a.scale(lhs)) * np.asarray(w.scale(rhs))
    np.testing.assert_allclose(out, exact, rtol=1e-6, atol=0)


def test_int8_forward_runs_an_int8_product_with_int32_accumulation():
    lhs, rhs = operands()
    a, w = slots()
    f = lambda x, y: ops.quantized_dot_general(
        x, y, DN, lhs_quantizer=a, rhs_quantizer=w, forward_dtype="int8"
    )
    jaxpr = jax.make_jaxpr(f)(lhs, rhs)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "custom_vjp_call"]
    assert dots, "the int8 product is one custom_vjp"
    text = str(jaxpr)
    assert "i8[16,64]" in text and "i8[64,32]" in text
    assert "preferred_element_type=int32" in text
    # The float path has no int8 at all.
    g = lambda x, y: ops.quantized_dot_general(x, y, DN, lhs_quantizer=a, rhs_quantizer=w)
    assert "i8[" not in str(jax.make_jaxpr(g)(lhs, rhs))


@pytest.mark.parametrize("op_name", ["dot", "einsum"])
def test_int8_backward_is_the_float_backward(op_name):
    """For one output cotangent, both operands' gradients are those of the float product at the
    quantized operands, bit for bit (the backward never sees the codes)."""
    lhs, rhs = operands()
    a, w = slots()

    def run(x, y, fd):
        if op_name == "dot":
            return ops.quantized_dot_general(
                x, y, DN, lhs_quantizer=a, rhs_quantizer=w, forward_dtype=fd
            )
        return ops.quantized_einsum(
            "bd,dh->bh", x, y, lhs_quantizer=a, rhs_quantizer=w, forward_dtype=fd
        )

    g = jax.random.normal(jax.random.key(3), (16, 32))
    _, vjp_f = jax.vjp(lambda x, y: run(x, y, "float32"), lhs, rhs)
    _, vjp_i = jax.vjp(lambda x, y: run(x, y, "int8"), lhs, rhs)
    for want, got in zip(vjp_f(g), vjp_i(g), strict=True):
        np.testing.assert_array_equal(got, want)


def test_int8_forward_with_a_gradient_quantizer():
    lhs, rhs = operands()
    a, w = slots()
    gq = lambda g: jnp.round(g * 4) / 4

    def run(x, y, fd):
        return ops.quantized_dot_general(
            x, y, DN, lhs_quantizer=a, rhs_quantizer=w, grad_quantizer=gq, forward_dtype=fd
        )

    g = jax.random.normal(jax.random.key(3), (16, 32))
    out_f, vjp_f = jax.vjp(lambda x, y: run(x, y, None), lhs, rhs)
    out_i, vjp_i = jax.vjp(lambda x, y: run(x, y, "int8"), lhs, rhs)
    np.testing.assert_allclose(out_i, out_f, atol=2e-6 * float(jnp.abs(out_f).max()))
    for want, got in zip(vjp_f(g), vjp_i(g), strict=True):
        np.testing.assert_array_equal(got, want)


def test_einsum_kernel_scale_on_a_kept_axis_and_batch_labels():
    """Attention-style projection: the kernel's scale per (head, feature), activations per
    tensor; a shared batch label (``n``) on both operands."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 32))
    k = jax.random.normal(jax.random.key(1), (32, 4, 16))
    a, _ = slots()
    qk, sk = absmax(4, axis=-1)
    w = ops.int8_operand(qk, sk)
    run = lambda fd, s="btd,dnh->btnh": ops.quantized_einsum(
        s, x, k, lhs_quantizer=a, rhs_quantizer=w, forward_dtype=fd
    )
    ref = run(None)
    np.testing.assert_allclose(run("int8"), ref, atol=2e-6 * float(jnp.abs(ref).max()))
    q = jax.random.normal(jax.random.key(2), (4, 8, 16))
    kk = jax.random.normal(jax.random.key(3), (4, 16, 8))
    qs, ss = absmax(8, axis=0)  # per batch entry n: constant along the contracted h
    run2 = lambda fd: ops.quantized_einsum(
        "nth,nhs->nts",
        q,
        kk,
        lhs_quantizer=ops.int8_operand(qs, ss),
        rhs_quantizer=ops.int8_operand(qs, ss),
        forward_dtype=fd,
    )
    ref2 = run2(None)
    np.testing.assert_allclose(run2("int8"), ref2, atol=2e-6 * float(jnp.abs(ref2).max()))


def test_zero_tensor_and_non_finite_values():
    lhs, rhs = operands()
    a, w = slots()
    zero = ops.quantized_dot_general(
        jnp.zeros_like(lhs), rhs, DN, lhs_quantizer=a, rhs_quantizer=w, forward_dtype="int8"
    )
    np.testing.assert_array_equal(zero, 0.0)  # scale 0: codes 0, not NaN
    # A NaN in the tensor makes absmax's scale NaN: the output is NaN as in the float path.
    bad = lhs.at[0, 0].set(jnp.nan)
    out = ops.quantized_dot_general(
        bad, rhs, DN, lhs_quantizer=a, rhs_quantizer=w, forward_dtype="int8"
    )
    assert np.isnan(np.asarray(out)).all()
    # With a fixed (learned) scale the NaN element has code 0 (integers hold no NaN); the
    # backward is float, so the gradient carries the NaN to the loop's non-finite check.
    fixed = ops.int8_operand(lambda x: jnp.round(x * 16) / 16, lambda x: jnp.float32(1 / 16))

    def loss(x, k):
        y = ops.quantized_dot_general(
            x, k, DN, lhs_quantizer=fixed, rhs_quantizer=w, forward_dtype="int8"
        )
        return jnp.sum(y * y)

    assert np.isfinite(float(loss(bad, rhs)))
    assert np.isnan(np.asarray(jax.grad(loss, argnums=1)(bad, rhs))).any()
    # Huge values saturate to the code range instead of wrapping around.
    big = ops.int8_operand(lambda x: x, lambda x: jnp.float32(1.0))
    y = ops.quantized_dot_general(
        jnp.full((1, 1), 1e30), jnp.ones((1, 1)), DN, lhs_quantizer=big,
        rhs_quantizer=big, forward_dtype="int8",
    )  # fmt: skip
    assert float(y[0, 0]) == 127.0


def test_bad_int8_inputs_raise_before_work():
    lhs, rhs = operands()
    a, w = slots()
    plain = lambda x: x
    with pytest.raises(ValueError, match=r"forward_dtype='int4' is not allowed; allowed"):
        ops.quantized_dot_general(lhs, rhs, DN, lhs_quantizer=a, rhs_quantizer=w,
                                  forward_dtype="int4")  # fmt: skip
    with pytest.raises(ValueError, match=r"rhs_quantizer=.* is not an int8 operand"):
        ops.quantized_dot_general(lhs, rhs, DN, lhs_quantizer=a, rhs_quantizer=plain,
                                  forward_dtype="int8")  # fmt: skip
    # A scale that varies along the contracted axis cannot be taken out of the sum.
    q_in, s_in = absmax(4, axis=0)  # per input row of the kernel: contracted
    with pytest.raises(ValueError, match=r"varies along the contracted axes \[0\]"):
        ops.quantized_dot_general(lhs, rhs, DN, lhs_quantizer=a,
                                  rhs_quantizer=ops.int8_operand(q_in, s_in),
                                  forward_dtype="int8")  # fmt: skip
    with pytest.raises(ValueError, match=r"ellipsis"):
        ops.quantized_einsum("...d,dh->...h", lhs, rhs, lhs_quantizer=a, rhs_quantizer=w,
                             forward_dtype="int8")  # fmt: skip
    with pytest.raises(ValueError, match=r"scale returned shape \(1, 3\)"):
        ops.quantized_dot_general(lhs, rhs, DN, lhs_quantizer=a,
                                  rhs_quantizer=ops.int8_operand(plain, lambda x: jnp.ones(3)),
                                  forward_dtype="int8")  # fmt: skip
    with pytest.raises(ValueError, match=r"is not callable"):
        ops.int8_operand(plain, 0.5)


def test_vmap_of_the_int8_product():
    lhs, rhs = operands(lhs_shape=(3, 16, 64))
    a, w = slots()
    f = lambda x, fd: ops.quantized_dot_general(
        x, rhs, DN, lhs_quantizer=a, rhs_quantizer=w, forward_dtype=fd
    )
    got = jax.vmap(lambda x: f(x, "int8"))(lhs)
    want = jax.vmap(lambda x: f(x, None))(lhs)
    np.testing.assert_allclose(got, want, atol=2e-6 * float(jnp.abs(want).max()))


# ------------------------------------------------------------------------------------ families

FAMILY_SPECS = {
    "absmax8/tensor": ql.TensorQuant(kind="absmax", config=qz.UniformConfig(bits=8)),
    "absmax4/channel": ql.TensorQuant(
        kind="absmax", config=qz.UniformConfig(bits=4, granularity="channel")
    ),
    "learned_step4": ql.TensorQuant(
        kind="learned_step", config=qz.UniformConfig(bits=4, learn_scale=True)
    ),
    "lsq8": ql.TensorQuant(kind="lsq", config=qz.LSQConfig(bits=8)),
    "lsq7/unsigned": ql.TensorQuant(kind="lsq", config=qz.LSQConfig(bits=7, signed=False)),
    "pact4": ql.TensorQuant(kind="pact", config=qz.PACTConfig(bits=4)),
    "dorefa4/weight": ql.TensorQuant(kind="dorefa", config=qz.DoReFaConfig(bits=4)),
    "dorefa1/weight": ql.TensorQuant(kind="dorefa", config=qz.DoReFaConfig(bits=1)),
    "dorefa4/act": ql.TensorQuant(kind="dorefa", config=qz.DoReFaConfig(bits=4, role="act")),
    "binary/channel": ql.TensorQuant(kind="binary", config=qz.BinaryConfig(scaling="channel")),
    "binary/none": ql.TensorQuant(kind="binary", config=qz.BinaryConfig()),
    "ternary": ql.TensorQuant(kind="ternary", config=qz.TernaryConfig(scaling="channel")),
    "pair:bnn": ql.recipes.binary(pair="bnn").weight,
    "pair:multibit3": ql.recipes.binary(pair="multibit", bits=3).weight,
}


@pytest.mark.parametrize("name", list(FAMILY_SPECS))
def test_family_values_are_int8_codes_at_their_scale(name):
    """``apply(x) = s·c`` with integer ``c`` in [−128, 127]: on normal values, ties, zeros,
    huge values and subnormals."""
    spec = FAMILY_SPECS[name]
    spec.check_int8()
    x = jax.random.normal(jax.random.key(0), (64, 8)) * 3.0
    x = x.at[0, :].set(0.0).at[1, 0].set(1e30).at[2, 0].set(-1e30).at[3, 0].set(1e-40)
    x = x.at[4, 0].set(0.5).at[5, 0].set(-2.5)
    params = spec.init(x)
    key = jax.random.key(1) if spec.needs_key else None
    stats = spec.stats_init(x)
    y = np.asarray(spec.apply(x, params, key=key, stats=stats), np.float64)
    s = np.broadcast_to(np.asarray(spec.int8_scale(x, params, stats), np.float64), y.shape)
    codes = np.round(y / np.where(s > 0, s, 1.0))
    assert codes.min() >= -128 and codes.max() <= 127
    # Within a few ulps of s·c (DoReFa's 2c/n − 1 and PACT's c·α/n round on the way): far
    # inside half a step, so the codes are recovered exactly.
    assert np.all(np.abs(codes * s - y) <= 1e-5 * s)
    # The scale gets no gradient (the quantizer's own VJP differentiates its params).
    if params:
        g = jax.grad(lambda p: jnp.sum(spec.int8_scale(x, p, stats)))(params)
        assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree.leaves(g))


@pytest.mark.parametrize(
    "spec, reason",
    [
        (ql.TensorQuant(kind="absmax", config=qz.UniformConfig(bits=8, symmetric=False)),
         "symmetric=False"),
        (ql.TensorQuant(kind="lsq", config=qz.LSQConfig(bits=8, signed=False)), r"\[-0, 255\]"),
        (ql.TensorQuant(kind="pact", config=qz.PACTConfig(bits=8)), "bits <= 7"),
        (ql.recipes.binary(pair="bnn++").weight, "relaxed"),
        (ql.recipes.gdnsq(4, 4).weight, "kind='gdnsq' defines no int8 operand"),
    ],
)  # fmt: skip
def test_families_without_int8_codes_say_why(spec, reason):
    with pytest.raises(ValueError, match=reason):
        spec.check_int8()
    with pytest.raises(ValueError, match=r"forward_dtype='int8' with"):
        ql.Recipe(weight=spec if "weight" in spec.roles else None,
                  act=spec if "act" in spec.roles else FAMILY_SPECS["absmax8/tensor"],
                  forward_dtype="int8")  # fmt: skip


def test_recipe_forward_dtype_field_and_build():
    r = ql.recipes.build("absmax", weight_bits=4, act_bits=8, forward_dtype="int8")
    assert r.forward_dtype == "int8" and str(r) == "w:absmax4/channel a:absmax8 fwd:int8"
    assert ql.recipes.build("absmax").forward_dtype == "float32"
    with pytest.raises(ValueError, match=r"forward_dtype='int16' is not allowed"):
        ql.recipes.build("absmax", forward_dtype="int16")
    with pytest.raises(ValueError, match=r"both the weights and the input activations"):
        ql.recipes.build("absmax", act_bits=None, forward_dtype="int8")
    assert "forward_dtype" in ql.RECIPE_KEYWORDS
    # A spec as an int8 slot of the ops (what researchers pass to qflax.ops directly).
    spec = FAMILY_SPECS["learned_step4"]
    x = jax.random.normal(jax.random.key(0), (8, 16))
    params = spec.init(x)
    slot = spec.int8_quantizer(params)
    assert isinstance(slot, ops.Int8Operand)
    np.testing.assert_array_equal(slot(x), spec.apply(x, params))
    np.testing.assert_array_equal(slot.scale(x), spec.int8_scale(x, params))


# ------------------------------------------------------------------------------------ training

RECIPES = {
    "absmax W8A8": lambda fd: ql.recipes.build("absmax", forward_dtype=fd),
    "learned_step W4A4": lambda fd: ql.recipes.build(
        "learned_step", weight_bits=4, act_bits=4, forward_dtype=fd
    ),
    "lsq W4A4": lambda fd: ql.recipes.build("lsq", weight_bits=4, act_bits=4, forward_dtype=fd),
    "pact W4A4": lambda fd: ql.recipes.build("pact", weight_bits=4, act_bits=4, forward_dtype=fd),
    "bnn W1A1": lambda fd: ql.recipes.build("binary", pair="bnn", forward_dtype=fd),
}


def _model(recipe):
    from qflax import models

    model = models.build_model(
        "mlp", input_shape=(6, 6, 1), num_classes=5, hidden=(32, 32, 32), rngs=nnx.Rngs(0)
    )
    # Random biases: with zero biases a pre-activation whose integer sum is exactly 0 is exactly
    # 0 in the int8 forward (the true value) but ±1e-7 in float, and ReLU's gradient at 0 is 0:
    # a tie of the float path's rounding, not a difference of the int8 product.
    keys = iter(jax.random.split(jax.random.key(11), 8))
    for layer in (model.stem, *model.blocks, model.head):
        layer.bias[...] = 0.1 * jax.random.normal(next(keys), layer.bias.shape)
    return ql.quantize_model(model, ql.first_last_float_rules(recipe), copy=False)[0]


def _train(model, steps=4):
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (16, 6, 6, 1))
    y = jax.random.randint(ky, (16,), 0, 5)
    opt = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            logits = m(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(steps)]
    return losses, nnx.state(model, nnx.Param)


@pytest.mark.parametrize("name", list(RECIPES))
def test_int8_training_equals_fake_quant_training(name):
    """The same training (init, calibration, data, optimizer) with the forward on int8 codes:
    every step's loss and the final parameters equal the fake-quant run up to float rounding.

    Both start from one calibrated state (calibrated on another batch: calibration puts the
    largest input exactly on the clipping bound, where a last-ulp difference of the previous
    layer's output changes the learned scale's gradient — a tie any change of summation order
    breaks, not a property of the int8 product)."""
    make = RECIPES[name]
    ref_model, model = _model(make("float32")), _model(make("int8"))
    ql.calibrate(ref_model, jax.random.normal(jax.random.key(7), (16, 6, 6, 1)))
    nnx.update(model, nnx.state(ref_model))
    assert all(b.int8_forward for b in model.blocks)
    assert not any(b.int8_forward for b in ref_model.blocks)
    ref_losses, ref_params = _train(ref_model)
    losses, params = _train(model)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for want, got in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_conv_layers_keep_the_float_product():
    recipe = ql.recipes.build("absmax", forward_dtype="int8")
    conv = ql.QuantConv.from_module(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)), recipe)
    dense = ql.QuantLinear.from_module(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), recipe)
    assert not conv.int8_forward and dense.int8_forward
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
    ref = ql.QuantConv.from_module(
        nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)), ql.recipes.build("absmax")
    )
    np.testing.assert_array_equal(conv(x), ref(x))
