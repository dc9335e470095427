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
import numbers
import types
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from qflax import quantizers as qz
from qflax.numerics import check_choice

__all__ = ["KINDS", "RECIPES", "Recipe", "TensorQuant", "recipes"]

# The quantizer families a TensorQuant can name.
KINDS = (
    "absmax",
    "learned_step",
    "pow2",
    "binary",
    "ternary",
    "pair",
    "lsq",
    "pact",
    "dorefa",
    "gdnsq",
    "dbssq",
    "codeq",
)

_CONFIG_TYPES = {
    "absmax": qz.UniformConfig,
    "learned_step": qz.UniformConfig,
    "pow2": qz.PowerOfTwoConfig,
    "binary": qz.BinaryConfig,
    "ternary": qz.TernaryConfig,
    "pair": type(None),
    "lsq": qz.LSQConfig,
    "pact": qz.PACTConfig,
    "dorefa": qz.DoReFaConfig,
    "gdnsq": (qz.GDNSQWeightConfig, qz.GDNSQActConfig),
    "dbssq": qz.DBSSQConfig,
    "codeq": qz.CoDeQConfig,
}

# Kinds whose params are learned (QuantParam in the layer).
_LEARNABLE = ("learned_step", "lsq", "pact", "gdnsq", "codeq")
# Kinds whose integer bit-width is learned and read from the params (`used_bits`).
_LEARNED_BITS = ("gdnsq", "codeq")
ROLES = ("weight", "act")

# Bits of a float tensor in summaries.
FLOAT_BITS = 32


