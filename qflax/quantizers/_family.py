"""The quantizer-family protocol and registry (DESIGN.md, core abstraction 7).

A *family* is everything the rest of qflax needs to know about one kind of quantizer: its
config type, the forward it applies (a module-level ``custom_vjp`` in the family's own module),
its data-dependent init, the shapes and optimizer tags of its learnable parameters, its
non-learned state, the integer bit-width it uses, its integer codes at rest (a
:class:`~qflax.quantizers.QArray`) and how integer inference lowers it, or why it cannot.
``qflax.layers``, ``qflax.export`` and ``qflax.train`` ask the family; they hold no per-kind
branches. Each built-in family is a subclass of :class:`QuantizerFamily` defined at the bottom
of its own module and registered with :func:`register_family`, exactly as a user's family is::

    class MyFamily(qz.QuantizerFamily):
        name = "my_sign"
        config_types = (MyConfig,)

        def apply(self, spec, x, params, *, key=None, stats=None):
            return my_quantizer(x, spec.config)

    qz.register_family(MyFamily())
    recipe = Recipe(weight=TensorQuant(kind="my_sign", config=MyConfig()))

Latent (vector) quantizers also describe their training-time state and losses (``losses``,
``update_stats``, ``calibrate_stats``: an EMA codebook, its k-means init, the commitment loss)
and their codes per vector (``indices``, ``from_indices``, ``codebook_size``, ``vector_dim``);
the defaults describe a scalar quantizer with neither.

Every method takes the :class:`~qflax.layers.TensorQuant` (``spec``: ``kind``, ``config``,
``target_bits``, ``role``) first. Learnable params are kept in a *compact* layout that does not
depend on the tensor's rank (``()`` per tensor, ``(C,)`` per channel, the quantizer's own shape
per group); :func:`compact` and :func:`expand` convert.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "InputLowering",
    "WeightLowering",
    "FAMILIES",
    "PARAM_TAGS",
    "ROLES",
    "NotExportable",
    "QuantizerFamily",
    "compact",
    "expand",
    "get_family",
    "register_family",
]

# The tensors a family can quantize (a family may also quantize the output cotangent: role
# "grad", the op's gradient slot; see QuantizerFamily.grad_slots).
ROLES = ("weight", "act")

# Optimizer tags a learnable quantizer param may carry (``QuantizerFamily.param_tags``):
# ``"clip"``: a learned clipping level (``quant.clip_decay`` adds an L2 term, as PACT's α);
# ``"deadzone"`` / ``"bits"``: CoDeQ-style dead-zone width and bit-width parameters, decayed
# (decoupled) by ``quant.deadzone_decay`` / ``quant.bits_decay``; ``"step"``: a positive step
# size learned directly (LSQ's ``s``), updated relative to its size when ``quant.relative_steps``.
PARAM_TAGS = ("clip", "deadzone", "bits", "step")


@dataclasses.dataclass(frozen=True)
class WeightLowering:
    """How integer inference runs a family's weights: ``kind`` is one of the integer formats
    its planner knows — ``"uniform"`` (integer codes at a scale per tensor or output channel,
    with an optional zero point), ``"pow2"`` (power-of-two codes: shifts), ``"codeq"``
    (dead-zone codes: two planes) or ``"binary"`` (±1: XNOR/popcount, the values from
    :meth:`QuantizerFamily.sign_values`); ``code_max`` bounds ``|code|`` when the spec fixes it
    (None: read from the codes); ``granularity``/``axis``: where the scale lives (integer
    inference needs it per tensor, per output channel or none)."""

    kind: str
    code_max: int | None = None
    granularity: str = "tensor"
    axis: int = -1


@dataclasses.dataclass(frozen=True)
class InputLowering:
    """How integer inference feeds a family's input quantizer: ``kind`` ``"codes"`` (uniform
    codes ``[qmin, qmax]`` at a static scale per tensor: ``scale``, or None when it is
    calibrated from data, as absmax's) or ``"sign"`` (±1 inputs of a binary layer).
    ``static`` says how a fake-quant reference applies calibrated scales: ``"required"``
    (the quantizer's scale is dynamic), ``"optional"`` (a given scale replaces the learned
    one) or None (the quantizer's own)."""

    kind: str
    qmin: int = 0
    qmax: int = 0
    scale: float | None = None
    static: str | None = None


class NotExportable(ValueError):
    """A tensor or layer that has no integer codes or no integer lowering (the reason is the
    message: it names the family and what is allowed)."""


class QuantizerFamily:
    """Base class of quantizer families: override what differs from these defaults.

    Class attributes: ``name`` (the ``TensorQuant.kind`` it answers to) and ``config_types``
    (the config classes a spec of this family may hold; the first one's ``()`` is the default
    config). Only :meth:`apply` must be written; a stateless, non-exportable quantizer of any
    tensor needs nothing else.
    """

    # The kind name (TensorQuant.kind).
    name: str = ""
    # Config classes a spec may hold (frozen dataclasses validated at construction).
    config_types: tuple[type, ...] = ()
    # Whether the family needs TensorQuant.role ("weight"/"act") to know its job (DBSSQ).
    needs_role: bool = False

    # ------------------------------------------------------------------ description

    def default_config(self) -> Any:
        """The config of ``TensorQuant(kind=name)`` without one."""
        if not self.config_types:
            return None
        return self.config_types[0]()

    def check(self, spec: Any) -> None:
        """Extra validation of ``spec`` beyond its config type (raise ValueError)."""

    def roles(self, spec: Any) -> tuple[str, ...]:
        """The tensors a spec can quantize: a subset of :data:`ROLES`."""
        return ROLES

    def bits(self, spec: Any) -> int:
        """Bits per value at rest (nominal: a learned bit-width reports its target)."""
        return int(spec.config.bits)

    def granularity(self, spec: Any) -> str:
        """Which elements share a scale: ``"tensor"``, ``"channel"``, ``"group"``, ``"none"``."""
        return str(getattr(spec.config, "granularity", "tensor"))

    def channel_axis(self, spec: Any) -> int:
        """The axis of per-channel scales and params."""
        return int(getattr(spec.config, "axis", -1))

    def describe(self, spec: Any) -> str:
        """A short name for tables and ``str(recipe)``: ``name`` and bits, and the granularity
        when it is neither per tensor nor none."""
        gran = self.granularity(spec)
        suffix = "" if gran in ("tensor", "none") else f"/{gran}"
        return f"{self.name}{self.bits(spec)}{suffix}"

    # ------------------------------------------------------------------ params and state

    def learnable(self, spec: Any) -> bool:
        """Whether :meth:`init` returns learnable params (``QuantParam`` s in the layer)."""
        return False

    def param_tags(self, spec: Any) -> Mapping[str, tuple[str, ...]]:
        """Optimizer tags (from :data:`PARAM_TAGS`) of each learnable param name; untagged
        params get only the quantizer learning rate and step clip."""
        return {}

    def init(self, spec: Any, x: jax.Array) -> dict[str, jax.Array]:
        """Data-dependent learnable params of ``x`` (compact layout, float32)."""
        return {}

    def placeholder(self, spec: Any, shape: tuple[int, ...]) -> dict[str, jax.Array]:
        """Params before any data is seen (activations before calibration): scale-like params
        1.0, zero points and lower bounds 0."""
        out = {}
        for name, s in param_shapes(self, spec, shape).items():
            fill = 0.0 if name in ("zero_point", "lower") else 1.0
            out[name] = jnp.full(s, fill, jnp.float32)
        return out

    def stats_init(self, spec: Any, x: jax.Array | None) -> dict[str, jax.Array]:
        """Non-learned quantizer state (``QuantStat`` s; float32, compact), e.g. a blend factor
        the training loop anneals. ``x``: the kernel for weights; for activations zeros of shape
        ``(1, features)`` when the layer knows its input features (running statistics are
        sized from it), else None."""
        return {}

    def training_stats(self, spec: Any, stats: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """The state :meth:`apply` sees in a training step (a layer in ``model.train()`` mode);
        outside training it sees all of ``stats``. A family whose forward normalises with
        running statistics at evaluation drops them here, so training uses the batch's own
        (and keeps them current in :meth:`update_stats`). Default: all of it."""
        return dict(stats)

    def stat_start(self, spec: Any, name: str) -> float:
        """The value the state ``name`` starts an annealing schedule from (e.g. a pair's μ)."""
        raise ValueError(f"kind={self.name!r} has no annealed state {name!r}")

    def schedule(self, spec: Any, *, epoch: int, epochs: int, anneal: Any) -> dict[str, Any]:
        """Values of the annealed state for ``epoch`` (0-based) of ``epochs``; ``epoch =
        epochs`` is the state training ends with (see :meth:`ends_exact`). ``anneal``: the
        training config's ``anneal`` group (e.g. ``mu_end``). ``{}``: nothing scheduled."""
        return {}

    def ends_exact(self, spec: Any) -> bool:
        """Whether training ends by switching this quantizer to an exact state (a blend at
        ε = 0, a relaxed pair's sign forward), evaluated after the relaxed one."""
        return False

    def needs_key(self, spec: Any) -> bool:
        """Whether :meth:`apply` needs a PRNG key (stochastic rounding or backward noise)."""
        return False

    # ------------------------------------------------------------------ quantize

    def apply(
        self,
        spec: Any,
        x: jax.Array,
        params: Mapping[str, jax.Array],
        *,
        key: jax.Array | None = None,
        stats: Mapping[str, jax.Array] | None = None,
    ) -> jax.Array:
        """The quantized ``x`` (shape and dtype kept), with the family's custom gradient."""
        raise NotImplementedError(f"family {self.name!r} defines no apply")

    # ------------------------------------------------------------------ bit-widths

    def learns_bits(self, spec: Any) -> bool:
        """Whether the bit-width is learned and driven to ``spec.target_bits`` by the penalty."""
        return False

    def bit_width(self, spec: Any, x: Any, params: Mapping[str, jax.Array]) -> jax.Array | None:
        """The continuous, differentiable bit-width the penalty sees (learned-bit families)."""
        return None

    def reads_bits(self, spec: Any) -> bool:
        """Whether the integer bit-width in use is read from the params (:meth:`used_bits`)."""
        return self.learns_bits(spec)

    def used_bits(self, spec: Any, x: Any, params: Mapping[str, jax.Array]) -> jax.Array | None:
        """The integer bit-width the quantizer actually uses (summaries and the convergence
        test of learned bit-widths); None: the nominal :meth:`bits`."""
        return None

    # ------------------------------------------------------------------ at rest

    def scale_count(self, spec: Any, shape: tuple[int, ...]) -> int:
        """Float values needed to decode a stored tensor of ``shape`` (scales, zero points)."""
        gran = self.granularity(spec)
        if gran == "none":
            return 0
        if gran == "tensor":
            return 1
        if gran == "group":
            return math.prod(shape) // int(spec.config.group_size)
        return int(shape[self.channel_axis(spec) % len(shape)])

    def stored_scales(self, spec: Any, shape: tuple[int, ...]) -> int:
        """Float values stored at rest besides the layer's ``QuantParam`` s (which summaries
        count themselves): :meth:`scale_count` for stateless families, 0 for learned ones."""
        return 0 if self.learnable(spec) else self.scale_count(spec, shape)

    def codes(
        self,
        spec: Any,
        x: jax.Array,
        params: Mapping[str, jax.Array],
        stats: Mapping[str, jax.Array] | None,
    ) -> Any:
        """The integer codes of ``apply(x)`` at rest: a :class:`~qflax.quantizers.QArray`
        (unpacked) whose ``dequantize`` gives the forward's values. Raises
        :class:`NotExportable` with the reason when the family has none."""
        raise NotExportable(
            f"kind={self.name!r} defines no integer codes (QuantizerFamily.codes); allowed: a "
            "family that implements codes, or keep this tensor in float for export"
        )

    def params_from_codes(self, spec: Any, q: Any) -> dict[str, jax.Array]:
        """The learned weight params held by an exported QArray (``import_model``): e.g. a
        learned step is the QArray's scale. ``{}``: none (they are read from the tree)."""
        return {}

    def import_kernel(self, spec: Any, q: Any) -> jax.Array:
        """A kernel the quantizer maps back to ``q``'s codes (``import_model``); the default
        is the dequantized tensor, which quantizers with a grid from the tensor map to itself.
        Raise :class:`NotExportable` when no kernel can (the reason names the family)."""
        from qflax.quantizers._qarray import dequantize

        return dequantize(q)

    def check_importable(self, spec: Any, path: str) -> None:
        """Raises :class:`NotExportable` when ``import_model`` cannot restore this family's
        weights (checked for every layer before anything is written)."""

    def weight_lowering(
        self, spec: Any, params: Mapping[str, Any], stats: Mapping[str, Any]
    ) -> WeightLowering:
        """How integer inference runs this family's weights (:class:`WeightLowering`;
        ``params``/``stats``: the layer's current values), or raise :class:`NotExportable`
        with the reason (the default: none defined)."""
        raise NotExportable(
            f"kind={self.name!r} defines no integer lowering of weights "
            "(QuantizerFamily.weight_lowering); allowed: a family that does, or a float layer"
        )

    def input_lowering(
        self, spec: Any, params: Mapping[str, Any], stats: Mapping[str, Any]
    ) -> InputLowering:
        """How integer inference feeds this family's input quantizer (:class:`InputLowering`;
        ``params``/``stats``: the layer's current values), or raise :class:`NotExportable`."""
        raise NotExportable(
            f"kind={self.name!r} defines no integer lowering of inputs "
            "(QuantizerFamily.input_lowering); allowed: a family that does, or a float layer"
        )

    # ------------------------------------------------------------------ integer operands

    def check_int8(self, spec: Any) -> None:
        """Raises :class:`NotExportable` (the reason) unless :meth:`int8_scale` holds for every
        tensor this spec quantizes: the forward's values are ``scale · c`` with integer codes
        ``c`` in ``[−128, 127]`` (what a training forward with ``forward_dtype="int8"`` needs).
        The default: not supported."""
        raise NotExportable(
            f"kind={self.name!r} defines no int8 operand (QuantizerFamily.int8_scale); "
            "allowed for forward_dtype='int8': absmax, learned_step, lsq (codes in [-128, 127]), "
            "pact, dorefa (<= 7 bits), binary, ternary, pairs with an exact forward, or a family "
            "that defines it"
        )

    def int8_scale(
        self,
        spec: Any,
        x: jax.Array,
        params: Mapping[str, jax.Array],
        stats: Mapping[str, jax.Array],
    ) -> jax.Array:
        """The scale ``s`` (broadcastable to ``x``, float32, no gradient) with
        ``apply(x) = s · c`` for integers ``c`` in ``[−128, 127]``; valid after
        :meth:`check_int8` passed. The product then runs on ``c`` (int8) and rescales once."""
        self.check_int8(spec)
        raise NotImplementedError(f"kind={self.name!r}: check_int8 passed but no int8_scale")

    # ------------------------------------------------------------------ gradients

    def grad_slots(self, spec: Any, key: jax.Array | None) -> Any:
        """The ``grad_quantizer`` a :mod:`qflax.ops` op gets when this spec quantizes a layer's
        output cotangent (``Recipe.grad``; the family's roles include ``"grad"``).

        Returns one callable ``g -> ĝ`` used for both backward products, or a pair
        ``(dlhs, drhs)`` (each a callable, a :func:`qflax.ops.with_operands` quantizer or None).
        The default: a stochastic family (:meth:`needs_key`) quantizes ``g`` twice with
        independent keys, once for each product (Chen et al. 2020); a deterministic one once.
        """
        stats = self.stats_init(spec, None)

        def bound(k):
            return lambda g: self.apply(spec, g, {}, key=k, stats=stats)

        if not self.needs_key(spec):
            return bound(None)
        if key is None:
            raise ValueError(
                f"kind={self.name!r} quantizes gradients stochastically and needs a PRNG key; "
                "allowed: a key (quant layers pass their noise key)"
            )
        k_lhs, k_rhs = jax.random.split(key)
        return bound(k_lhs), bound(k_rhs)

    def variance_bound(self, spec: Any, g: jax.Array) -> jax.Array | None:
        """An upper bound of ``E‖Q(g) − g‖²`` (summed over elements) of this gradient
        quantizer at the cotangent ``g``, as the family's paper states it; None: none known.
        Read by :func:`qflax.studies.gradient_variance`."""
        return None

    def sign_values(
        self, spec: Any, x: jax.Array, params: Mapping[str, Any], stats: Mapping[str, Any]
    ) -> tuple[jax.Array, jax.Array | None]:
        """``(y, α)`` with ``apply(x) = α·y`` and ``y = ±1`` (traceable): the weights of a
        ``"binary"`` lowering. Families whose weight lowering is binary define it."""
        raise NotExportable(f"kind={self.name!r} defines no sign values")

    # ------------------------------------------------------------------ training-time state

    def losses(
        self,
        spec: Any,
        x: jax.Array,
        params: Mapping[str, jax.Array],
        stats: Mapping[str, jax.Array],
    ) -> dict[str, jax.Array]:
        """Auxiliary training losses of quantizing ``x`` (float32 scalars, already weighted,
        differentiable in ``x`` and ``params``), e.g. a vector quantizer's codebook and
        commitment losses; a layer adds their sum to the task loss. ``{}``: none."""
        return {}

    def update_stats(
        self,
        spec: Any,
        x: jax.Array,
        params: Mapping[str, jax.Array],
        stats: Mapping[str, jax.Array],
        *,
        key: jax.Array | None,
    ) -> dict[str, jax.Array]:
        """The state after one training step that saw ``x`` (traceable; same names, shapes and
        dtypes as ``stats``), e.g. an EMA codebook and dead-code restarts. Default: unchanged."""
        return dict(stats)

    def calibrate_stats(
        self, spec: Any, x: jax.Array, stats: Mapping[str, jax.Array]
    ) -> dict[str, jax.Array]:
        """The state set from the first real tensor an activation quantizer sees
        (:func:`qflax.layers.calibrate`), e.g. a k-means codebook. Default: unchanged."""
        return dict(stats)

    # ------------------------------------------------------------------ codes per vector

    def codebook_size(self, spec: Any) -> int | None:
        """Distinct code vectors of a vector quantizer (its implicit or explicit codebook; a
        residual quantizer: the product over stages); None: not a vector quantizer."""
        return None

    def code_stages(self, spec: Any) -> int:
        """Codes per vector: 1, or a residual quantizer's stages (its :meth:`indices` then end
        in a stage axis, each stage a code of ``codebook_size ** (1 / stages)``)."""
        return 1

    def vector_dim(self, spec: Any) -> int | None:
        """Elements of the last axis coded together by one code (the vector length); None: not
        a vector quantizer."""
        return None

    def indices(
        self,
        spec: Any,
        x: jax.Array,
        params: Mapping[str, jax.Array],
        stats: Mapping[str, jax.Array],
    ) -> jax.Array:
        """The int32 code of every vector of ``x`` (shape ``x.shape[:-1]``, or with a trailing
        stage axis for residual quantizers). Raises :class:`NotExportable` when the family is
        not a vector quantizer."""
        raise NotExportable(
            f"kind={self.name!r} has no code indices (QuantizerFamily.indices); allowed: a "
            "vector quantizer (fsq, q2d2, vq, rvq)"
        )

    def from_indices(
        self,
        spec: Any,
        idx: jax.Array,
        params: Mapping[str, jax.Array],
        stats: Mapping[str, jax.Array],
    ) -> jax.Array:
        """The quantized vectors of codes ``idx`` (the inverse of :meth:`indices`)."""
        raise NotExportable(
            f"kind={self.name!r} has no code indices (QuantizerFamily.from_indices); allowed: "
            "a vector quantizer (fsq, q2d2, vq, rvq)"
        )

    def __repr__(self) -> str:
        return f"<quantizer family {self.name!r}>"


def param_shapes(family: QuantizerFamily, spec: Any, shape: tuple[int, ...]) -> dict[str, tuple]:
    """Shapes of ``family.init(spec, x)`` for a tensor of ``shape`` (no computation)."""
    out = jax.eval_shape(
        lambda x: family.init(spec, x), jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
    )
    return {k: tuple(v.shape) for k, v in out.items()}


# ---------------------------------------------------------------------------------- layouts


def compact(v: jax.Array, granularity: str) -> jax.Array:
    """A param in the quantizer's broadcast layout as the compact layout of a layer."""
    if granularity == "tensor":
        return jnp.reshape(v, ())
    if granularity == "channel":
        return jnp.reshape(v, (-1,))
    return v


def expand(v: Any, x: jax.Array, granularity: str, axis: int) -> jax.Array:
    """A compact param in the layout the quantizer takes for ``x`` (``()`` -> all-ones shape,
    ``(C,)`` -> ``C`` on ``axis``); checked against ``x``'s shape."""
    v = jnp.asarray(v)
    if granularity == "tensor":
        return jnp.reshape(v, (1,) * x.ndim)
    if granularity == "channel":
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(
                f"axis={axis} is out of range for a tensor of rank {x.ndim}; allowed: "
                f"{-x.ndim}..{x.ndim - 1}"
            )
        if v.ndim != 1 or v.shape[0] != x.shape[axis]:
            raise ValueError(
                f"a per-channel param of shape {v.shape} does not fit a tensor of shape "
                f"{x.shape} on axis={axis}; allowed: shape ({x.shape[axis]},)"
            )
        shape = [1] * x.ndim
        shape[axis % x.ndim] = x.shape[axis]
        return v.reshape(shape)
    return v


def first_value(v: Any) -> float:
    """A scalar state (e.g. a blend factor) as a Python float (eager)."""
    return float(np.asarray(v, np.float64).reshape(-1)[0])


# ---------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, QuantizerFamily] = {}

# Name -> family, read-only view of the registry (built-in and user families).
FAMILIES: Mapping[str, QuantizerFamily] = types.MappingProxyType(_REGISTRY)


def register_family(family: QuantizerFamily, *, replace: bool = False) -> QuantizerFamily:
    """Registers ``family`` under ``family.name`` (what ``TensorQuant(kind=...)`` names).

    Built-in families register themselves this way when :mod:`qflax.quantizers` is imported.
    Registering a name twice is an error unless ``replace=True`` (or it is the same object, so
    a config file imported twice is fine).

    Returns:
      ``family`` (so it can decorate an instance expression).
    """
    if not isinstance(family, QuantizerFamily):
        raise ValueError(
            f"family={family!r} is not allowed; allowed: an instance of "
            "qflax.quantizers.QuantizerFamily"
        )
    name = family.name
    if not isinstance(name, str) or not name or not name.strip() == name:
        raise ValueError(f"family.name={name!r} is not allowed; allowed: a non-empty name")
    if not isinstance(family.config_types, tuple) or not all(
        isinstance(t, type) for t in family.config_types
    ):
        raise ValueError(
            f"family {name!r}: config_types={family.config_types!r} is not allowed; allowed: a "
            "tuple of config classes"
        )
    old = _REGISTRY.get(name)
    if old is not None and old is not family and not replace:
        if type(old) is type(family) and type(old).__qualname__ == type(family).__qualname__:
            # The same class re-created (a config file imported again): keep the newest.
            _REGISTRY[name] = family
            return family
        raise ValueError(
            f"a quantizer family named {name!r} is already registered ({old!r}); allowed: a new "
            "name, or register_family(..., replace=True)"
        )
    _REGISTRY[name] = family
    return family


def get_family(name: Any) -> QuantizerFamily:
    """The registered family ``name``; ValueError naming the registered ones otherwise."""
    family = _REGISTRY.get(name) if isinstance(name, str) else None
    if family is None:
        allowed = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"kind={name!r} is not allowed; allowed: {allowed}")
    return family
