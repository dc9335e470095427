"""Integer inference — Jacob et al. 2018 (CVPR), eqs. (4)-(7): int8×int8 → int32 accumulate, int32
bias at scale ``s_in·s_w``, requantize with ``M = s_in·s_w/s_out = M0·2^−n`` (``M0`` in [0.5, 1) as
a 31-bit integer) (METHODS.md §1). Differs: input codes have no zero point (ReLU is ``max(q, 0)``
and padding is code 0); a weight zero point (GDNSQ's ``−min w/s``, not an integer) enters as the
paper's ``Σx`` term with a fixed-point coefficient (below); per-output-channel weight scales (so
``M`` is per channel); BatchNorm folded after weight quantization into ``M`` and the bias (the codes
stay the trained model's); the accumulator may be shifted left before the bias is added (the bias
keeps more fractional bits; ``bias_shift=0`` is the paper's); the rounding right shift rounds half
to even (the float reference's ``round``), not half away from zero as gemmlowp; the last layer is
requantized to a common int32 scale so that argmax over its int32 logits is the prediction; float
layers (a float first/last layer) run in float32, with the conversion to codes (``round(y/s)``, the
next layer's activation scale) and back (``acc·s_in·s_w``) at the boundaries. Hidden activations:
ReLU (``max(q, 0)``) or hardtanh (the codes clipped to ``[round(−1/s_out), round(1/s_out)]``, which
is ``round(clip(y, −1, 1)/s_out)`` exactly since rounding is monotone); other activations raise
ValueError.

Power-of-two weights (METHODS.md §5's shift levels; the ``pow2`` quantizer, codes of
:func:`qflax.quantizers.pow2_codes`) run without a weight multiply: the codes of a layer are
``±s_c·2^−k`` (or 0); with ``K`` the largest exponent the layer uses, ``ŵ = s_c·2^−K·w`` with
the integer ``w = ±2^(K−k)``, and ``x·w = Σ_k (x·m_k) << (K − k)`` where ``m_k`` is the ternary
``{−1, 0, +1}`` mask of the weights with exponent ``k``: one int8 × ternary product per exponent
in use (int32 accumulation) and left shifts combine them. ``s_c·2^−K`` is the weight scale of
the requantization multiplier, as for uniform weights. The result equals the int32 product with
``w`` exactly (``export_integer(..., shifts=False)`` builds that one-kernel program).

Binary layers (METHODS.md §9; weights AND inputs ±1: the ``binary`` quantizer or a ProxConnect++
pair whose forward is ``sign``: ``bc``, ``bnn``, ``bnn+``, ``approx_sign``; weights scaled per
output channel or per tensor by ``α = mean|w|``, or not at all) run as XNOR/popcount: the input
signs are bits (1 ↔ +1) packed 32 per uint32 word along the reduction axis (convolutions build
their patches first, im2col, in the kernel's ``(kh, kw, c_in)`` order), the weight signs too, and
``dot = n − 2·popcount(x XOR w)`` (``jax.lax.population_count``, int32) is the ±1 product.
SAME padding: the float model pads the ±1 input with 0, which is neither sign. Padded taps get
the bit 0, so ``popcount(x XOR w)`` counts the weight bits there; the exact product over the
valid taps is ``dot = n_valid + 2·popcount(w AND NOT valid) − 2·popcount(x XOR w)`` with
``valid`` the packed mask of the taps inside the image at that output position. The offset
``n_valid + 2·popcount(w AND NOT valid)`` depends only on the output position and channel (not
on the batch), so it is computed once per call; the tail bits of the last word are 0 in ``x``,
``w`` and ``valid`` and count nowhere. BNN++ (forward ``SignSwish_μ``, values strictly inside
(−1, 1) for every finite μ), ProxConnect (``prox``) and ProxQuant (``identity``) forwards are
not signs: in their relaxed state they have no bits, and integer inference refuses them; a
finished run ends them in their exact state (the ``hard`` stat set: forward ``sign``), which
runs as XNOR/popcount like the sign pairs.

Ternary weights (TWN, ``{−α, 0, α}``, α per tensor or per output channel) with uniform inputs
are a uniform layer whose int8 weight codes are ``{−1, 0, 1}`` at the scale α.

Learned uniform quantizers: LSQ (step), PACT (inputs ``α/(2^b − 1)``, DoReFa weights), DoReFa
(weights ``2c/n − 1``: the integer codes ``2c − n`` at ``1/n``; inputs ``1/n``) and GDNSQ (inputs
``2^ℓ_s`` with the lower bound β = 0; weights ``s·(v − zp)`` per channel): their learned scales
are static, so the reference is the model itself. A weight zero point that is not a multiple of
½ runs as ``2^k·(x·(v − zi)) + R·Σx`` (:mod:`._weights`).

Dead-zone weights (CoDeQ, METHODS.md §6: ``ŵ = s·v + z·sign(v)``, codes ``|v| ≤ 2^(B−1) − 1``,
step ``s`` and dead-zone shift ``z`` per tensor) with uniform inputs: ``x·ŵ = s·(x·v) +
z·(x·sign v)``, two int8 products combined in int32 at the unit ``s·2^−k`` as ``2^k·(x·v) +
round(z/s·2^k)·(x·sign v)`` (:mod:`._weights`), then requantized as a uniform layer.

After a binary layer the float model computes ``h = act(BN(α·dot + b))``, max-pools it and, when
the next layer is binary too, takes ``sign`` (``sign(0) = +1``). Every one of these float32 ops
is monotone in ``dot`` (``α ≥ 0``; the BatchNorm factor ``γ/√(σ²+ε)`` may be negative, which
makes the chain decreasing; rounding is monotone), so ``bit = [sign(...) = +1]`` is a threshold
on the integer ``dot``: ``bit = [d·dot ≥ T]`` per channel, with the direction ``d = ±1``. ``T``
is found by evaluating the float32 chain itself on every integer ``dot`` in ``[−n, n]`` (so the
float rounding is the reference's, not an idealized real number), and max-pool moves before the
threshold: see :func:`._arith.threshold_bits`. When the next layer is float (a float head) or
uniform, ``y = float32(dot)·α`` and the rest of the chain run in float32 as the model runs them.
The fake-quant reference (:func:`fake_quant_forward`) computes a binary layer as
``(x̂ ⊛ sign ŵ)·α``: the same real number as the model's ``x̂ ⊛ ŵ``, but with the ±1 sums exact
(integers below 2^24) and one rounding, so it does not depend on the summation order.

Activation scales must be STATIC for integer inference: the ``absmax`` recipe recomputes the
activation scale from every batch, which integer hardware cannot do. :func:`static_act_scales`
calibrates one scale per layer input (``max|x| / qmax`` over a few batches, or another
estimator of :mod:`qflax.calibration`); ``learned_step`` scales are static already. The

The package, by job (imports one way: arithmetic and program types depend on nothing here; the
plan on neither; lowering on plan, arithmetic, program and the reference's float chain;
execution on program and arithmetic):

* :mod:`._arith`: requantization, fixed-point bits, bit packing, XNOR/popcount, thresholds;
* :mod:`._program`: :class:`IntegerProgram` and its layers, each with one :class:`Epilogue`;
* :mod:`._plan`: the model's chain of layers (``model.layer_sequence()``) and, per quantizer
  kind, :func:`._plan.weight_lowering` and :func:`._plan.input_grid`;
* :mod:`._reference`: :func:`fake_quant_forward`, :func:`static_act_scales`,
  :func:`estimate_scale`;
* :mod:`._weights` and :mod:`._lower`: :func:`export_integer`;
* :mod:`._exec`: :func:`integer_forward`, :func:`quantize_input`, :func:`apply_epilogue`.
"""

from qflax.export.integer._arith import quantize_multiplier, requantize
from qflax.export.integer._exec import apply_epilogue, integer_forward, quantize_input
from qflax.export.integer._lower import export_integer
from qflax.export.integer._plan import ACTIVATIONS, INTEGER_MODELS
from qflax.export.integer._program import (
    BinaryLayer,
    Epilogue,
    FloatLayer,
    IntegerLayer,
    IntegerProgram,
)
from qflax.export.integer._reference import (
    CALIBRATIONS,
    estimate_scale,
    fake_quant_forward,
    static_act_scales,
)

__all__ = [
    "ACTIVATIONS",
    "CALIBRATIONS",
    "INTEGER_MODELS",
    "BinaryLayer",
    "Epilogue",
    "FloatLayer",
    "IntegerLayer",
    "IntegerProgram",
    "apply_epilogue",
    "estimate_scale",
    "export_integer",
    "fake_quant_forward",
    "integer_forward",
    "quantize_input",
    "quantize_multiplier",
    "requantize",
    "static_act_scales",
]
