"""Pure-function quantizers with custom gradients.

Every quantizer is ``name(x, params, config) -> x_hat`` with a frozen, validated config
dataclass and ``name_init(x, config) -> params`` for data-dependent parameters; every
``jax.custom_vjp`` is defined once at module level. Families:

* uniform affine / symmetric (per tensor, channel or group; STE, clipped STE or true gradient;
  learnable scale and zero point): :func:`uniform`;
* learned scales and clips: LSQ (:func:`lsq`), PACT (:func:`pact`), DoReFa
  (:func:`dorefa_weights`, :func:`dorefa_activations`, :func:`dorefa_gradients`);
* GDNSQ learnable bit-width quantizers (:func:`gdnsq_weight`, :func:`gdnsq_act`);
* power-of-two (logarithmic) levels: :func:`pow2`;
* binary sign (deterministic, stochastic, XNOR scaling) and ternary: :func:`binary`,
  :func:`ternary`;
* dead-zone pruning + quantization (CoDeQ): :func:`codeq`;
* differentiable bit-shifting (DBSSQ) blends ``ε·x + (1 − ε)·Q(x)``: :func:`dbssq`;
* ProxConnect++ forward/backward pairs: :func:`pair`, the catalogue :data:`PAIRS`, and the named
  elementwise functions in :data:`FORWARDS` / :data:`BACKWARDS`.
"""

from qflax.quantizers._base import GRANULARITIES
from qflax.quantizers._binary import (
    BINARY_GRADIENTS,
    SCALINGS,
    BinaryConfig,
    TernaryConfig,
    binary,
    binary_codes,
    binary_init,
    binary_scale,
    ternary,
    ternary_codes,
    ternary_init,
    ternary_scale,
)
from qflax.quantizers._codeq import (
    CODEQ_GRADIENTS,
    CoDeQConfig,
    codeq,
    codeq_bits,
    codeq_codes,
    codeq_deadzone,
    codeq_init,
    codeq_sparsity,
)
from qflax.quantizers._dbssq import (
    DBSSQ_EPSILONS,
    DBSSQ_LEVELS,
    DBSSQConfig,
    dbssq,
    dbssq_act,
    dbssq_epsilon_schedule,
    dbssq_level_set,
    dbssq_quantize,
    dbssq_weight,
    dbssq_weight_init,
)
from qflax.quantizers._dorefa import (
    dorefa_activations,
    dorefa_gradients,
    dorefa_quantize_k,
    dorefa_weight_transform,
    dorefa_weights,
)
from qflax.quantizers._gdnsq import (
    GDNSQ_BACKWARDS,
    GDNSQActConfig,
    GDNSQWeightConfig,
    gdnsq_act,
    gdnsq_act_bits,
    gdnsq_act_codes,
    gdnsq_act_init,
    gdnsq_used_bits,
    gdnsq_weight,
    gdnsq_weight_bits,
    gdnsq_weight_codes,
    gdnsq_weight_init,
)
from qflax.quantizers._lsq import (
    LSQConfig,
    lsq,
    lsq_init,
    lsq_numel,
)
from qflax.quantizers._pact import (
    PACTConfig,
    pact,
    pact_init,
    pact_l2,
)
from qflax.quantizers._pairs import (
    BACKWARDS,
    FORWARDS,
    PAIRS,
    QuantizerPair,
    approx_sign,
    bc,
    bnn,
    bnn_plus,
    bnn_plus_plus,
    hardtanh,
    identity,
    pair,
    pc,
    poly_sign,
    prox,
    proxquant,
    sign,
    sign_swish,
)
from qflax.quantizers._pow2 import (
    POW2_GRADIENTS,
    PowerOfTwoConfig,
    pow2,
    pow2_codes,
    pow2_dequantize,
    pow2_init,
    pow2_levels,
)
from qflax.quantizers._uniform import (
    UNIFORM_GRADIENTS,
    UniformConfig,
    uniform,
    uniform_codes,
    uniform_dequantize,
    uniform_init,
)

__all__ = [
    "LSQConfig",
    "lsq",
    "lsq_init",
    "lsq_numel",
    "PACTConfig",
    "pact",
    "pact_init",
    "pact_l2",
    "dorefa_weights",
    "dorefa_activations",
    "dorefa_gradients",
    "dorefa_quantize_k",
    "dorefa_weight_transform",
    "GDNSQ_BACKWARDS",
    "GDNSQWeightConfig",
    "GDNSQActConfig",
    "gdnsq_weight",
    "gdnsq_weight_init",
    "gdnsq_weight_bits",
    "gdnsq_weight_codes",
    "gdnsq_act",
    "gdnsq_act_init",
    "gdnsq_act_bits",
    "gdnsq_act_codes",
    "gdnsq_used_bits",
    "CODEQ_GRADIENTS",
    "CoDeQConfig",
    "codeq",
    "codeq_bits",
    "codeq_codes",
    "codeq_deadzone",
    "codeq_init",
    "codeq_sparsity",
    "DBSSQ_EPSILONS",
    "DBSSQ_LEVELS",
    "DBSSQConfig",
    "dbssq",
    "dbssq_act",
    "dbssq_epsilon_schedule",
    "dbssq_level_set",
    "dbssq_quantize",
    "dbssq_weight",
    "dbssq_weight_init",
    "BACKWARDS",
    "BINARY_GRADIENTS",
    "FORWARDS",
    "GRANULARITIES",
    "PAIRS",
    "POW2_GRADIENTS",
    "SCALINGS",
    "UNIFORM_GRADIENTS",
    "BinaryConfig",
    "PowerOfTwoConfig",
    "QuantizerPair",
    "TernaryConfig",
    "UniformConfig",
    "approx_sign",
    "bc",
    "binary",
    "binary_codes",
    "binary_init",
    "binary_scale",
    "bnn",
    "bnn_plus",
    "bnn_plus_plus",
    "hardtanh",
    "identity",
    "pair",
    "pc",
    "poly_sign",
    "pow2",
    "pow2_codes",
    "pow2_dequantize",
    "pow2_init",
    "pow2_levels",
    "prox",
    "proxquant",
    "sign",
    "sign_swish",
    "ternary",
    "ternary_codes",
    "ternary_init",
    "ternary_scale",
    "uniform",
    "uniform_codes",
    "uniform_dequantize",
    "uniform_init",
]
