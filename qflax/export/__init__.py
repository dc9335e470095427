"""Quantized models at rest and integer-only inference.

* :class:`QArray` (integer codes + scales, a pytree) with :func:`quantize_uniform` (and one
  ``quantize_*`` per quantizer kind; :func:`quantize_tensor` dispatches on a layer's spec),
  :func:`dequantize`, :func:`pack` / :func:`unpack` and :func:`nbytes`;
* :func:`export_model` / :func:`import_model`, :func:`save_packed` / :func:`load_packed` (orbax),
  :func:`packed_model_bytes`;
* BatchNorm folding: :func:`fold_batchnorm`, :func:`fold_model_batchnorm`;
* integer inference of MLP / CNN models: uniform layers (absmax / learned_step, ternary) on
  int8 codes with int32 accumulation, power-of-two weights as shifts, binary layers (±1 inputs
  and weights, relu or hardtanh models) as XNOR/popcount on packed bits, and float layers (a
  float first/last layer) in float32:
  :func:`static_act_scales`, :func:`fake_quant_forward`, :func:`export_integer`,
  :func:`integer_forward`; :func:`evaluate_integer` (``qflax eval --integer``), with its
  fake-quant reference :func:`model_forward` and batched :func:`predict`;
* post-training quantization of a float run: :func:`ptq` (``qflax ptq``), :func:`load_ptq`.
"""

from qflax.export._evaluate import evaluate_integer, model_forward, predict
from qflax.export._export import (
    export_model,
    import_model,
    load_packed,
    packed_model_bytes,
    quant_layers,
    quantize_tensor,
    save_packed,
)
from qflax.export._fold import Identity, fold_batchnorm, fold_model_batchnorm, identity_variance
from qflax.export._ptq import PTQ_KEYS, load_ptq, ptq, ptq_config
from qflax.export.integer import (
    ACTIVATIONS,
    CALIBRATIONS,
    BinaryLayer,
    Epilogue,
    FloatLayer,
    IntegerLayer,
    IntegerProgram,
    estimate_scale,
    export_integer,
    fake_quant_forward,
    integer_forward,
    quantize_input,
    quantize_multiplier,
    requantize,
    static_act_scales,
)
from qflax.quantizers import (
    QARRAY_KINDS,
    QArray,
    container_bits,
    dequantize,
    nbytes,
    pack,
    quantize_binary,
    quantize_codeq,
    quantize_dbssq_act,
    quantize_dbssq_weight,
    quantize_dorefa,
    quantize_gdnsq_act,
    quantize_gdnsq_weight,
    quantize_lsq,
    quantize_pact,
    quantize_pow2,
    quantize_ternary,
    quantize_uniform,
    unpack,
)

__all__ = [
    "ACTIVATIONS",
    "CALIBRATIONS",
    "PTQ_KEYS",
    "QARRAY_KINDS",
    "BinaryLayer",
    "Epilogue",
    "FloatLayer",
    "Identity",
    "IntegerLayer",
    "IntegerProgram",
    "QArray",
    "container_bits",
    "dequantize",
    "estimate_scale",
    "evaluate_integer",
    "export_integer",
    "export_model",
    "fake_quant_forward",
    "fold_batchnorm",
    "fold_model_batchnorm",
    "identity_variance",
    "import_model",
    "integer_forward",
    "load_packed",
    "load_ptq",
    "model_forward",
    "nbytes",
    "pack",
    "packed_model_bytes",
    "predict",
    "ptq",
    "ptq_config",
    "quant_layers",
    "quantize_binary",
    "quantize_codeq",
    "quantize_dbssq_act",
    "quantize_dbssq_weight",
    "quantize_dorefa",
    "quantize_gdnsq_act",
    "quantize_gdnsq_weight",
    "quantize_input",
    "quantize_lsq",
    "quantize_multiplier",
    "quantize_pact",
    "quantize_pow2",
    "quantize_tensor",
    "quantize_ternary",
    "quantize_uniform",
    "requantize",
    "save_packed",
    "static_act_scales",
    "unpack",
]
