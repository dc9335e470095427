"""Quantizer specs: :class:`TensorQuant` (one tensor), :class:`Recipe` (a layer), and factories.

A :class:`TensorQuant` names a quantizer family and its config; it is a frozen, hashable
dataclass, so recipes can be static attributes of Flax modules (part of the graph definition) and
the keys of jit caches. Learnable quantizer parameters live in the layer (as ``QuantParam``), in a
*compact* layout that does not depend on the rank of the tensor:

* granularity ``"tensor"``: shape ``()``;
* granularity ``"channel"``: shape ``(C,)``, ``C = x.shape[axis]``;
* granularity ``"group"``: the quantizer's own params shape (for tensors of fixed rank: weights).

so one activation scale serves inputs of any rank (``(batch, features)`` or
``(batch, length, features)``).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from qflax import ops
from qflax import quantizers as qz
from qflax.numerics import check_choice

__all__ = [
    "GRAD_KEYWORDS",
    "RECIPES",
    "RECIPE_KEYWORDS",
    "Recipe",
    "TensorQuant",
    "recipes",
    "register_recipe",
    "with_grad",
]

ROLES = qz.ROLES

# Bits of a float tensor in summaries.
FLOAT_BITS = 32


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorQuant:
    """How one tensor is quantized: a registered quantizer family (``kind``) and its config.

    Everything about a kind — its config type, init, learnable params and their optimizer
    tags, state, bits, codes at rest, integer lowering — is the family's
    (:class:`qflax.quantizers.QuantizerFamily`, looked up in :data:`qflax.quantizers.FAMILIES`);
    this spec only holds the choice and forwards to the family. Built-in kinds:

    * ``"absmax"``: :func:`qflax.quantizers.uniform` with the scale recomputed from the tensor;
    * ``"learned_step"``: :func:`~qflax.quantizers.uniform` with a learned scale;
    * ``"pow2"``, ``"binary"``, ``"ternary"``: scales from the tensor, no learnable params;
    * ``"pair"``: a ProxConnect++ pair (:class:`~qflax.quantizers.PairConfig`: a named pair or a
      forward and a backward by name, its output scaling and normalisation);
    * ``"lsq"``, ``"pact"``, ``"dorefa"``: the learned-step / learned-clip / DoReFa quantizers;
    * ``"gdnsq"``: learned bit-widths driven to ``target_bits`` by the exterior-point penalty;
    * ``"dbssq"``: the annealed bit-shifting blend (``role`` says weight or activation);
    * ``"codeq"``: dead-zone weights with a learned dead zone and bit-width;
    * ``"ptq"``, ``"psq"``, ``"bhq"``, ``"dorefa_grad"``: gradient quantizers of the output
      cotangent (``Recipe.grad``; :class:`~qflax.quantizers.StatGradConfig`): stochastic
      rounding per tensor, per sample, block Householder (Chen et al. 2020) and DoReFa's;
    * ``"hadamard"``: LSQ on the Hadamard-rotated tensor; ``"bitsplit"``: INT4 bit-splitting
      gradients with leverage-score sampling (Xi et al. 2023);
    * ``"fsq"``, ``"q2d2"``, ``"vq"``, ``"rvq"``: latent (vector) quantizers of the last axis,
      with code indices (:class:`~qflax.layers.QuantLatent` trains their state and losses);

    and any family registered by user code (:func:`qflax.quantizers.register_family`).

    >>> TensorQuant(kind="absmax", config=qz.UniformConfig(bits=4)).bits
    4
    >>> TensorQuant(kind="pair", config=qz.PairConfig(pair="bnn", scaling="channel")).bits
    1
    """

    # Quantizer family: a name in qflax.quantizers.FAMILIES.
    kind: str
    # The family's config; None: the family's default config.
    config: Any = None
    # The target bit-width of a learned bit-width (1..32; families that learn bits); else None.
    target_bits: int | None = None
    # "weight" or "act" for families that need to be told which (DBSSQ); else None.
    role: str | None = None

    def __post_init__(self):
        family = qz.get_family(self.kind)
        config = self.config
        if config is None:
            config = family.default_config()
            object.__setattr__(self, "config", config)
        if family.config_types and not isinstance(config, family.config_types):
            allowed = " or ".join(f"a {w.__name__}" for w in family.config_types)
            raise ValueError(
                f"config={config!r} does not fit kind={self.kind!r}; allowed: {allowed} (or None)"
            )
        if family.learns_bits(self):
            t = self.target_bits
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 1 <= t <= 32:
                raise ValueError(
                    f"target_bits={t!r} is not allowed for kind={self.kind!r}; allowed: "
                    "integers 1..32"
                )
        elif self.target_bits is not None:
            raise ValueError(
                f"target_bits={self.target_bits!r} is only used by families that learn their "
                f"bit-width; allowed for kind={self.kind!r}: None"
            )
        if family.needs_role:
            check_choice(self.role, "role", ROLES)
        elif self.role is not None:
            raise ValueError(
                f"role={self.role!r} is only used by families that need it (dbssq); allowed "
                f"for kind={self.kind!r}: None"
            )
        family.check(self)

    # ---------------------------------------------------------------- description

    @property
    def family(self) -> qz.QuantizerFamily:
        """The registered family of ``kind``."""
        return qz.get_family(self.kind)

    @property
    def bits(self) -> int:
        """Bits per value at rest (a learned bit-width: its target; the layer reports the
        bit-width actually used)."""
        return int(self.family.bits(self))

    @property
    def granularity(self) -> str:
        """Which elements share a scale: ``"tensor"``, ``"channel"``, ``"group"`` or ``"none"``."""
        return self.family.granularity(self)

    @property
    def channel_axis(self) -> int:
        """The axis of per-channel scales."""
        return self.family.channel_axis(self)

    @property
    def roles(self) -> tuple[str, ...]:
        """The tensors this spec can quantize (``"weight"``, ``"act"``)."""
        return tuple(self.family.roles(self))

    @property
    def learnable(self) -> bool:
        """Whether :meth:`init` returns learnable params (``QuantParam`` s in the layer)."""
        return self.family.learnable(self)

    @property
    def param_tags(self) -> dict[str, tuple[str, ...]]:
        """Optimizer tags of each learnable param (``"clip"``, ``"deadzone"``, ``"bits"``)."""
        return dict(self.family.param_tags(self))

    @property
    def reads_bits(self) -> bool:
        """Whether the integer bit-width in use is read from learned params (GDNSQ, CoDeQ)."""
        return self.family.reads_bits(self)

    @property
    def learns_bits(self) -> bool:
        """Whether the bit-width itself is learned (``"gdnsq"``): see :meth:`bit_width`."""
        return self.family.learns_bits(self)

    @property
    def needs_key(self) -> bool:
        """Whether :meth:`apply` needs a PRNG key (e.g. GDNSQ's noise-scale backward rule)."""
        return self.family.needs_key(self)

    @property
    def ends_exact(self) -> bool:
        """Whether training ends by switching this quantizer to its exact state."""
        return self.family.ends_exact(self)

    def __str__(self) -> str:
        return self.family.describe(self)

    # ---------------------------------------------------------------- params and state

    def init(self, x: ArrayLike) -> dict[str, jax.Array]:
        """Data-dependent learnable params (compact layout, float32); ``{}`` for stateless kinds."""
        if not self.learnable:
            return {}
        return self.family.init(self, jax.lax.stop_gradient(jnp.asarray(x)))

    def stats_init(self, x: ArrayLike | None) -> dict[str, jax.Array]:
        """Non-learned state of the quantizer (float32, compact): e.g. DBSSQ's ``epsilon`` and
        ``sigma``, a pair's ``mu`` and ``hard``; ``{}`` otherwise."""
        return self.family.stats_init(self, x)

    def training_stats(self, stats: Mapping[str, ArrayLike]) -> dict[str, jax.Array]:
        """The state the quantizer sees in a training step (the family's
        :meth:`~qflax.quantizers.QuantizerFamily.training_stats`: e.g. without the running
        statistics a DBSSQ activation normalises with outside training)."""
        return self.family.training_stats(self, dict(stats))

    @property
    def updates_stats(self) -> bool:
        """Whether a training step updates the family's state (``update_stats`` defined)."""
        return type(self.family).update_stats is not qz.QuantizerFamily.update_stats

    def schedule(self, *, epoch: int, epochs: int, anneal: Any) -> dict[str, Any]:
        """The annealed state for ``epoch`` of ``epochs`` (``epoch = epochs``: the final,
        exact state): the family's :meth:`~qflax.quantizers.QuantizerFamily.schedule`."""
        return self.family.schedule(self, epoch=epoch, epochs=epochs, anneal=anneal)

    def placeholder(self, shape: tuple[int, ...]) -> dict[str, jax.Array]:
        """Params for a tensor of ``shape`` before any data is seen (activations before
        :func:`~qflax.layers.calibrate`)."""
        return self.family.placeholder(self, tuple(shape))

    def param_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Shapes of :meth:`init`'s params for a tensor of ``shape`` (no computation)."""
        out = jax.eval_shape(self.init, jax.ShapeDtypeStruct(tuple(shape), jnp.float32))
        return {k: tuple(v.shape) for k, v in out.items()}

    def scale_count(self, shape: tuple[int, ...]) -> int:
        """Number of float values (scales, zero points) needed to dequantize a stored tensor of
        ``shape``: one per tensor, channel or group, 0 for unscaled binary/ternary/pairs."""
        return int(self.family.scale_count(self, tuple(shape)))

    def stored_scales(self, shape: tuple[int, ...]) -> int:
        """Float values stored at rest besides the layer's ``QuantParam`` s."""
        return int(self.family.stored_scales(self, tuple(shape)))

    # ---------------------------------------------------------------- quantize

    def apply(
        self,
        x: ArrayLike,
        params: Mapping[str, ArrayLike] | None = None,
        *,
        key: jax.Array | None = None,
        stats: Mapping[str, ArrayLike] | None = None,
    ) -> jax.Array:
        """Quantizes ``x`` (shape and dtype kept); ``params`` as returned by :meth:`init`,
        ``stats`` as by :meth:`stats_init` (None: computed from ``x`` now).

        Gradients are the quantizer's own (see ``qflax.quantizers``); scales recomputed from
        ``x`` (absmax, pow2, binary, ternary, pair scaling) are under ``stop_gradient``.
        """
        x = jnp.asarray(x)
        params = {} if params is None else dict(params)
        if params and not self.learnable:
            raise ValueError(
                f"params={sorted(params)!r} is not allowed for kind={self.kind!r}; allowed: {{}}"
            )
        stats = self.stats_init(x) if stats is None else dict(stats)
        return self.family.apply(self, x, params, key=key, stats=stats)

    def codes(
        self,
        x: ArrayLike,
        params: Mapping[str, ArrayLike] | None = None,
        stats: Mapping[str, ArrayLike] | None = None,
    ) -> qz.QArray:
        """The integer codes of :meth:`apply` at rest (an unpacked :class:`~qflax.quantizers.
        QArray`); :class:`~qflax.quantizers.NotExportable` names why a family has none."""
        x = jnp.asarray(x)
        return self.family.codes(self, x, dict(params or {}), stats)

    def grad_quantizer(self, key: jax.Array | None = None) -> Any:
        """The ``grad_quantizer`` slot of a :mod:`qflax.ops` op for this gradient spec: one
        callable for both backward products or a ``(dlhs, drhs)`` pair (stochastic families:
        two independent keys split from ``key``); see
        :meth:`~qflax.quantizers.QuantizerFamily.grad_slots`."""
        if "grad" not in self.roles:
            raise ValueError(
                f"kind={self.kind!r} does not quantize gradients; allowed: "
                f"{', '.join(_grad_families())}"
            )
        return self.family.grad_slots(self, key)

    def quantizer(
        self,
        params: Mapping[str, ArrayLike] | None = None,
        *,
        key: jax.Array | None = None,
        stats: Mapping[str, ArrayLike] | None = None,
    ) -> Callable:
        """``x -> self.apply(x, params, key=key, stats=stats)``: a slot for :mod:`qflax.ops`."""
        return _Bound(self, dict(params or {}), key, stats)

    def check_int8(self) -> None:
        """Raises ValueError (the family's reason) unless this spec's values are ``s · c``
        with int8 codes ``c`` (what ``Recipe(forward_dtype="int8")`` needs)."""
        try:
            self.family.check_int8(self)
        except qz.NotExportable as e:
            raise ValueError(f"forward_dtype='int8' with {self}: {e}") from None

    def int8_scale(
        self,
        x: ArrayLike,
        params: Mapping[str, ArrayLike] | None = None,
        stats: Mapping[str, ArrayLike] | None = None,
    ) -> jax.Array:
        """The scale ``s`` (broadcastable to ``x``, no gradient) with ``apply(x) = s · c``,
        ``c`` integers in ``[−128, 127]`` (:meth:`check_int8` must pass)."""
        x = jnp.asarray(x)
        stats = self.stats_init(x) if stats is None else dict(stats)
        return self.family.int8_scale(self, x, dict(params or {}), stats)

    def int8_quantizer(
        self,
        params: Mapping[str, ArrayLike] | None = None,
        *,
        key: jax.Array | None = None,
        stats: Mapping[str, ArrayLike] | None = None,
    ) -> ops.Int8Operand:
        """:meth:`quantizer` as an :func:`qflax.ops.int8_operand` slot (its scale from
        :meth:`int8_scale`), for ops with ``forward_dtype="int8"``."""
        bound = _Bound(self, dict(params or {}), key, stats)
        return ops.int8_operand(bound, bound.int8_scale)

    # ---------------------------------------------------------------- learned bit-widths

    def bit_width(self, x: ArrayLike, params: Mapping[str, ArrayLike]) -> jax.Array | None:
        """The continuous, differentiable bit-width the penalty sees (None unless the family
        learns its bit-width). ``x`` is the tensor (weights) or ignored (activations)."""
        return self.family.bit_width(self, x, params) if self.learns_bits else None

    def used_bits(self, x: ArrayLike, params: Mapping[str, ArrayLike]) -> jax.Array | None:
        """The integer bit-width this quantizer actually uses (None: the nominal bits)."""
        return self.family.used_bits(self, x, params) if self.reads_bits else None

    # ---------------------------------------------------------------- training state, codes

    def losses(
        self,
        x: ArrayLike,
        params: Mapping[str, ArrayLike] | None = None,
        stats: Mapping[str, ArrayLike] | None = None,
    ) -> dict[str, jax.Array]:
        """The family's auxiliary training losses of quantizing ``x`` (weighted; ``{}``: none)."""
        return dict(self.family.losses(self, jnp.asarray(x), dict(params or {}), dict(stats or {})))

    def update_stats(
        self,
        x: ArrayLike,
        params: Mapping[str, ArrayLike] | None = None,
        stats: Mapping[str, ArrayLike] | None = None,
        *,
        key: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """The state after a training step that saw ``x`` (e.g. an EMA codebook)."""
        return dict(
            self.family.update_stats(
                self, jnp.asarray(x), dict(params or {}), dict(stats or {}), key=key
            )
        )

    def calibrate_stats(
        self, x: ArrayLike, stats: Mapping[str, ArrayLike] | None = None
    ) -> dict[str, jax.Array]:
        """The state set from the first real tensor (e.g. a k-means codebook)."""
        x = jax.lax.stop_gradient(jnp.asarray(x))
        return dict(self.family.calibrate_stats(self, x, dict(stats or {})))

    def indices(
        self,
        x: ArrayLike,
        params: Mapping[str, ArrayLike] | None = None,
        stats: Mapping[str, ArrayLike] | None = None,
    ) -> jax.Array:
        """The int32 code of every vector of ``x`` (vector quantizers; else NotExportable)."""
        return self.family.indices(self, jnp.asarray(x), dict(params or {}), dict(stats or {}))

    def from_indices(
        self,
        idx: ArrayLike,
        params: Mapping[str, ArrayLike] | None = None,
        stats: Mapping[str, ArrayLike] | None = None,
    ) -> jax.Array:
        """The quantized vectors of codes ``idx`` (the inverse of :meth:`indices`)."""
        return self.family.from_indices(
            self, jnp.asarray(idx), dict(params or {}), dict(stats or {})
        )

    @property
    def codebook_size(self) -> int | None:
        """Distinct code vectors (vector quantizers), else None."""
        return self.family.codebook_size(self)

    @property
    def vector_dim(self) -> int | None:
        """Elements per code vector (vector quantizers), else None."""
        return self.family.vector_dim(self)


class _Bound:
    """A TensorQuant with its params bound: the callable handed to an op's quantizer slot."""

    def __init__(self, spec: TensorQuant, params: dict[str, jax.Array], key=None, stats=None):
        self.spec = spec
        self.params = params
        self.key = key
        self.stats = stats

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.spec.apply(x, self.params, key=self.key, stats=self.stats)

    def int8_scale(self, x: jax.Array) -> jax.Array:
        return self.spec.int8_scale(x, self.params, self.stats)


def _grad_families() -> list[str]:
    """Registered families whose default spec quantizes gradients (for error messages)."""
    out = []
    for name in qz.FAMILIES:
        try:
            if "grad" in TensorQuant(kind=name).roles:
                out.append(name)
        except (ValueError, TypeError):  # no default spec (a target or role is needed)
            continue
    return out


def _check_tensor_quant(value: Any, field: str) -> None:
    if value is not None and not isinstance(value, TensorQuant):
        raise ValueError(f"{field}={value!r} is not allowed; allowed: a TensorQuant or None")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """How one layer is quantized (hashable). ``None`` keeps that tensor in float.

    >>> str(recipes.absmax(4, 8))
    'w:absmax4/channel a:absmax8'
    >>> str(Recipe())
    'float'
    """

    # Quantizer of the layer's kernel (per output channel is the usual choice).
    weight: TensorQuant | None = None
    # Quantizer of the layer's INPUT activations (signed unless configured otherwise).
    act: TensorQuant | None = None
    # Quantizer of the output cotangent before the two backward products (a family whose roles
    # include "grad": absmax, pow2, the stochastic ptq/psq/bhq/dorefa_grad, INT4 bit splitting;
    # stochastic ones quantize twice with independent keys); None: float gradients.
    grad: TensorQuant | None = None
    # The dtype of the forward product's operands: "float32" (the quantized values, i.e.
    # fake quantization) or "int8" (their integer codes: int8 × int8 products accumulated in
    # int32 and rescaled once, for dense and einsum layers; the backward is unchanged, see
    # qflax.ops). Convolutions keep "float32" (not built: an int8 convolution in training
    # would need its own op; see benchmarks/RESULTS.md for what XLA:CPU's s8 convs do).
    forward_dtype: str = "float32"

    def __post_init__(self):
        _check_tensor_quant(self.weight, "weight")
        _check_tensor_quant(self.act, "act")
        _check_tensor_quant(self.grad, "grad")
        check_choice(self.forward_dtype, "forward_dtype", ops.FORWARD_DTYPES)
        if self.forward_dtype == "int8":
            if self.weight is None or self.act is None:
                raise ValueError(
                    f"forward_dtype='int8' with weight={self.weight}, act={self.act} is not "
                    "allowed; allowed: both the weights and the input activations quantized"
                )
            self.weight.check_int8()
            self.act.check_int8()
        if self.grad is not None and "grad" not in self.grad.roles:
            raise ValueError(
                f"grad.kind={self.grad.kind!r} is not allowed; allowed: families that quantize "
                f"gradients ({', '.join(_grad_families())})"
            )
        for role, name in (("weight", "an activation"), ("act", "a weight")):
            tq = getattr(self, role)
            if tq is not None and role not in tq.roles:
                raise ValueError(
                    f"{role}={tq} is {name} quantizer (kind {tq.kind!r} with this config "
                    f"quantizes {'/'.join(tq.roles)} tensors); allowed for {role}: a spec whose "
                    f"family quantizes {role} tensors (e.g. the config's role={role!r})"
                )
        if self.act is not None and self.act.learnable and self.act.granularity == "group":
            raise ValueError(
                "act.config.granularity='group' is not allowed for a learned activation "
                "scale (its shape would depend on the batch); allowed: 'tensor', 'channel'"
            )

    @property
    def weight_bits(self) -> int:
        """Bits of the weights (32 when float)."""
        return FLOAT_BITS if self.weight is None else self.weight.bits

    @property
    def act_bits(self) -> int:
        """Bits of the input activations (32 when float)."""
        return FLOAT_BITS if self.act is None else self.act.bits

    def __str__(self) -> str:
        parts = [
            f"{name}:{tq}"
            for name, tq in (("w", self.weight), ("a", self.act), ("g", self.grad))
            if tq is not None
        ]
        if self.forward_dtype != "float32":
            parts.append(f"fwd:{self.forward_dtype}")
        return " ".join(parts) if parts else "float"


# ------------------------------------------------------------------------------------ factories


def _is_float_bits(bits: Any, field: str) -> bool:
    if bits is None:
        return True
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise ValueError(f"{field}={bits!r} is not allowed; allowed: None or integers 1..32")
    return int(bits) == FLOAT_BITS


def _uniform(kind: str, bits: Any, field: str, **config: Any) -> TensorQuant | None:
    if _is_float_bits(bits, field):
        return None
    learn = {"learn_scale": True} if kind == "learned_step" else {}
    try:
        cfg = qz.UniformConfig(bits=int(bits), **learn, **config)
    except ValueError as e:
        raise ValueError(f"{field}: {e}") from None
    return TensorQuant(kind=kind, config=cfg)


def float_recipe() -> Recipe:
    """Everything in float (wrapped layers still record MACs)."""
    return Recipe()


def absmax(
    weight_bits: int | None = 8,
    act_bits: int | None = 8,
    *,
    weight_granularity: str = "channel",
    act_signed: bool = True,
    gradient: str = "ste",
    grad_bits: int | None = None,
) -> Recipe:
    """Uniform symmetric quantization with scales recomputed from each tensor (dynamic absmax).

    Weights per output channel (the kernel's last axis) unless ``weight_granularity="tensor"``,
    activations per tensor; ``bits=None`` (or 32) keeps that tensor in float.

    Args:
      weight_bits: bits of the kernel.
      act_bits: bits of the input activations.
      weight_granularity: ``"channel"`` or ``"tensor"``.
      act_signed: signed activation codes (False: unsigned, for inputs known to be >= 0).
      gradient: the straight-through rule of both quantizers (``"ste"``, ``"clipped_ste"``).
      grad_bits: bits of the output cotangent before the backward products (per tensor); None:
        float gradients.
    """
    return Recipe(
        weight=_uniform(
            "absmax", weight_bits, "weight_bits", granularity=weight_granularity, gradient=gradient
        ),
        act=_uniform("absmax", act_bits, "act_bits", signed=act_signed, gradient=gradient),
        grad=_uniform("absmax", grad_bits, "grad_bits"),
    )


def learned_step(
    weight_bits: int | None = 8,
    act_bits: int | None = 8,
    *,
    weight_granularity: str = "channel",
    act_signed: bool = True,
    gradient: str = "ste",
) -> Recipe:
    """Uniform symmetric quantization with learned scales (``QuantParam``; LSQ-style gradient).

    Weight scales are initialised from the kernel when the layer is built; activation scales
    from real inputs by :func:`qflax.layers.calibrate` (1.0 until then). ``bits=None`` (or 32)
    keeps that tensor in float.
    """
    return Recipe(
        weight=_uniform(
            "learned_step",
            weight_bits,
            "weight_bits",
            granularity=weight_granularity,
            gradient=gradient,
        ),
        act=_uniform("learned_step", act_bits, "act_bits", signed=act_signed, gradient=gradient),
    )


def pow2(
    weight_bits: int | None = 4, act_bits: int | None = None, *, act_levels: str = "pow2"
) -> Recipe:
    """Power-of-two (logarithmic) levels with scales from each tensor.

    Weights per output channel, activations (when ``act_bits`` is given) per tensor, both with
    an exact zero level. ``bits`` counts the sign bit (2..8); None or 32: float.

    Args:
      weight_bits: bits of the kernel's power-of-two codes.
      act_bits: bits of the input activations; None: float inputs.
      act_levels: the levels of the input activations: ``"pow2"`` (power-of-two, as the
        weights) or ``"uniform"`` (the absmax uniform quantizer, symmetric per tensor, as
        :func:`absmax`'s inputs: the layout integer inference runs, power-of-two weights
        applied as shifts to int8 codes; ``act_bits`` 1..32 then).
    """
    check_choice(act_levels, "act_levels", ("pow2", "uniform"))

    def spec(bits, field, granularity):
        if _is_float_bits(bits, field):
            return None
        try:
            cfg = qz.PowerOfTwoConfig(bits=int(bits), granularity=granularity)
        except ValueError as e:
            raise ValueError(f"{field}: {e}") from None
        return TensorQuant(kind="pow2", config=cfg)

    if act_levels == "uniform":
        act = _uniform("absmax", act_bits, "act_bits")
    else:
        act = spec(act_bits, "act_bits", "tensor")
    return Recipe(weight=spec(weight_bits, "weight_bits", "channel"), act=act)


def binary(
    pair: str | None = "bnn",
    scaling: str = "channel",
    act: bool = True,
    normalize: bool = False,
    *,
    forward: str | None = None,
    backward: str | None = None,
    learn_scale: bool = False,
    **pair_kwargs: Any,
) -> Recipe:
    """Binary weights (and activations): a ProxConnect++ pair, or the plain binary quantizer.

    Args:
      pair: name in :data:`qflax.quantizers.PAIRS` (``"bnn"``, ``"bnn+"``, ``"bnn++"``, ``"bc"``,
        ..., or a pair registered with :func:`qflax.quantizers.register_pair`) used for weights
        and activations; None: the pair composed of ``forward`` and ``backward`` when given,
        else :func:`qflax.quantizers.binary` with the BNN clipped straight-through gradient.
      scaling: weight scale ``"none"``, ``"tensor"`` or ``"channel"`` (``sg(mean|w|)``); the
        activations are never scaled (±1).
      act: binarize the input activations too.
      normalize: the pair acts on ``x / sg(mean|x|)`` (weights per channel with
        ``scaling="channel"``, activations per tensor), so ``μ``/``β`` do not depend on the
        tensor's scale; the exact forward ``sign`` is unchanged.
      forward, backward: names in :data:`~qflax.quantizers.FORWARDS` /
        :data:`~qflax.quantizers.BACKWARDS` (with ``pair=None``): the composed pair.
      learn_scale: learned output scales ``α`` (``y = α·pair(x/α)``; weights per ``scaling``,
        activations per tensor) instead of ``sg(mean|x|)`` and unscaled ±1 activations; with
        a multi-bit pair (``pair="multibit", bits=2``) the activations then have ``2^bits``
        learned levels.
      **pair_kwargs: arguments of the pair's factory (``mu=``, ``beta=``); None values are
        dropped (the pair's default), so one config can name any pair.
    """
    pair_kwargs = {k: v for k, v in pair_kwargs.items() if v is not None}
    if pair is None and forward is None and backward is None:
        if pair_kwargs or normalize or learn_scale:
            extra = {**pair_kwargs, **({"normalize": True} if normalize else {})}
            raise ValueError(f"{extra!r} need a pair; allowed: none with pair=None")
        weight = TensorQuant(kind="binary", config=qz.BinaryConfig(scaling=scaling))
        act_q = TensorQuant(kind="binary", config=qz.BinaryConfig()) if act else None
        return Recipe(weight=weight, act=act_q)
    if pair is not None and (forward is not None or backward is not None):
        raise ValueError(
            f"pair={pair!r} with forward={forward!r}/backward={backward!r} is not allowed; "
            "allowed: a pair name, or pair=None with a forward and a backward"
        )
    names = {"pair": pair, "forward": forward, "backward": backward}
    common = {**names, "kwargs": pair_kwargs, "normalize": normalize}
    weight = TensorQuant(
        kind="pair",
        config=qz.PairConfig(**common, scaling=scaling, learn_scale=learn_scale),
    )
    act_q = None
    if act:
        act_scaling = "tensor" if learn_scale else "none"
        cfg = qz.PairConfig(**common, scaling=act_scaling, learn_scale=learn_scale)
        act_q = TensorQuant(kind="pair", config=cfg)
    return Recipe(weight=weight, act=act_q)


def ternary(
    threshold: float = 0.7,
    scaling: str = "channel",
    act_bits: int | None = None,
) -> Recipe:
    """Ternary weights (TWN: ``Δ = threshold·mean|w|``, per output channel by default).

    Activations are absmax-uniform with ``act_bits`` (per tensor), or float when None.
    """
    weight = TensorQuant(
        kind="ternary", config=qz.TernaryConfig(threshold=threshold, scaling=scaling)
    )
    return Recipe(weight=weight, act=_uniform("absmax", act_bits, "act_bits"))


def _spec(kind: str, config_type: type, bits: Any, field: str, **config: Any):
    """A TensorQuant of ``kind`` with ``config_type(bits=bits, **config)``; None for float bits."""
    if _is_float_bits(bits, field):
        return None
    try:
        return TensorQuant(kind=kind, config=config_type(bits=int(bits), **config))
    except ValueError as e:
        raise ValueError(f"{field}: {e}") from None


def lsq(
    weight_bits: int | None = 4,
    act_bits: int | None = 4,
    *,
    weight_granularity: str = "tensor",
    act_signed: bool = False,
    grad_scale: bool = True,
) -> Recipe:
    """LSQ (Esser et al. 2020): learned steps with the paper's gradient scale and init.

    Weights signed, one step per tensor as in the paper (``weight_granularity="channel"``: per
    output channel); activations unsigned by default (inputs after a ReLU: codes ``0..2^b − 1``),
    initialised from real inputs by :func:`qflax.layers.calibrate`.
    """
    return Recipe(
        weight=_spec(
            "lsq",
            qz.LSQConfig,
            weight_bits,
            "weight_bits",
            granularity=weight_granularity,
            grad_scale=grad_scale,
        ),
        act=_spec(
            "lsq", qz.LSQConfig, act_bits, "act_bits", signed=act_signed, grad_scale=grad_scale
        ),
    )


def pact(
    weight_bits: int | None = 4, act_bits: int | None = 4, *, init_alpha: float | None = None
) -> Recipe:
    """PACT (Choi et al. 2018): learned activation clip ``α`` (init ``init_alpha``; None: the
    calibration batch's maximum) with DoReFa weights, as in the paper. The L2 term on ``α`` is
    the optimizer's ``quant.clip_decay`` (see :mod:`qflax.train`)."""
    return Recipe(
        weight=_spec("dorefa", qz.DoReFaConfig, weight_bits, "weight_bits", role="weight"),
        act=_spec("pact", qz.PACTConfig, act_bits, "act_bits", init_alpha=init_alpha),
    )


def dorefa(weight_bits: int | None = 4, act_bits: int | None = 4) -> Recipe:
    """DoReFa-Net (Zhou et al. 2016): weights ``2·q_k(tanh w/(2 max|tanh w|) + ½) − 1``
    (``k = 1``: ``sign(w)·mean|w|``), activations ``q_k(clip(x, 0, 1))``."""
    return Recipe(
        weight=_spec("dorefa", qz.DoReFaConfig, weight_bits, "weight_bits", role="weight"),
        act=_spec("dorefa", qz.DoReFaConfig, act_bits, "act_bits", role="act"),
    )


def gdnsq(
    weight_bits: int | None = 4,
    act_bits: int | None = 4,
    *,
    backward: str = "noise",
    act_signed: bool = False,
    init_bits: float | None = 8.0,
    weight_granularity: str = "channel",
    min_bits: float | None = 1.0,
    noise: str = "threefry",
) -> Recipe:
    """GDNSQ: learned bit-widths driven to targets by the exterior-point penalty.

    ``weight_bits`` / ``act_bits`` are the TARGETS (None or 32: float). Weights get one learned
    log-step per output channel, activations a learned log-step and log-range (and lower bound
    when ``act_signed``; after a ReLU it stays 0). The penalty lives in the training loop
    (:mod:`qflax.train`, config group ``penalty``), which adds it whenever a model has such
    layers.

    Args:
      weight_bits: target bit-width of the weights.
      act_bits: target bit-width of the input activations.
      backward: the rounding-noise gradient rule: ``"noise"`` (the paper's: ``∂n/∂s = r/√3``,
        the default), ``"ste"`` (``∂n/∂s = 0``) or ``"lsq"`` (the reference code's
        ``∂n/∂s = n``); see :mod:`qflax.quantizers` ``GDNSQWeightConfig``.
      act_signed: learn the activations' lower bound (inputs not known to be >= 0).
      init_bits: the bit-width both start at (weights: per channel from the kernel's spread;
        activations: from the calibration batch's range); None: the code's fixed
        initialisation (ℓ = −12 for weights; ℓ_s = −10, ℓ_q = 10 for activations), made for
        runs of hundreds of epochs.
      weight_granularity: ``"channel"`` (the method) or ``"tensor"``.
      min_bits: the forward pass keeps at least ``2^min_bits`` levels per channel / input
        (1: never a constant channel or a one-level activation; the penalty still sees the
        unfloored bit-width). None: no floor, as the code — at 1-bit targets on mnist5k the
        activations then fell to one level and the accuracy to chance.
      noise: the draws of the noise rule's signs: ``"threefry"`` (the default; runs made
        before 2026-12-06 reproduce) or ``"hash"`` (a counter hash computed where it is used:
        nothing of the tensor's size drawn or stored, several times faster on CPU).
    """
    weight = act = None
    if not _is_float_bits(weight_bits, "weight_bits"):
        try:
            cfg = qz.GDNSQWeightConfig(
                backward=backward,
                noise=noise,
                init_bits=init_bits,
                granularity=weight_granularity,
                min_bits=min_bits,
            )
        except ValueError as e:
            raise ValueError(f"weight_bits: {e}") from None
        weight = TensorQuant(kind="gdnsq", config=cfg, target_bits=int(weight_bits))
    if not _is_float_bits(act_bits, "act_bits"):
        try:
            cfg = qz.GDNSQActConfig(
                backward=backward,
                noise=noise,
                signed=act_signed,
                init_bits=init_bits,
                init_log_range=None if init_bits is not None else 10.0,
                min_bits=min_bits,
            )
        except ValueError as e:
            raise ValueError(f"act_bits: {e}") from None
        act = TensorQuant(kind="gdnsq", config=cfg, target_bits=int(act_bits))
    return Recipe(weight=weight, act=act)


def dbssq(
    weight_bits: int | None = 2,
    act_bits: int | None = None,
    *,
    levels: str = "shift",
    rescale_grad: bool = True,
) -> Recipe:
    """DBSSQ (differentiable bit-shifting): the blend ``ε·x + (1 − ε)·Q(x)`` annealed to ``Q``.

    ``levels="shift"``: ``weight_bits`` shift bits (``2^b`` power-of-two magnitudes and a sign,
    so ``b + 1`` bits stored); ``"uniform"``: ``b``-bit codes without zero (``b = 1``: ±1).
    Weights are normalised per output channel and rescaled by the fixed pretrained spread;
    activations (when ``act_bits`` is given, with the same ``levels``) are batch-normalised
    without affine parameters. The training loop sets ``ε`` per epoch
    (:func:`~qflax.quantizers.dbssq_epsilon_schedule`) and to 0 after the last epoch.
    """

    def spec(bits, field, role):
        if _is_float_bits(bits, field):
            return None
        try:
            cfg = qz.DBSSQConfig(levels=levels, bits=int(bits), rescale_grad=rescale_grad)
        except ValueError as e:
            raise ValueError(f"{field}: {e}") from None
        return TensorQuant(kind="dbssq", config=cfg, role=role)

    return Recipe(
        weight=spec(weight_bits, "weight_bits", "weight"),
        act=spec(act_bits, "act_bits", "act"),
    )


def codeq(
    weight_bits: int | None = None,
    act_bits: int | None = None,
    *,
    quantile: float = 0.99,
    gradient: str = "ste",
) -> Recipe:
    """CoDeQ: weights on a dead-zone grid with a learned dead-zone width and bit-width (2..8).

    ``weight_bits=None`` learns the bit-width (``θ_b``); an int fixes it. Activations are
    absmax-uniform with ``act_bits`` (per tensor), or float when None. Sparsity and bits are
    driven by the decoupled decay of ``θ_d`` / ``θ_b`` (``quant.deadzone_decay`` /
    ``quant.bits_decay`` in the training config).
    """
    fixed = None if weight_bits is None or int(weight_bits) == FLOAT_BITS else int(weight_bits)
    try:
        cfg = qz.CoDeQConfig(fixed_bits=fixed, quantile=quantile, gradient=gradient)
    except ValueError as e:
        raise ValueError(f"weight_bits: {e}") from None
    weight = TensorQuant(kind="codeq", config=cfg)
    return Recipe(weight=weight, act=_uniform("absmax", act_bits, "act_bits"))


def hadamard_int4(
    weight_bits: int | None = 4,
    act_bits: int | None = 4,
    *,
    block: int = 32,
    bitsplit: bool = True,
    variant: str = "paper",
    lss: bool = True,
    grad_scale: bool = True,
) -> Recipe:
    """INT4 transformer training (Xi et al. 2023): Hadamard-rotated LSQ forward and
    bit-splitting gradients with leverage-score sampling (METHODS.md §7).

    Weights and input activations: :func:`qflax.quantizers.hadamard_quantize` (block-diagonal
    Hadamard of ``block`` along the contraction axis — the kernel's axis −2 for ``(in, out)``
    and ``(kh, kw, cin, cout)`` kernels, the input's last axis — and a learned LSQ step per
    tensor, signed codes), so the product is ``Q(X·H)·Q(W·H)ᵀ``. The output cotangent:
    ``"bitsplit"`` (``variant`` ``"paper"`` or ``"unbiased"``; ``lss``: leverage-score sampling
    in the ∇W product); ``bitsplit=False``: float gradients. ``recipes.build(...,
    grad=KIND)`` replaces the gradient quantizer (as for every recipe).

    >>> str(hadamard_int4())
    'w:hadamard4/b32 a:hadamard4/b32 g:bitsplit4/paper+lss'
    """

    def spec(bits, field, axis):
        if _is_float_bits(bits, field):
            return None
        try:
            cfg = qz.HadamardConfig(bits=int(bits), block=block, axis=axis, grad_scale=grad_scale)
        except ValueError as e:
            raise ValueError(f"{field}: {e}") from None
        return TensorQuant(kind="hadamard", config=cfg)

    if not isinstance(bitsplit, (bool, np.bool_)):
        raise ValueError(f"bitsplit={bitsplit!r} is not a bool; allowed: True, False")
    grad = None
    if bitsplit:
        grad = TensorQuant(kind="bitsplit", config=qz.BitSplitConfig(variant=variant, lss=lss))
    return Recipe(
        weight=spec(weight_bits, "weight_bits", -2),
        act=spec(act_bits, "act_bits", -1),
        grad=grad,
    )


def latent(kind: str = "fsq", **config: Any) -> Recipe:
    """A latent code: the activation quantizer ``kind`` (``"fsq"``, ``"q2d2"``, ``"vq"``,
    ``"rvq"``, ``"split"``, or any family that quantizes activations) with its config type built
    from ``config``; for a model's :class:`~qflax.layers.Latent` slot, by a rule on its path
    (e.g. ``("^latent$", "latent", {"kind": "fsq", "levels": (8, 5, 5, 5)})``). Lists become
    tuples (config files give lists).

    >>> str(latent("split", levels=4))
    'a:split4'
    """
    family = qz.get_family(kind)
    if not family.config_types:
        spec = TensorQuant(kind=kind)
    else:
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
        config_type = family.config_types[0]
        try:
            cfg = config_type(**values)
        except TypeError as error:
            fields = ", ".join(f.name for f in dataclasses.fields(config_type))
            raise ValueError(
                f"latent(kind={kind!r}) got {sorted(values)}; allowed keywords: {fields}"
            ) from error
        spec = TensorQuant(kind=kind, config=cfg)
    if "act" not in spec.roles:
        raise ValueError(
            f"kind={kind!r} quantizes {'/'.join(spec.roles)} tensors; allowed: a family that "
            "quantizes activations"
        )
    return Recipe(act=spec)


_RECIPES: dict[str, Callable[..., Recipe]] = {
    "float": float_recipe,
    "absmax": absmax,
    "learned_step": learned_step,
    "pow2": pow2,
    "binary": binary,
    "ternary": ternary,
    "lsq": lsq,
    "pact": pact,
    "dorefa": dorefa,
    "gdnsq": gdnsq,
    "dbssq": dbssq,
    "codeq": codeq,
    "hadamard_int4": hadamard_int4,
    "latent": latent,
}
# Name -> recipe factory (for configs: ``recipes.build(name, **kwargs)``): a read-only view of
# the built-in factories and those registered by user code (:func:`register_recipe`).
RECIPES: Mapping[str, Callable[..., Recipe]] = types.MappingProxyType(_RECIPES)


def register_recipe(
    name: str, factory: Callable[..., Recipe], *, replace: bool = False
) -> Callable[..., Recipe]:
    """Adds a recipe factory to :data:`RECIPES` (``--config.quant.recipe=NAME``).

    The factory takes ``weight_bits`` and ``act_bits`` (None or 32: float) and any keywords
    (``--config.recipe_kwargs.KEY=VALUE``), and returns a :class:`Recipe`. Registering a name
    twice is an error unless ``replace=True`` or it is the same function re-created (a config
    file imported again).
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"name={name!r} is not allowed for a recipe; allowed: a non-empty name")
    if not callable(factory):
        raise ValueError(f"factory={factory!r} is not allowed; allowed: a function -> Recipe")
    old = _RECIPES.get(name)
    same = old is not None and getattr(old, "__qualname__", None) == getattr(
        factory, "__qualname__", 0
    )
    if old is not None and not same and not replace:
        raise ValueError(
            f"a recipe named {name!r} is already registered; allowed: a new name, or replace=True"
        )
    _RECIPES[name] = factory
    return factory


# Keywords every recipe takes through `build` (and `recipe_kwargs` / rules in configs): the
# gradient quantizer of the layer's output cotangent (see `with_grad`) and the dtype of the
# forward product's operands (`Recipe.forward_dtype`).
GRAD_KEYWORDS = ("grad", "grad_bits", "grad_config")
RECIPE_KEYWORDS = (*GRAD_KEYWORDS, "forward_dtype")


def with_grad(recipe: Recipe, kind: str, bits: int | None = None, **config: Any) -> Recipe:
    """``recipe`` with its output cotangent quantized by the gradient family ``kind``.

    ``bits`` and ``config`` build the family's config (its first config type); e.g.
    ``with_grad(recipes.absmax(8, 8), "bhq", 5)`` trains with 5-bit block-Householder gradients.

    >>> str(with_grad(recipes.absmax(8, 8), "absmax", 8))
    'w:absmax8/channel a:absmax8 g:absmax8'
    """
    family = qz.get_family(kind)
    if not family.config_types:
        raise ValueError(f"grad={kind!r} has no config type; allowed: a family with a config")
    kwargs = dict(config)
    if bits is not None:
        kwargs["bits"] = bits
    try:
        cfg = family.config_types[0](**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"grad={kind!r}: {e}") from None
    return dataclasses.replace(recipe, grad=TensorQuant(kind=kind, config=cfg))


def build(name: str, **kwargs: Any) -> Recipe:
    """The recipe ``RECIPES[name](**kwargs)``; ValueError for an unknown name or argument.

    Every recipe also takes ``grad`` (a gradient family), ``grad_bits`` and ``grad_config``
    (a dict of that family's config fields): :func:`with_grad`; and ``forward_dtype``
    (:attr:`Recipe.forward_dtype`: ``"int8"`` runs the forward products on integer codes).

    >>> str(build("absmax", weight_bits=2, act_bits=None))
    'w:absmax2/channel'
    >>> str(build("absmax", weight_bits=8, act_bits=8, grad="absmax", grad_bits=6))
    'w:absmax8/channel a:absmax8 g:absmax6'
    """
    check_choice(name, "recipe", tuple(RECIPES))
    forward_dtype = kwargs.pop("forward_dtype", "float32")
    recipe = _build_with_grad(name, kwargs)
    if forward_dtype == recipe.forward_dtype:
        return recipe
    return dataclasses.replace(recipe, forward_dtype=forward_dtype)


def _build_with_grad(name: str, kwargs: dict[str, Any]) -> Recipe:
    grad = kwargs.pop("grad", None)
    grad_config = kwargs.pop("grad_config", None)
    if grad is None and grad_config:
        raise ValueError(
            f"grad_config={dict(grad_config)!r} is given without grad; allowed: grad=KIND (a "
            "gradient family) with it, or no grad_config"
        )
    grad_bits = kwargs.pop("grad_bits", None) if grad is not None else None
    try:
        recipe = RECIPES[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"recipe {name!r}: {e}") from None
    if grad is None:
        return recipe
    if recipe.weight is None and recipe.act is None and name == "float":
        raise ValueError(
            f"grad={grad!r} with recipe 'float' is not allowed; allowed: a quantizing recipe"
        )
    return with_grad(recipe, grad, grad_bits, **dict(grad_config or {}))


# The public namespace of factories: ``recipes.absmax(4, 4)``, ``recipes.build("pow2", ...)``.
recipes = types.SimpleNamespace(
    float=float_recipe,
    absmax=absmax,
    learned_step=learned_step,
    pow2=pow2,
    binary=binary,
    ternary=ternary,
    lsq=lsq,
    pact=pact,
    dorefa=dorefa,
    gdnsq=gdnsq,
    dbssq=dbssq,
    codeq=codeq,
    hadamard_int4=hadamard_int4,
    latent=latent,
    build=build,
    with_grad=with_grad,
    register=register_recipe,
)