def _check_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{field}={value!r} is not an integer; allowed: an int axis")
    return int(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorQuant:
    """How one tensor is quantized: a quantizer family (``kind``) and its config.

    Kinds:

    * ``"absmax"``: :func:`qflax.quantizers.uniform` with the scale recomputed from the tensor on
      every call (``uniform_init`` of ``stop_gradient(x)``: ``s = max|x| / qmax`` at the config's
      granularity); no learnable params.
    * ``"learned_step"``: :func:`~qflax.quantizers.uniform` with ``learn_scale=True``; the scale
      (and the zero point when asymmetric) is a learnable param, initialised by :meth:`init`
      from data (``uniform_init``).
    * ``"pow2"``: :func:`~qflax.quantizers.pow2` with the power-of-two scale recomputed from the
      tensor on every call (``pow2_init``); no learnable params.
    * ``"binary"`` / ``"ternary"``: :func:`~qflax.quantizers.binary` /
      :func:`~qflax.quantizers.ternary` (scales from the tensor); no learnable params.
    * ``"pair"``: a ProxConnect++ pair from :data:`qflax.quantizers.PAIRS` (``pair`` names it,
      ``pair_kwargs`` are its factory's arguments), times ``stop_gradient(mean|x|)`` per tensor or
      per channel when ``scaling`` says so (XNOR-style); no learnable params. Pair
      hyperparameters are static here (changing them recompiles).
    * ``"lsq"``: :func:`~qflax.quantizers.lsq` (LSQConfig): learned step with the paper's
      gradient scale and ``2·mean|x|/√QP`` initialisation.
    * ``"pact"``: :func:`~qflax.quantizers.pact` (PACTConfig): learned clip ``α`` (activations).
    * ``"dorefa"``: :func:`~qflax.quantizers.dorefa` (DoReFaConfig, role weight or act); no
      params.
    * ``"gdnsq"``: :func:`~qflax.quantizers.gdnsq_weight` (GDNSQWeightConfig) or
      :func:`~qflax.quantizers.gdnsq_act` (GDNSQActConfig): learned log-step (and log-range,
      lower bound) so the bit-width itself is learned; ``target_bits`` is the bit-width the
      exterior-point penalty drives it to (:mod:`qflax.train`), and :meth:`bits` reports it
      (a layer's ``quant_info`` reports the integer bit-width actually used).
    * ``"dbssq"``: :func:`~qflax.quantizers.dbssq_weight` (``role="weight"``: per-channel
      normalisation, rescaled by the fixed pretrained spread ``sigma``, a ``QuantStat`` set from
      the kernel when the layer is built) or :func:`~qflax.quantizers.dbssq_act`
      (``role="act"``); the blend ``ε`` is a ``QuantStat`` the training loop anneals
      (:func:`~qflax.quantizers.dbssq_epsilon_schedule`, 0 at the end: the exact quantizer).
    * ``"codeq"``: :func:`~qflax.quantizers.codeq` (weights): learned dead-zone ``θ_d`` and
      bit-width ``θ_b`` (``QuantParam`` s; their decoupled decay is the optimizer's
      ``quant.deadzone_decay`` / ``quant.bits_decay``).

    Pairs whose factory takes ``mu`` (``pc``, ``proxquant``, ``bnn++``) keep ``μ`` as a
    ``QuantStat`` too, so the loop can anneal it (``anneal.mu_end``) without recompiling.

    >>> TensorQuant(kind="absmax", config=qz.UniformConfig(bits=4)).bits
    4
    >>> TensorQuant(kind="pair", pair="bnn", scaling="channel").bits
    1
    """

    # Quantizer family: one of KINDS.
    kind: str
    # The family's config (UniformConfig, PowerOfTwoConfig, BinaryConfig, TernaryConfig); None:
    # the family's default config (learned_step: UniformConfig(learn_scale=True)); None for pairs.
    config: Any = None
    # kind="pair": the name of the pair in qflax.quantizers.PAIRS ("bnn", "bnn+", "bc", ...).
    pair: str | None = None
    # kind="pair": keyword arguments of the pair's factory, as sorted (name, value) tuples (a
    # mapping is accepted and converted).
    pair_kwargs: tuple[tuple[str, Any], ...] = ()
    # kind="pair": output scale "none" (±1), "tensor" or "channel" (sg(mean|x|), per `axis`).
    scaling: str = "none"
    # kind="pair": the channel axis of scaling="channel".
    axis: int = -1
    # kind="pair": the pair acts on x / sg(mean|x|) (per channel with scaling="channel", else per
    # tensor), so its μ/β are scale-free (latent weights are ~0.02-0.05 in size: at μ = 50
    # BNN++'s SS_μ(w) is far from a sign); False: on x itself (the pair's own definition).
    normalize: bool = False
    # kind="gdnsq": the target bit-width of the learned bit-width (1..32); None otherwise.
    target_bits: int | None = None
    # kind="dbssq": "weight" or "act" (which normalisation); None otherwise.
    role: str | None = None

    def __post_init__(self):
        check_choice(self.kind, "kind", KINDS)
        config = self.config
        if config is None and self.kind != "pair":
            if self.kind == "learned_step":
                config = qz.UniformConfig(learn_scale=True)
            elif self.kind == "gdnsq":
                config = qz.GDNSQWeightConfig()
            else:
                config = _CONFIG_TYPES[self.kind]()
            object.__setattr__(self, "config", config)
        want = _CONFIG_TYPES[self.kind]
        if not isinstance(config, want):
            if self.kind == "pair":
                allowed = "None"
            elif isinstance(want, tuple):
                allowed = " or ".join(f"a {w.__name__}" for w in want) + " (or None)"
            else:
                allowed = f"a {want.__name__} (or None)"
            raise ValueError(
                f"config={config!r} does not fit kind={self.kind!r}; allowed: {allowed}"
            )
        if self.kind == "gdnsq":
            t = self.target_bits
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 1 <= t <= 32:
                raise ValueError(
                    f"target_bits={t!r} is not allowed for kind='gdnsq'; allowed: integers 1..32"
                )
        elif self.target_bits is not None:
            raise ValueError(
                f"target_bits={self.target_bits!r} is only used with kind='gdnsq'; allowed for "
                f"kind={self.kind!r}: None"
            )
        if self.kind == "dbssq":
            check_choice(self.role, "role", ROLES)
        elif self.role is not None:
            raise ValueError(
                f"role={self.role!r} is only used with kind='dbssq'; allowed for "
                f"kind={self.kind!r}: None"
            )
        if self.kind == "learned_step" and not config.learn_scale:
            raise ValueError(
                "config.learn_scale=False is not allowed for kind='learned_step'; allowed: True"
            )
        if self.kind == "absmax" and (config.learn_scale or config.learn_zero_point):
            raise ValueError(
                "config.learn_scale/learn_zero_point=True is not allowed for kind='absmax' (its "
                "scale is recomputed from the tensor); allowed: False, or kind='learned_step'"
            )
        if self.kind == "pair":
            check_choice(self.pair, "pair", tuple(qz.PAIRS))
            kwargs = self.pair_kwargs
            if isinstance(kwargs, Mapping):
                kwargs = tuple(sorted(kwargs.items()))
            kwargs = tuple(tuple(item) for item in kwargs)
            for item in kwargs:
                if len(item) != 2 or not isinstance(item[0], str):
                    raise ValueError(
                        f"pair_kwargs={self.pair_kwargs!r} is not allowed; allowed: a mapping "
                        "or (name, value) pairs"
                    )
                if not isinstance(item[1], numbers.Real) or isinstance(item[1], bool):
                    raise ValueError(
                        f"pair_kwargs[{item[0]!r}]={item[1]!r} is not allowed; allowed: a number"
                    )
            object.__setattr__(self, "pair_kwargs", kwargs)
            try:
                qz.PAIRS[self.pair](**dict(kwargs))  # validates the arguments now
            except TypeError:
                allowed = ", ".join(self.pair_defaults()) or "none"
                raise ValueError(
                    f"pair_kwargs={dict(kwargs)!r} are not arguments of pair {self.pair!r}; "
                    f"allowed: {allowed}"
                ) from None
            check_choice(self.scaling, "scaling", qz.SCALINGS)
            _check_int(self.axis, "axis")
            if not isinstance(self.normalize, (bool, np.bool_)):
                raise ValueError(
                    f"normalize={self.normalize!r} is not allowed; allowed: True or False"
                )
        else:
            if self.normalize:
                raise ValueError(
                    f"normalize=True is only used with kind='pair'; allowed for "
                    f"kind={self.kind!r}: False"
                )
            if self.pair is not None or self.pair_kwargs:
                raise ValueError(
                    f"pair={self.pair!r} is only used with kind='pair'; allowed for "
                    f"kind={self.kind!r}: None"
                )
            if self.scaling != "none":
                raise ValueError(
                    f"scaling={self.scaling!r} is only used with kind='pair' (the {self.kind} "
                    "config holds its own); allowed: 'none'"
                )

    # ---------------------------------------------------------------- description

    @property
    def bits(self) -> int:
        """Bits per value at rest: the config's bits; binary and pairs 1; ternary 2; GDNSQ its
        target (the layer reports the bit-width actually used)."""
        if self.kind in ("absmax", "learned_step", "pow2", "lsq", "pact", "dorefa"):
            return int(self.config.bits)
        if self.kind == "gdnsq":
            return int(self.target_bits)
        if self.kind == "dbssq":  # shift: 2^b magnitudes and a sign; uniform: b-bit codes
            return int(self.config.bits) + (1 if self.config.levels == "shift" else 0)
        if self.kind == "codeq":
            return 8 if self.config.fixed_bits is None else int(self.config.fixed_bits)
        if self.kind == "ternary":
            return 2
        return 1

    @property
    def granularity(self) -> str:
        """Which elements share a scale: ``"tensor"``, ``"channel"``, ``"group"`` or ``"none"``."""
        if self.kind in ("absmax", "learned_step", "pow2", "lsq"):
            return self.config.granularity
        if self.kind == "gdnsq":
            return getattr(self.config, "granularity", "tensor")
        if self.kind in ("pact", "dorefa", "codeq"):
            return "tensor"
        if self.kind == "dbssq":
            return "channel" if self.role == "weight" else "none"
        return self.scaling if self.kind == "pair" else self.config.scaling

    @property
    def learnable(self) -> bool:
        """Whether :meth:`init` returns learnable params (learned_step, lsq, pact, gdnsq)."""
        return self.kind in _LEARNABLE

    @property
    def reads_bits(self) -> bool:
        """Whether the integer bit-width is read from learned params (GDNSQ, CoDeQ)."""
        return self.kind in _LEARNED_BITS

    @property
    def learns_bits(self) -> bool:
        """Whether the bit-width itself is learned (``"gdnsq"``): see :meth:`bit_width`."""
        return self.kind == "gdnsq"

    @property
    def is_act_only(self) -> bool:
        """Quantizers defined for activations only (PACT, DoReFa/GDNSQ in their act role)."""
        return (
            self.kind == "pact"
            or (self.kind == "dorefa" and self.config.role == "act")
            or (self.kind == "gdnsq" and isinstance(self.config, qz.GDNSQActConfig))
            or (self.kind == "dbssq" and self.role == "act")
        )

    @property
    def is_weight_only(self) -> bool:
        """Quantizers defined for weights only (CoDeQ, DBSSQ's weight role)."""
        return self.kind == "codeq" or (self.kind == "dbssq" and self.role == "weight")

    @property
    def needs_key(self) -> bool:
        """Whether :meth:`apply` needs a PRNG key (GDNSQ's noise-scale backward rule)."""
        return self.kind == "gdnsq" and self.config.backward == "noise"

    def __str__(self) -> str:
        name = f"pair:{self.pair}" if self.kind == "pair" else self.kind
        gran = self.granularity
        return f"{name}{self.bits}" + ("" if gran in ("tensor", "none") else f"/{gran}")

    # ---------------------------------------------------------------- params

    def init(self, x: ArrayLike) -> dict[str, jax.Array]:
        """Data-dependent learnable params (compact layout, float32); ``{}`` for stateless kinds.

        ``"learned_step"``: ``{"scale": s}`` (plus ``"zero_point"`` when asymmetric) from
        :func:`qflax.quantizers.uniform_init` of ``x`` (absmax-based for symmetric configs);
        ``"lsq"``: ``{"step"}`` (:func:`~qflax.quantizers.lsq_init`); ``"pact"``: ``{"alpha"}``;
        ``"gdnsq"``: ``{"log_step"}`` (weights) or ``{"log_step", "log_range", "lower"}``.
        """
        if not self.learnable:
            return {}
        x = jax.lax.stop_gradient(jnp.asarray(x))
        if self.kind == "learned_step":
            params = qz.uniform_init(x, self.config)
            if self.config.symmetric:
                params = {"scale": params["scale"]}
        elif self.kind == "lsq":
            params = qz.lsq_init(x, self.config)
        elif self.kind == "pact":
            return qz.pact_init(x, self.config)
        elif self.kind == "codeq":
            return qz.codeq_init(x, self.config)
        elif isinstance(self.config, qz.GDNSQActConfig):
            return qz.gdnsq_act_init(x, self.config)
        else:
            params = qz.gdnsq_weight_init(x, self.config)
        return {k: self._compact(v) for k, v in params.items()}

    def stats_init(self, x: ArrayLike | None) -> dict[str, jax.Array]:
        """Non-learned state of the quantizer (float32, compact): DBSSQ's ``epsilon`` (1.0 at
        the start) and, for weights, ``sigma`` (the per-channel std of ``x``, the pretrained
        spread); a pair's ``mu`` when its factory takes one, and ``hard`` (0.0) when its forward
        is not a sign (:attr:`relaxed`). ``{}`` otherwise."""
        if self.kind == "dbssq":
            out = {"epsilon": jnp.ones((), jnp.float32)}
            if self.role == "weight":
                sigma = qz.dbssq_weight_init(jax.lax.stop_gradient(jnp.asarray(x)), axis=-1)
                out["sigma"] = jnp.asarray(sigma, jnp.float32).reshape(-1)
            return out
        if self.kind == "pair":
            out = {}
            if "mu" in self.pair_defaults():
                mu = dict(self.pair_kwargs).get("mu", self.pair_defaults()["mu"])
                out["mu"] = jnp.asarray(mu, jnp.float32)
            if self.relaxed:
                out["hard"] = jnp.zeros((), jnp.float32)
            return out
        return {}

    @property
    def relaxed(self) -> bool:
        """A pair whose forward is not a sign (``pc``, ``proxquant``, ``bnn++``): its layers keep
        a ``hard`` stat, 0 while training (the pair's forward) and 1 for the exact binary model
        (``sign`` forward, same scaling) that training ends with."""
        if self.kind != "pair":
            return False
        return qz.PAIRS[self.pair](**dict(self.pair_kwargs)).forward is not qz.sign

    def pair_defaults(self) -> dict[str, Any]:
        """The keyword defaults of the pair's factory (``{}`` for other kinds)."""
        if self.kind != "pair":
            return {}
        import inspect

        sig = inspect.signature(qz.PAIRS[self.pair])
        return {k: v.default for k, v in sig.parameters.items()}

    def placeholder(self, shape: tuple[int, ...]) -> dict[str, jax.Array]:
        """Params for a tensor of ``shape`` before any data is seen (activations before
        :func:`~qflax.layers.calibrate`): scale/step/α 1.0 (PACT: its ``init_alpha``), zero
        point 0, GDNSQ activations their config's data-free init (``init_log_range`` of the
        code, or ℓ_q = 0 when it takes the range from data)."""
        if self.kind == "gdnsq" and isinstance(self.config, qz.GDNSQActConfig):
            cfg = self.config
            if cfg.init_log_range is None:
                cfg = dataclasses.replace(cfg, init_log_range=0.0)
            return qz.gdnsq_act_init(None, cfg)
        if self.kind == "pact":
            return qz.pact_init(jnp.ones(()), self.config)
        out = {}
        for name, s in self.param_shapes(shape).items():
            fill = 0.0 if name in ("zero_point", "lower") else 1.0
            if name == "log_step":
                fill = float(self.config.init_log_step)
            out[name] = jnp.full(s, fill, jnp.float32)
        return out

    def param_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Shapes of :meth:`init`'s params for a tensor of ``shape`` (no computation)."""
        out = jax.eval_shape(self.init, jax.ShapeDtypeStruct(tuple(shape), jnp.float32))
        return {k: tuple(v.shape) for k, v in out.items()}

    def scale_count(self, shape: tuple[int, ...]) -> int:
        """Number of float scale values needed to dequantize a stored tensor of ``shape``.

        One per tensor, one per channel or per group, and 0 for unscaled binary/ternary/pairs.
        Zero points of asymmetric configs count too.
        """
        gran = self.granularity
        if gran == "none":
            return 0
        if self.kind == "dorefa":  # codes of [-1, 1]: no scale, except sign·mean|w| at k = 1
            return 1 if self.config.bits == 1 and self.config.role == "weight" else 0
        if self.kind in ("absmax", "learned_step"):
            per = 1 if self.config.symmetric else 2
        elif self.kind == "codeq":
            per = 2  # the step s and the shift of the first level
        else:
            per = 1
        if gran == "tensor":
            return per
        if gran == "group":
            return per * int(np.prod(shape)) // self.config.group_size
        return per * int(shape[self.channel_axis % len(shape)])

    @property
    def channel_axis(self) -> int:
        """The axis of per-channel scales (the pair's ``axis``; -1 for DBSSQ weights)."""
        if self.kind == "pair":
            return self.axis
        if self.kind == "dbssq":
            return -1
        return getattr(self.config, "axis", -1)

    def _compact(self, v: jax.Array) -> jax.Array:
        gran = self.granularity
        if gran == "tensor":
            return v.reshape(())
        if gran == "channel":
            return v.reshape(-1)
        return v

    def _expand_all(self, params: Mapping[str, ArrayLike], x: jax.Array) -> dict[str, jax.Array]:
        """Every compact param of ``params`` in the full layout the quantizer takes for ``x``."""
        return {k: self._expand(jnp.asarray(v), x) for k, v in params.items()}

    def _expand(self, v: jax.Array, x: jax.Array) -> jax.Array:
        gran = self.granularity
        if gran == "tensor":
            return jnp.reshape(v, (1,) * x.ndim)
        if gran == "channel":
            axis = self.channel_axis
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
        stats = self.stats_init(x) if stats is None else dict(stats)
        if self.kind == "codeq":
            return qz.codeq(x, params, self.config)
        if self.kind == "dbssq":
            if self.role == "act":
                return qz.dbssq_act(x, stats["epsilon"], self.config)
            sigma = self._expand(jnp.asarray(stats["sigma"]), x)
            return qz.dbssq_weight(x, stats["epsilon"], sigma, self.config, axis=-1)
        if self.kind == "learned_step":
            missing = {"scale"} - set(params)
            if missing:
                raise ValueError(
                    "params is missing 'scale' for kind='learned_step'; allowed: the dict "
                    "returned by TensorQuant.init"
                )
            full = self._expand_all(params, x)
            return qz.uniform(x, full, self.config, key=key)
        if self.kind == "lsq":
            full = self._expand_all(params, x)
            return qz.lsq(x, full, self.config)
        if self.kind == "pact":
            return qz.pact(x, params, self.config)
        if self.kind == "dorefa":
            return qz.dorefa(x, params, self.config)
        if self.kind == "gdnsq":
            if self.needs_key and key is None:
                raise ValueError(
                    "key=None is not allowed for a GDNSQ quantizer with backward='noise'; "
                    "allowed: a PRNG key (the quant layers pass one per call)"
                )
            if isinstance(self.config, qz.GDNSQActConfig):
                return qz.gdnsq_act(x, params, self.config, key=key)
            full = self._expand_all(params, x)
            return qz.gdnsq_weight(x, full, self.config, key=key)
        if params:
            raise ValueError(
                f"params={sorted(params)!r} is not allowed for kind={self.kind!r}; allowed: {{}}"
            )
        if self.kind == "absmax":
            stats = qz.uniform_init(jax.lax.stop_gradient(x), self.config)
            stats = jax.lax.stop_gradient(stats)
            if self.config.symmetric:
                stats = {"scale": stats["scale"]}
            return qz.uniform(x, stats, self.config, key=key)
        if self.kind == "pow2":
            return qz.pow2(x, qz.pow2_init(jax.lax.stop_gradient(x), self.config), self.config)
        if self.kind == "binary":
            return qz.binary(x, {}, self.config, key=key)
        if self.kind == "ternary":
            return qz.ternary(x, {}, self.config)
        # pair
        y, alpha = self.pair_values(x, stats)
        return y if alpha is None else alpha.astype(x.dtype) * y

    def pair_values(
        self, x: jax.Array, stats: Mapping[str, ArrayLike] | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        """A pair's forward before its output scale: ``(y, α)`` with ``apply(x) = α·y`` (α
        None for ``scaling="none"``). ``y`` is the pair's forward of ``x`` (of ``x/α`` when
        ``normalize``), or ``sign(x)`` where ``stats["hard"]`` is set (traceable)."""
        stats = dict(stats or {})
        kwargs = dict(self.pair_kwargs)
        if "mu" in stats:
            kwargs["mu"] = stats["mu"]
        pair = qz.PAIRS[self.pair](**kwargs)
        alpha = None  # the output scale sg(mean|x|), also the normaliser when normalize=True
        if self.scaling != "none":
            alpha = qz.binary_scale(x, qz.BinaryConfig(scaling=self.scaling, axis=self.axis))
        if self.normalize:  # F and B on x/a (a no-gradient scale): y = F(x/a), dy/dx = B′(x/a)/a
            a = alpha
            if a is None:
                a = qz.binary_scale(x, qz.BinaryConfig(scaling="tensor"))
            a = jnp.maximum(a, jnp.finfo(jnp.float32).tiny).astype(x.dtype)
            y = pair(x / a).astype(x.dtype)
        else:
            y = pair(x).astype(x.dtype)
        if "hard" in stats:  # the exact binary model: sign forward (no gradient)
            y = jnp.where(jnp.asarray(stats["hard"]) > 0, qz.sign(x).astype(x.dtype), y)
        return y, alpha

    def quantizer(
        self,
        params: Mapping[str, ArrayLike] | None = None,
        *,
        key: jax.Array | None = None,
        stats: Mapping[str, ArrayLike] | None = None,
    ) -> Callable:
        """``x -> self.apply(x, params, key=key, stats=stats)``: a slot for :mod:`qflax.ops`."""
        return _Bound(self, dict(params or {}), key, stats)

    # ---------------------------------------------------------------- learned bit-widths

    def bit_width(self, x: ArrayLike, params: Mapping[str, ArrayLike]) -> jax.Array | None:
        """The continuous, differentiable bit-width (``"gdnsq"``; None for other kinds).

        Weights: one per output channel (compact shape, ``b_c = log2(spread_c + s_c) − ℓ_c``);
        activations: a scalar ``ℓ_q − ℓ_s``. ``x`` is the tensor (weights) or ignored (acts).
        """
        if self.kind != "gdnsq":
            return None
        if isinstance(self.config, qz.GDNSQActConfig):
            return qz.gdnsq_act_bits(params)
        x = jnp.asarray(x)
        full = self._expand_all(params, x)
        return self._compact(qz.gdnsq_weight_bits(x, full, self.config))

    def used_bits(self, x: ArrayLike, params: Mapping[str, ArrayLike]) -> jax.Array | None:
        """The integer bit-width this quantizer actually uses (``"gdnsq"``; None otherwise).

        As the code's convergence test: ``ceil(log2(max code − min code + 1))``, the widest
        channel for weights; activations ``ceil(log2(round(2^(ℓ_q − ℓ_s))))``, the codes of
        the whole clip range ``[β, β + 2^ℓ_q − s]`` (not only those a batch happens to reach).
        """
        if self.kind == "codeq":
            return qz.codeq_bits(params, self.config).astype(jnp.int32)
        if self.kind != "gdnsq":
            return None
        if isinstance(self.config, qz.GDNSQActConfig):
            bits = qz.gdnsq_act_bits(params)
            if self.config.min_bits is not None:  # the forward pass's floor
                bits = jnp.maximum(bits, float(self.config.min_bits))
            levels = jnp.maximum(jnp.round(jnp.exp2(bits)), 1.0)
        else:
            x = jnp.asarray(x)
            full = self._expand_all(params, x)
            codes = qz.gdnsq_weight_codes(x, full, self.config)
            levels = (jnp.max(codes) - jnp.min(codes) + 1).astype(jnp.float32)
        return jnp.ceil(jnp.log2(levels) - 1e-6).astype(jnp.int32)


class _Bound:
    """A TensorQuant with its params bound: the callable handed to an op's quantizer slot."""

    def __init__(self, spec: TensorQuant, params: dict[str, jax.Array], key=None, stats=None):
        self.spec = spec
        self.params = params
        self.key = key
        self.stats = stats

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.spec.apply(x, self.params, key=self.key, stats=self.stats)


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
    # Quantizer of the output cotangent before both backward products (stateless kinds only:
    # absmax, pow2); None: float gradients.
    grad: TensorQuant | None = None

    def __post_init__(self):
        _check_tensor_quant(self.weight, "weight")
        _check_tensor_quant(self.act, "act")
        _check_tensor_quant(self.grad, "grad")
        if self.grad is not None and self.grad.kind not in ("absmax", "pow2"):
            raise ValueError(
                f"grad.kind={self.grad.kind!r} is not allowed; allowed: 'absmax', 'pow2' "
                "(stateless, deterministic gradient quantizers)"
            )
        for role in ("weight", "act"):
            tq = getattr(self, role)
            if tq is None:
                continue
            if role == "weight" and tq.is_act_only:
                raise ValueError(
                    f"weight={tq} is an activation quantizer; allowed for weights: kinds "
                    "absmax, learned_step, pow2, binary, ternary, pair, lsq, dorefa "
                    "(role='weight'), gdnsq (GDNSQWeightConfig)"
                )
            if role == "act" and (
                tq.is_weight_only or (tq.kind in ("dorefa", "gdnsq") and not tq.is_act_only)
            ):
                raise ValueError(
                    f"act={tq} is a weight quantizer; allowed for activations: "
                    "DoReFaConfig(role='act'), GDNSQActConfig, dbssq with role='act', or the "
                    "kinds absmax, learned_step, pow2, binary, ternary, pair, lsq, pact"
                )
        if self.act is not None and self.act.kind in ("learned_step", "lsq"):
            if self.act.config.granularity == "group":
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
    **pair_kwargs: Any,
) -> Recipe:
    """Binary weights (and activations): a ProxConnect++ pair, or the plain binary quantizer.

    Args:
      pair: name in :data:`qflax.quantizers.PAIRS` (``"bnn"``, ``"bnn+"``, ``"bnn++"``, ``"bc"``,
        ...) used for weights and activations; None: :func:`qflax.quantizers.binary` with the
        BNN clipped straight-through gradient.
      scaling: weight scale ``"none"``, ``"tensor"`` or ``"channel"`` (``sg(mean|w|)``); the
        activations are never scaled (±1).
      act: binarize the input activations too.
      normalize: the pair acts on ``x / sg(mean|x|)`` (weights per channel with
        ``scaling="channel"``, activations per tensor), so ``μ``/``β`` do not depend on the
        tensor's scale (see :class:`TensorQuant`); the exact forward ``sign`` is unchanged.
      **pair_kwargs: arguments of the pair's factory (``mu=``, ``beta=``); None values are
        dropped (the pair's default), so one config can name any pair.
    """
    pair_kwargs = {k: v for k, v in pair_kwargs.items() if v is not None}
    if pair is None:
        if pair_kwargs or normalize:
            extra = {**pair_kwargs, **({"normalize": True} if normalize else {})}
            raise ValueError(f"{extra!r} need a pair; allowed: none with pair=None")
        weight = TensorQuant(kind="binary", config=qz.BinaryConfig(scaling=scaling))
        act_q = TensorQuant(kind="binary", config=qz.BinaryConfig()) if act else None
    else:
        weight = TensorQuant(
            kind="pair", pair=pair, pair_kwargs=pair_kwargs, scaling=scaling, normalize=normalize
        )
        act_q = (
            TensorQuant(kind="pair", pair=pair, pair_kwargs=pair_kwargs, normalize=normalize)
            if act
            else None
        )
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
    backward: str = "ste",
    act_signed: bool = False,
    init_bits: float | None = 8.0,
    weight_granularity: str = "channel",
    min_bits: float | None = 1.0,
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
      backward: the rounding-noise gradient rule: ``"ste"``, ``"noise"`` or ``"lsq"``.
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
    """
    weight = act = None
    if not _is_float_bits(weight_bits, "weight_bits"):
        try:
            cfg = qz.GDNSQWeightConfig(
                backward=backward,
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


# Name -> recipe factory (for configs: ``recipes.build(name, **kwargs)``). Read-only.
RECIPES: Mapping[str, Callable[..., Recipe]] = types.MappingProxyType(
    {
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
    }
)


def build(name: str, **kwargs: Any) -> Recipe:
    """The recipe ``RECIPES[name](**kwargs)``; ValueError for an unknown name or argument.

    >>> str(build("absmax", weight_bits=2, act_bits=None))
    'w:absmax2/channel'
    """
    check_choice(name, "recipe", tuple(RECIPES))
    try:
        return RECIPES[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"recipe {name!r}: {e}") from None


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
    build=build,
)
