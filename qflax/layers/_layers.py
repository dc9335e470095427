"""Quantized Flax NNX layers that wrap ``nnx.Linear`` / ``nnx.Conv`` / ``nnx.Einsum``.

Each layer OWNS the wrapped Flax layer (attribute ``inner``: its kernel lives at
``<path>.inner.kernel``) and the quantizers' learnable parameters (``QuantParam`` attributes
``weight_scale``, ``act_scale``, ...). A call sets the wrapped layer's own hook
(``dot_general`` / ``conv_general_dilated`` / ``einsum_op``) to the quantized op of
:mod:`qflax.ops`, with the quantizers bound to the current parameter values, calls the wrapped
layer, and restores the hook, so the layer's math is never re-implemented and the graph
definition is the same before and after every call (no retracing under ``nnx.jit``).

The layer also records the multiply-accumulates of one forward per example (from the shapes the
hook sees) in the ``QuantStat`` ``macs``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import opt_einsum
from flax import nnx
from jax import lax

from qflax import ops
from qflax.layers._graph import definition_order, sort_paths
from qflax.layers._latent import QuantLatent
from qflax.layers._recipes import FLOAT_BITS, Recipe, TensorQuant
from qflax.layers._variables import QuantParam, QuantStat
from qflax.numerics import check_finite
from qflax.ops import quantized_conv_general_dilated, quantized_dot_general, quantized_einsum

__all__ = [
    "COMPUTE_DTYPES",
    "QuantConv",
    "QuantEinsum",
    "QuantEmbed",
    "QuantLinear",
    "calibrate",
    "macs_per_example",
    "packed_weight_bytes",
    "set_compute_dtype",
]

# Storage widths sub-byte codes are packed into (qflax.numerics.pack_bits: 1, 2, 4, 8), then
# whole 16- and 32-bit words.
_CONTAINER_BITS = (1, 2, 4, 8, 16, 32)


def packed_weight_bytes(num_weights: int, bits: int) -> int:
    """Bytes of ``num_weights`` codes of ``bits`` bits, each packed in the next storage width.

    Widths are 1, 2, 4 and 8 bits (several codes per byte, as ``qflax.numerics.pack_bits``
    stores them), then 16 and 32: a 3-bit code takes 4 bits, a 5-bit code a byte.

    >>> packed_weight_bytes(12, 4), packed_weight_bytes(12, 3), packed_weight_bytes(9, 1)
    (6, 6, 2)
    """
    width = next(w for w in _CONTAINER_BITS if w >= bits)
    return -(-int(num_weights) * width // 8)


# ---------------------------------------------------------------------------------- MAC counts

_SIGNATURES = {
    "dot_general": inspect.signature(lax.dot_general),
    "conv_general_dilated": inspect.signature(lax.conv_general_dilated),
}


def macs_per_example(hook: str, args: tuple, kwargs: dict, out_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one hook call per example (the leading axis of the input).

    Args:
      hook: ``"dot_general"``, ``"conv_general_dilated"`` or ``"einsum_op"``.
      args, kwargs: the hook call's arguments (as the Flax layer passes them).
      out_shape: the shape of the hook's result.

    Returns:
      ``prod(out_shape) · (contraction size) / batch`` as an int, where the contraction size is
      the product of the contracting dimensions (dot), the kernel's receptive field times input
      features per group (conv) or all the summed-over letters (einsum), and ``batch`` is the
      size of the input's leading axis (1 for an input without a batch axis).
    """
    kwargs = {k: v for k, v in kwargs.items() if k not in ("lhs_quantizer", "rhs_quantizer")}
    kwargs.pop("grad_quantizer", None)
    if hook == "einsum_op":
        subscripts, lhs, rhs = args[:3]
        inputs, _, _ = opt_einsum.parser.parse_einsum_input((subscripts, lhs, rhs))
        sizes: dict[str, int] = {}
        for spec, shape in zip(inputs.split(","), (lhs.shape, rhs.shape), strict=True):
            for letter, size in zip(spec, shape, strict=True):
                sizes[letter] = max(sizes.get(letter, 1), int(size))
        total = math.prod(sizes.values())
        batch = lhs.shape[0] if lhs.ndim > 1 else 1
        return int(total // max(batch, 1))
    bound = _SIGNATURES[hook].bind(*args, **kwargs)
    lhs, rhs = bound.arguments["lhs"], bound.arguments["rhs"]
    if hook == "dot_general":
        (lhs_contracting, _), _ = bound.arguments["dimension_numbers"]
        contraction = math.prod(lhs.shape[d] for d in lhs_contracting)
        batch = lhs.shape[0] if lhs.ndim > 1 else 1
    else:
        dn = lax.conv_dimension_numbers(
            lhs.shape, rhs.shape, bound.arguments.get("dimension_numbers")
        )
        contraction = math.prod(rhs.shape) // rhs.shape[dn.rhs_spec[0]]
        batch = lhs.shape[dn.lhs_spec[0]]
    return int(math.prod(out_shape) * contraction // max(batch, 1))


# ---------------------------------------------------------------------------------- the layers


@functools.partial(jax.jit, static_argnums=0)
def _init_params(spec: TensorQuant, x: jax.Array) -> dict[str, jax.Array]:
    """``spec.init(x)`` as one compiled computation (one compile per spec and shape)."""
    return spec.init(x)


class _QuantLayer(nnx.Module):
    """Shared machinery: params, hook injection, calibration, MACs and ``quant_info``.

    Attributes (per instance): ``inner`` (the wrapped Flax layer); ``recipe`` (static);
    ``weight_<name>`` / ``act_<name>`` (``QuantParam``, only for learned quantizers: e.g.
    ``weight_scale`` per output channel, initialised from the kernel at construction, and
    ``act_scale``, 1.0 until :func:`calibrate` sets it from real inputs); ``macs``
    (``QuantStat``: MACs per example of the last call); ``calibrating`` and ``mac_recorder``
    (static switches used by :func:`calibrate` and ``count_macs``).
    """

    # The wrapped Flax class, the name of its hook attribute, the quantized op and the default
    # hook (a wrapped layer with any other hook is refused).
    _inner_type: ClassVar[type]
    _hook_name: ClassVar[str | None]
    _op: ClassVar[Callable[..., jax.Array]]
    _default_hook: ClassVar[Callable[..., jax.Array]]
    # The wrapped layer's weight attribute (``inner.<name>``).
    weight_attr: ClassVar[str] = "kernel"

    def _setup(self, inner: nnx.Module, recipe: Recipe) -> None:
        if not isinstance(recipe, Recipe):
            raise ValueError(f"recipe={recipe!r} is not allowed; allowed: a qflax Recipe")
        if not isinstance(inner, self._inner_type) or isinstance(inner, _QuantLayer):
            raise ValueError(
                f"module={type(inner).__name__} is not allowed for {type(self).__name__}; "
                f"allowed: an nnx.{self._inner_type.__name__}"
            )
        hook = None if self._hook_name is None else getattr(inner, self._hook_name)
        if hook is not None and hook is not self._default_hook:
            raise ValueError(
                f"module.{self._hook_name}={hook!r} is a custom hook, which "
                f"{type(self).__name__} would replace; allowed: the default "
                f"{self._default_hook.__module__}.{self._default_hook.__name__}"
            )
        self.inner = inner
        self.recipe = recipe
        # Static: True only inside `calibrate` (initialise learned params from the tensors seen).
        self.calibrating = False
        # Static: a callback receiving the MACs of each call (set by `count_macs`), or None.
        self.mac_recorder = None
        # Static, nnx's train/eval switch (`model.train()` sets it False, `model.eval()` True):
        # False in a training step, where quantizers that keep running statistics (DBSSQ's
        # activation normalisation) use the batch's own and update them; True (the default)
        # everywhere else, where they use the running ones.
        self.use_running_average = True
        # Static: ``probe(layer, inputs, y) -> y`` called on the output of each call, or None
        # (``qflax.studies.gradient_variance`` reads inputs and output cotangents through it).
        self.probe = None
        names = {}
        if recipe.weight is not None and recipe.weight.learnable:
            tags = recipe.weight.param_tags
            for name, value in _init_params(recipe.weight, self._kernel()).items():
                setattr(self, f"weight_{name}", QuantParam(value, tags=tags.get(name, ())))
            names["weight"] = tuple(recipe.weight.param_shapes(self._kernel().shape))
        if recipe.act is not None and recipe.act.learnable:
            # Placeholders until `calibrate` sets them from real inputs.
            tags = recipe.act.param_tags
            values = recipe.act.placeholder(self._act_example_shape())
            for name, value in values.items():
                param = QuantParam(jnp.asarray(value, jnp.float32), tags=tags.get(name, ()))
                setattr(self, f"act_{name}", param)
            names["act"] = tuple(values)
        self.param_names = tuple(sorted(names.items()))  # ((role, (name, ...)), ...), static
        stat_names = {}
        for role, tq in (("weight", recipe.weight), ("act", recipe.act)):
            if tq is None:
                continue
            if role == "weight":
                example = self._kernel()
            else:
                features = self._act_features()
                example = None if features is None else jnp.zeros((1, features), jnp.float32)
            values = tq.stats_init(example)
            for name, value in values.items():
                setattr(self, f"{role}_{name}", QuantStat(jnp.asarray(value, jnp.float32)))
            if values:
                stat_names[role] = tuple(values)
        # Non-learned quantizer state (DBSSQ's ε and σ, a pair's μ): ((role, names), ...).
        self.stat_names = tuple(sorted(stat_names.items()))
        self.macs = QuantStat(jnp.zeros((), jnp.int32))
        if any(tq is not None and tq.needs_key for tq in (recipe.weight, recipe.act, recipe.grad)):
            # The key of stochastic backward rules, split on every call (so a resumed run
            # draws the same noise); `quantize_model` seeds it from the layer's path.
            self.noise_key = QuantStat(jax.random.key_data(jax.random.key(0)))

    def seed_noise(self, seed: int) -> None:
        """Reseeds the noise key of stochastic quantizers (no-op for deterministic recipes)."""
        if hasattr(self, "noise_key"):
            self.noise_key[...] = jax.random.key_data(jax.random.key(seed))

    # ------------------------------------------------------------------ hooks for subclasses

    def _kernel(self) -> jax.Array:
        return self.inner.kernel[...]

    def kernel_shape(self) -> tuple[int, ...]:
        """The shape of the weight as the quantizer sees it (:meth:`quantized_kernel`'s)."""
        return tuple(self.weight_variable().shape)

    def weight_variable(self) -> nnx.Variable:
        """The wrapped layer's weight variable (``inner.kernel``; ``inner.embedding``)."""
        return getattr(self.inner, self.weight_attr)

    def kernel_to_weight(self, kernel: jax.Array) -> jax.Array:
        """A tensor in the quantizer's layout (:meth:`quantized_kernel`) in the weight
        variable's layout (the identity but for :class:`QuantEmbed`: a transpose)."""
        return kernel

    def _act_example_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _act_features(self) -> int | None:
        """The size of the input's last (feature) axis, or None when the layer cannot tell."""
        return getattr(self.inner, "in_features", None)

    # ------------------------------------------------------------------ quantizers

    def _params(self, role: str) -> dict[str, jax.Array]:
        names = dict(self.param_names).get(role, ())
        return {name: getattr(self, f"{role}_{name}")[...] for name in names}

    def _stats(self, role: str) -> dict[str, jax.Array]:
        names = dict(self.stat_names).get(role, ())
        return {name: getattr(self, f"{role}_{name}")[...] for name in names}

    def set_stat(self, name: str, value: Any) -> list[str]:
        """Sets the quantizer state ``name`` (``"epsilon"``, ``"mu"``) of every role that has
        it; returns the roles set. ``value``: a number, or a callable of the role's
        TensorQuant returning one (e.g. an annealing schedule from the recipe's start value)."""
        done = []
        for role, names in self.stat_names:
            if name in names:
                v = value(getattr(self.recipe, role)) if callable(value) else value
                var = getattr(self, f"{role}_{name}")
                var[...] = jnp.asarray(v, jnp.float32).reshape(jnp.shape(var[...]))
                done.append(role)
        return done

    def apply_schedule(self, *, epoch: int, epochs: int, anneal: Any) -> dict[str, Any]:
        """Sets every role's annealed state for ``epoch`` of ``epochs`` from its family's
        schedule (``epoch = epochs``: the exact state training ends with); returns what was set
        as ``{"role.name": value}``."""
        done = {}
        for role, names in self.stat_names:
            tq = getattr(self.recipe, role)
            for name, value in tq.schedule(epoch=epoch, epochs=epochs, anneal=anneal).items():
                if name not in names:
                    raise ValueError(
                        f"kind={tq.kind!r} scheduled a state {name!r} it does not keep; "
                        f"allowed: {', '.join(names)}"
                    )
                var = getattr(self, f"{role}_{name}")
                var[...] = jnp.asarray(value, jnp.float32).reshape(jnp.shape(var[...]))
                done[f"{role}.{name}"] = value
        return done

    def ends_exact(self) -> bool:
        """Whether a role's quantizer switches to an exact state at the end of training."""
        return any(tq is not None and tq.ends_exact for tq in (self.recipe.weight, self.recipe.act))

    def _set_params(self, role: str, values: dict[str, jax.Array]) -> None:
        for name, value in values.items():
            getattr(self, f"{role}_{name}")[...] = value

    def quantizers(
        self, key: jax.Array | None = None
    ) -> tuple[Callable | None, Callable | None, Callable | None]:
        """The ``(weight, act, grad)`` quantizers bound to the current parameter values.

        ``key``: PRNG key of stochastic backward rules (split between weight and act; a
        stochastic gradient quantizer gets ``fold_in(key, 2)``, split between its two products).
        """
        recipe = self.recipe
        w_key = a_key = None
        if key is not None:
            w_key, a_key = jax.random.split(key)
        weight = (
            None
            if recipe.weight is None
            else recipe.weight.quantizer(
                self._params("weight"), key=w_key, stats=self._stats("weight")
            )
        )
        act = None
        if recipe.act is not None:
            act_stats = self._stats("act")
            if not self.use_running_average:
                act_stats = recipe.act.training_stats(act_stats)
            act = recipe.act.quantizer(self._params("act"), key=a_key, stats=act_stats)
        grad = None
        if recipe.grad is not None:
            # Its own stream (fold_in), so adding a gradient quantizer leaves the weight and
            # act keys, and a run without one, unchanged.
            # (No key, outside training: a fixed one; the forward never depends on it.)
            g_key = None
            if recipe.grad.needs_key:
                g_key = jax.random.fold_in(jax.random.key(0) if key is None else key, 2)
            grad = recipe.grad.grad_quantizer(g_key)
        return weight, act, grad

    def _next_key(self) -> jax.Array | None:
        if not hasattr(self, "noise_key"):
            return None
        key, carry = jax.random.split(jax.random.wrap_key_data(self.noise_key[...]))
        self.noise_key[...] = jax.random.key_data(carry)
        return key

    def bit_widths(self) -> dict[str, tuple[jax.Array, int]]:
        """The learned (continuous, differentiable) bit-widths and their targets, per role.

        ``{"weight": (b, target), "act": (b, target)}`` for the roles whose quantizer learns its
        bit-width (GDNSQ): ``b`` per output channel for weights, a scalar for activations.
        Empty for fixed-bit recipes. Used by the exterior-point penalty in ``qflax.train``.
        """
        out = {}
        for role in ("weight", "act"):
            tq = getattr(self.recipe, role)
            if tq is not None and tq.learns_bits:
                x = self._kernel() if role == "weight" else None
                out[role] = (tq.bit_width(x, self._params(role)), int(tq.target_bits))
        return out

    def used_bits(self) -> dict[str, int]:
        """The integer bit-widths actually used by learned-bit-width quantizers (eager).

        ``{"weight": int, "act": int}`` for GDNSQ and CoDeQ roles (``TensorQuant.used_bits``).
        """
        out = {}
        for role in ("weight", "act"):
            tq = getattr(self.recipe, role)
            if tq is not None and tq.reads_bits:
                x = self._kernel() if role == "weight" else None
                out[role] = int(tq.used_bits(x, self._params(role)))
        return out

    def quantized_kernel(self) -> jax.Array:
        """The kernel as the forward pass uses it (quantized unless the weights are float)."""
        kernel = self._kernel()
        if self.recipe.weight is None:
            return kernel
        spec = self.recipe.weight
        # The forward value never depends on the noise of a stochastic backward rule.
        key = jax.random.key(0) if spec.needs_key else None
        return spec.apply(kernel, self._params("weight"), key=key, stats=self._stats("weight"))

    # ------------------------------------------------------------------ the call

    # Whether this layer's op can take its operands as int8 codes (forward_dtype="int8").
    _int8_op: ClassVar[bool] = False

    @property
    def int8_forward(self) -> bool:
        """Whether the forward product runs on int8 codes: the recipe's ``forward_dtype`` is
        ``"int8"`` and the layer's op takes it (dense and einsum layers; convolutions stay
        float32 — see :attr:`Recipe.forward_dtype`)."""
        return self.recipe.forward_dtype == "int8" and type(self)._int8_op

    def _calibrate(self, x: jax.Array | None) -> None:
        """Sets learned params from the kernel and from the input ``x`` (None: weights only)."""
        recipe = self.recipe
        if recipe.weight is not None and recipe.weight.learnable:
            self._set_params("weight", _init_params(recipe.weight, self._kernel()))
        if x is None:
            return
        if recipe.act is not None and recipe.act.learnable:
            self._set_params("act", _init_params(recipe.act, x))
        if recipe.act is not None and self._stats("act"):
            # Data-dependent state (e.g. a vector quantizer's k-means codebook).
            for name, value in recipe.act.calibrate_stats(x, self._stats("act")).items():
                getattr(self, f"act_{name}")[...] = jnp.asarray(value, jnp.float32)

    def _call_inner(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        if self.calibrating:
            self._calibrate(jnp.asarray(inputs))
        weight_q, act_q, grad_q = self.quantizers(self._next_key())
        hook_name, op = self._hook_name, type(self)._op
        seen: list[int] = []
        compute = getattr(self, "compute_dtype", None)  # set_compute_dtype
        int8 = self.int8_forward
        if int8:  # the product on int8 codes (Recipe.forward_dtype), the slots say their scales
            act_q = ops.int8_operand(act_q, act_q.int8_scale)
            weight_q = ops.int8_operand(weight_q, weight_q.int8_scale)
        elif compute is not None:  # quantize in float32, multiply in `compute`, accumulate f32
            act_q, weight_q = _cast_after(act_q, compute), _cast_after(weight_q, compute)

        def hook(*hook_args: Any, **hook_kwargs: Any) -> jax.Array:
            if compute is not None and not int8:
                hook_kwargs.setdefault("preferred_element_type", jnp.float32)
            out = op(
                *hook_args,
                **hook_kwargs,
                lhs_quantizer=act_q,
                rhs_quantizer=weight_q,
                grad_quantizer=grad_q,
                **({"forward_dtype": "int8"} if int8 else {}),
            )
            seen.append(macs_per_example(hook_name, hook_args, hook_kwargs, out.shape))
            return out

        saved = getattr(self.inner, hook_name)
        setattr(self.inner, hook_name, hook)
        try:
            y = self.inner(inputs, *args, **kwargs)
        finally:
            setattr(self.inner, hook_name, saved)
        act = self.recipe.act
        if not (self.use_running_average or self.calibrating) and act is not None:
            if act.updates_stats and self._stats("act"):  # e.g. DBSSQ's running statistics
                x = jax.lax.stop_gradient(jnp.asarray(inputs))
                new = act.update_stats(x, self._params("act"), self._stats("act"))
                for name, value in new.items():
                    getattr(self, f"act_{name}")[...] = jax.lax.stop_gradient(
                        jnp.asarray(value, jnp.float32)
                    )
        macs = sum(seen)
        self.macs[...] = jnp.asarray(macs, jnp.int32)
        if self.mac_recorder is not None:
            self.mac_recorder(macs)
        if self.probe is not None:
            y = self.probe(self, inputs, y)
        return y

    # ------------------------------------------------------------------ summaries

    def quant_info(self) -> dict[str, Any]:
        """Sizes and bit-widths of this layer (eager; python numbers; abstract modules give NaN
        sparsity and 0 MACs).

        Returns:
          A dict with ``weight_bits`` and ``act_bits`` (32 when float); ``params`` (kernel plus
          bias elements); ``weights`` (kernel elements); ``packed_bytes`` (the kernel packed at
          ``weight_bits`` — see :func:`packed_weight_bytes` — plus, as float32, the bias, every
          ``QuantParam`` of the layer and the scales a stateless weight quantizer needs at rest,
          e.g. one per output channel for absmax); ``sparsity`` (fraction of exactly-zero
          quantized kernel values); ``macs`` (multiply-accumulates of one forward per example,
          from the last call; 0 before the first call); ``recipe`` (its description); ``grad``
          (the gradient quantizer of the output cotangent, or ``"float"``).
        """
        recipe = self.recipe
        info = float_layer_info(self.inner)
        weight_bits, act_bits = recipe.weight_bits, recipe.act_bits
        if not _is_abstract(self.weight_variable()):
            used = self.used_bits()
            weight_bits = used.get("weight", weight_bits)
            act_bits = used.get("act", act_bits)
        quant_params = sum(
            math.prod(v.shape) for _, v in nnx.iter_graph(self) if isinstance(v, QuantParam)
        )
        scales = 0
        if recipe.weight is not None:
            # Scales a stateless quantizer needs at rest, and what learned ones store besides
            # their QuantParams (GDNSQ's zero point min w_c per channel, CoDeQ's shift).
            scales = recipe.weight.stored_scales(self.kernel_shape())
        if weight_bits < FLOAT_BITS:
            num_bias = info["params"] - info["weights"]
            info["packed_bytes"] = packed_weight_bytes(info["weights"], weight_bits) + 4 * (
                num_bias + quant_params + scales
            )
        else:
            info["packed_bytes"] += 4 * (quant_params + scales)
        if not _is_abstract(self.weight_variable()) and recipe.weight is not None:
            info["sparsity"] = float(np.mean(np.asarray(self.quantized_kernel()) == 0))
        macs = self.macs.get_value()
        info.update(
            weight_bits=int(weight_bits),
            act_bits=int(act_bits),
            macs=0 if isinstance(macs, jax.ShapeDtypeStruct) else int(macs),
            recipe=str(recipe),
            grad="float" if recipe.grad is None else str(recipe.grad),
        )
        return info


def _cast_after(quantizer: Any, dtype: Any) -> Any:
    """``x -> quantizer(x)`` (``x`` when None) cast to ``dtype``: the operand a product takes."""

    def cast(x: jax.Array) -> jax.Array:
        return (x if quantizer is None else quantizer(x)).astype(dtype)

    return cast


def _cast_op(op: Any, dtype: Any) -> Any:
    """``op`` (``lax.dot_general``, ``lax.conv_general_dilated``, ``jnp.einsum``) on its
    floating operands cast to ``dtype``, accumulating and returning float32."""

    def cast_op(*args: Any, **kwargs: Any) -> jax.Array:
        args = [
            a.astype(dtype)
            if isinstance(a, jax.Array | np.ndarray) and jnp.issubdtype(a.dtype, jnp.floating)
            else a
            for a in args
        ]
        kwargs.setdefault("preferred_element_type", jnp.float32)
        return op(*args, **kwargs)

    cast_op.compute_dtype = jnp.dtype(dtype).name
    return cast_op


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def set_compute_dtype(model: nnx.Module, dtype: str) -> int:
    """Mixed precision: every weight layer's product (``nnx.Linear``/``Conv``/``Einsum`` and
    the quant layers) takes its operands in ``dtype`` ("bfloat16", "float16") and accumulates
    and returns float32; parameters, optimizer state, quantizers (their scales, rounding and
    gradients: float32 before the cast) and everything between the products stay float32.
    "float32" leaves the model as it is. Returns the number of layers changed.

    Raises:
      ValueError: ``dtype`` is not one of ``COMPUTE_DTYPES``.
    """
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype={dtype!r} is not allowed; allowed: {COMPUTE_DTYPES}")
    if dtype == "float32":
        return 0
    inners = set()
    changed = 0
    for _, node in nnx.iter_graph(model):
        if is_quant_layer(node):
            node.compute_dtype = dtype
            inners.add(id(node.inner))
            changed += 1
    ops = {nnx.Linear: "dot_general", nnx.Conv: "conv_general_dilated", nnx.Einsum: "einsum_op"}
    for _, node in nnx.iter_graph(model):
        name = next((n for t, n in ops.items() if isinstance(node, t)), None)
        if name is None or id(node) in inners:
            continue
        op = getattr(node, name)
        if getattr(op, "compute_dtype", None) != dtype:
            setattr(node, name, _cast_op(op, dtype))
            changed += 1
    return changed


def _is_abstract(variable: nnx.Variable) -> bool:
    return isinstance(variable.get_value(), jax.ShapeDtypeStruct)


def float_layer_info(module: nnx.Module) -> dict[str, Any]:
    """:meth:`quant_info` of an unquantized ``nnx.Linear`` / ``nnx.Conv`` / ``nnx.Einsum``.

    Bits 32, ``packed_bytes = 4·params``, ``macs`` 0 (unknown: see ``count_macs``). Works on
    abstract modules (``nnx.eval_shape``), whose ``sparsity`` is NaN. An ``nnx.Embed``'s weight
    is its table (``embedding``; no bias).
    """
    weight = module.embedding if isinstance(module, nnx.Embed) else module.kernel
    shape = tuple(weight.shape)
    num_weights = math.prod(shape)
    bias = getattr(module, "bias", None)
    num_bias = 0 if bias is None else math.prod(bias.shape)
    if _is_abstract(weight):
        sparsity = float("nan")
    else:
        kernel = np.asarray(weight[...])
        mask = getattr(module, "mask", None)
        if mask is not None:
            kernel = kernel * np.asarray(mask)
        sparsity = float(np.mean(kernel == 0))
    return {
        "weight_bits": FLOAT_BITS,
        "act_bits": FLOAT_BITS,
        "params": num_weights + num_bias,
        "weights": num_weights,
        "packed_bytes": 4 * (num_weights + num_bias),
        "sparsity": sparsity,
        "macs": 0,
        "recipe": "float",
        "grad": "float",
    }


class QuantLinear(_QuantLayer):
    """``nnx.Linear`` with quantized weights / input activations (/ gradients), per a Recipe.

    Example:
      >>> import functools
      >>> from qflax.layers import recipes
      >>> layer = QuantLinear(3, 4, recipe=recipes.absmax(4, 8), rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((2, 3))).shape, layer.inner.kernel.shape
      ((2, 4), (3, 4))
      >>> factory = functools.partial(QuantLinear, recipe=recipes.absmax(4, 8))  # `linear=`
    """

    _inner_type = nnx.Linear
    _hook_name = "dot_general"
    _op = staticmethod(quantized_dot_general)
    _int8_op = True
    _default_hook = staticmethod(lax.dot_general)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        recipe: Recipe,
        use_bias: bool = True,
        rngs: nnx.Rngs | None = None,
        _inner: nnx.Linear | None = None,
        **linear_kwargs: Any,
    ):
        """Builds the wrapped ``nnx.Linear(in_features, out_features, use_bias=..., rngs=...,
        **linear_kwargs)`` and the quantizer params (weight scales from the new kernel)."""
        if _inner is None:
            if rngs is None:
                raise ValueError("rngs=None is not allowed; allowed: an nnx.Rngs")
            _inner = nnx.Linear(
                in_features, out_features, use_bias=use_bias, rngs=rngs, **linear_kwargs
            )
        self._setup(_inner, recipe)

    @classmethod
    def from_module(cls, module: nnx.Linear, recipe: Recipe) -> QuantLinear:
        """Wraps an existing ``nnx.Linear`` (the same object: its weights are kept)."""
        if not isinstance(module, nnx.Linear):
            raise ValueError(
                f"module={type(module).__name__} is not allowed; allowed: an nnx.Linear"
            )
        return cls(module.in_features, module.out_features, recipe=recipe, _inner=module)

    def _act_example_shape(self) -> tuple[int, ...]:
        return (1, self.inner.in_features)

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        """``inner(inputs)`` with the quantized ``dot_general``."""
        return self._call_inner(inputs, out_sharding=out_sharding)


class QuantConv(_QuantLayer):
    """``nnx.Conv`` with quantized weights / input activations (/ gradients), per a Recipe.

    Gradients reach the kernel, the input and every quantizer parameter (unlike AQT's conv
    injection, whose kernels get zero gradients).
    """

    _inner_type = nnx.Conv
    _hook_name = "conv_general_dilated"
    _op = staticmethod(quantized_conv_general_dilated)
    _default_hook = staticmethod(lax.conv_general_dilated)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | tuple[int, ...],
        strides: int | tuple[int, ...] | None = 1,
        *,
        recipe: Recipe,
        use_bias: bool = True,
        rngs: nnx.Rngs | None = None,
        _inner: nnx.Conv | None = None,
        **conv_kwargs: Any,
    ):
        """Builds the wrapped ``nnx.Conv(in_features, out_features, kernel_size, strides,
        use_bias=..., rngs=..., **conv_kwargs)`` (``padding=``, ``feature_group_count=``, ...)
        and the quantizer params."""
        if _inner is None:
            if rngs is None:
                raise ValueError("rngs=None is not allowed; allowed: an nnx.Rngs")
            _inner = nnx.Conv(
                in_features,
                out_features,
                kernel_size,
                strides,
                use_bias=use_bias,
                rngs=rngs,
                **conv_kwargs,
            )
        self._setup(_inner, recipe)

    @classmethod
    def from_module(cls, module: nnx.Conv, recipe: Recipe) -> QuantConv:
        """Wraps an existing ``nnx.Conv`` (the same object: its weights are kept)."""
        if not isinstance(module, nnx.Conv):
            raise ValueError(f"module={type(module).__name__} is not allowed; allowed: an nnx.Conv")
        return cls(
            module.in_features,
            module.out_features,
            module.kernel_size,
            recipe=recipe,
            _inner=module,
        )

    def _kernel(self) -> jax.Array:
        kernel = self.inner.kernel[...]
        mask = self.inner.mask
        return kernel if mask is None else kernel * mask

    def _act_example_shape(self) -> tuple[int, ...]:
        return (1,) * (len(self.inner.kernel_size) + 1) + (self.inner.in_features,)

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        """``inner(inputs)`` with the quantized ``conv_general_dilated``."""
        return self._call_inner(inputs, out_sharding=out_sharding)


class QuantEinsum(_QuantLayer):
    """``nnx.Einsum`` with quantized kernel / input (/ gradients), per a Recipe.

    A learned activation scale per channel needs the channel letter of the input to appear in
    the kernel (its size is read from ``kernel_shape``); per tensor always works.
    """

    _inner_type = nnx.Einsum
    _hook_name = "einsum_op"
    _op = staticmethod(quantized_einsum)
    _int8_op = True
    _default_hook = staticmethod(jnp.einsum)

    def __init__(
        self,
        einsum_str: str,
        kernel_shape: tuple[int, ...],
        bias_shape: tuple[int, ...] | None = None,
        *,
        recipe: Recipe,
        rngs: nnx.Rngs | None = None,
        _inner: nnx.Einsum | None = None,
        **einsum_kwargs: Any,
    ):
        """Builds the wrapped ``nnx.Einsum(einsum_str, kernel_shape, bias_shape, rngs=...,
        **einsum_kwargs)`` and the quantizer params."""
        if _inner is None:
            if rngs is None:
                raise ValueError("rngs=None is not allowed; allowed: an nnx.Rngs")
            _inner = nnx.Einsum(einsum_str, kernel_shape, bias_shape, rngs=rngs, **einsum_kwargs)
        self._setup(_inner, recipe)

    @classmethod
    def from_module(cls, module: nnx.Einsum, recipe: Recipe) -> QuantEinsum:
        """Wraps an existing ``nnx.Einsum`` (the same object: its weights are kept)."""
        if not isinstance(module, nnx.Einsum):
            raise ValueError(
                f"module={type(module).__name__} is not allowed; allowed: an nnx.Einsum"
            )
        return cls(
            module.einsum_str, module.kernel_shape, module.bias_shape, recipe=recipe, _inner=module
        )

    def _act_example_shape(self) -> tuple[int, ...]:
        act = self.recipe.act
        lhs, rhs = self.inner.einsum_str.split("->")[0].split(",")
        if act is None or act.granularity != "channel":
            return (1,) * max(len(lhs.replace("...", "")), 1)
        axis = act.config.axis
        if "..." in lhs or not -len(lhs) <= axis < len(lhs) or lhs[axis] not in rhs:
            raise ValueError(
                f"act.config.axis={axis} of einsum_str={self.inner.einsum_str!r} is not a "
                "kernel letter; allowed: granularity='tensor', or an input axis whose letter "
                "appears in the kernel"
            )
        shape = [1] * len(lhs)
        shape[axis] = self.inner.kernel_shape[rhs.index(lhs[axis])]
        return tuple(shape)

    def _act_features(self) -> int | None:
        lhs, rhs = self.inner.einsum_str.split("->")[0].split(",")
        lhs = lhs.strip()
        if not lhs or lhs[-1] == "." or lhs[-1] not in rhs:
            return None
        return int(self.inner.kernel_shape[rhs.index(lhs[-1])])

    def __call__(
        self, inputs: jax.Array, einsum_str: str | None = None, out_sharding: Any = None
    ) -> jax.Array:
        """``inner(inputs, einsum_str)`` with the quantized ``einsum_op``."""
        return self._call_inner(inputs, einsum_str, out_sharding=out_sharding)


class QuantEmbed(_QuantLayer):
    """``nnx.Embed`` with a quantized table (and, in :meth:`attend`, quantized queries and
    gradients), per a Recipe: a token embedding whose rows are integer codes at rest.

    The weight quantizer sees the table transposed, ``(features, num_embeddings)`` — the kernel
    of the tied output projection :meth:`attend` — so per-channel weight scales are one per
    TOKEN (each row of the table its own range, as embedding quantization usually does).
    A lookup quantizes only the table (its input is integer ids: the recipe's activation and
    gradient quantizers apply to :meth:`attend`'s query and product); the table's gradient is
    the weight quantizer's (straight-through for the uniform families), summed over the tokens
    looked up. ``quant_info`` counts the lookup as 0 MACs. Ids outside
    ``[-num_embeddings, num_embeddings)`` give NaN rows, as ``nnx.Embed``'s do.

    Example:
      >>> from qflax.layers import recipes
      >>> layer = QuantEmbed(96, 16, recipe=recipes.absmax(4, 8), rngs=nnx.Rngs(0))
      >>> layer(jnp.array([[1, 2, 3]])).shape, layer.kernel_shape()
      ((1, 3, 16), (16, 96))
      >>> layer.attend(jnp.ones((2, 16))).shape
      (2, 96)
    """

    _inner_type = nnx.Embed
    _hook_name = None
    weight_attr = "embedding"

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        recipe: Recipe,
        rngs: nnx.Rngs | None = None,
        _inner: nnx.Embed | None = None,
        **embed_kwargs: Any,
    ):
        """Builds the wrapped ``nnx.Embed(num_embeddings, features, rngs=..., **embed_kwargs)``
        and the quantizer params (per-token weight scales from the new table)."""
        if _inner is None:
            if rngs is None:
                raise ValueError("rngs=None is not allowed; allowed: an nnx.Rngs")
            _inner = nnx.Embed(num_embeddings, features, rngs=rngs, **embed_kwargs)
        self._setup(_inner, recipe)

    @classmethod
    def from_module(cls, module: nnx.Embed, recipe: Recipe) -> QuantEmbed:
        """Wraps an existing ``nnx.Embed`` (the same object: its table is kept)."""
        if not isinstance(module, nnx.Embed):
            raise ValueError(
                f"module={type(module).__name__} is not allowed; allowed: an nnx.Embed"
            )
        return cls(module.num_embeddings, module.features, recipe=recipe, _inner=module)

    def _kernel(self) -> jax.Array:
        return self.inner.embedding[...].T

    def kernel_shape(self) -> tuple[int, ...]:
        return tuple(self.inner.embedding.shape)[::-1]

    def kernel_to_weight(self, kernel: jax.Array) -> jax.Array:
        return kernel.T

    def _act_example_shape(self) -> tuple[int, ...]:
        return (1, self.inner.features)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """The rows of the quantized table at the integer ids ``inputs`` (any shape), with a
        trailing ``features`` axis."""
        inputs = jnp.asarray(inputs)
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(
                f"QuantEmbed got inputs of dtype {inputs.dtype}; allowed: integer token ids"
            )
        if self.calibrating:
            self._calibrate(None)
        weight_q, _, _ = self.quantizers(self._next_key())
        kernel = self._kernel() if weight_q is None else weight_q(self._kernel())
        table = kernel.T.astype(self.inner.dtype)
        self.macs[...] = jnp.zeros((), jnp.int32)
        if self.mac_recorder is not None:
            self.mac_recorder(0)
        if self.inner.num_embeddings == 1:
            return jnp.broadcast_to(table, inputs.shape + (self.inner.features,))
        return jnp.take(table, inputs, axis=0)

    def attend(self, query: jax.Array) -> jax.Array:
        """``query · tableᵀ`` (logits over the embeddings, for weight tying) with the quantized
        table, the recipe's activation quantizer on ``query`` and its gradient quantizer on the
        product's cotangent."""
        query = jnp.asarray(query, self.inner.dtype)
        if self.calibrating:
            self._calibrate(query)
        weight_q, act_q, grad_q = self.quantizers(self._next_key())
        args = (query, self._kernel().astype(self.inner.dtype))
        kwargs = {"dimension_numbers": (((query.ndim - 1,), (0,)), ((), ()))}
        y = quantized_dot_general(
            *args, **kwargs, lhs_quantizer=act_q, rhs_quantizer=weight_q, grad_quantizer=grad_q
        )
        macs = macs_per_example("dot_general", args, kwargs, y.shape)
        self.macs[...] = jnp.asarray(macs, jnp.int32)
        if self.mac_recorder is not None:
            self.mac_recorder(macs)
        if self.probe is not None:
            y = self.probe(self, query, y)
        return y


QUANT_LAYERS: dict[type, type[_QuantLayer]] = {
    nnx.Linear: QuantLinear,
    nnx.Conv: QuantConv,
    nnx.Einsum: QuantEinsum,
    nnx.Embed: QuantEmbed,
}


def quant_layer_for(module: nnx.Module) -> type[_QuantLayer] | None:
    """The quant wrapper class for a Flax layer (subclasses included), or None."""
    if isinstance(module, _QuantLayer):
        return None
    for base, wrapper in QUANT_LAYERS.items():
        if isinstance(module, base):
            return wrapper
    return None


def is_quant_layer(module: Any) -> bool:
    """Whether ``module`` is one of the quant layers."""
    return isinstance(module, _QuantLayer)


# ---------------------------------------------------------------------------------- calibrate


def check_model(model: Any, where: str) -> None:
    """Raises TypeError naming ``where`` and the type unless ``model`` is an ``nnx.Module``."""
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"{where}: model={type(model).__name__} is not allowed; allowed: an nnx.Module "
            "(a Flax NNX model)"
        )


def _check_batch(x: Any, where: str) -> None:
    """Refuses a concrete batch (any pytree of arrays) holding NaN or ±inf, naming the leaf."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(x):
        check_finite(leaf, where, "batch" + jax.tree_util.keystr(path))


def calibrate(model: nnx.Module, x: Any, *, jit: bool = True, **call_kwargs: Any) -> list[str]:
    """Initialises learned quantizer params from real tensors with one forward pass.

    Every quant layer whose recipe has learned params (``"learned_step"``) sets them, during
    ``model(x, **call_kwargs)``, from the tensors it actually sees: the weight scale from its
    kernel and the activation scale from its input (``TensorQuant.init``: absmax-based for
    symmetric configs), and data-dependent activation state (``TensorQuant.calibrate_stats``:
    e.g. a vector quantizer's k-means codebook, in quant layers and :class:`QuantLatent` s).
    Layers run in order, so each sees the quantized outputs of the layers calibrated before it.
    Call it before training (and before ``nnx.split`` for a jitted step).
    Other state the forward updates (BatchNorm statistics with ``train=True``) is updated too.

    Args:
      model: an NNX model containing quant layers (modified in place).
      x: a representative batch.
      jit: run the forward under ``nnx.jit`` (one compilation; much faster than eager dispatch
        of the quantizers on CPU); False: eagerly.
      **call_kwargs: passed to the model (e.g. ``train=False``); static under ``jit``.

    Returns:
      The paths (``"."``-joined) of the layers whose params (or data-dependent state: a
      :class:`~qflax.layers.QuantLatent`'s k-means codebook) were initialised.

    Raises:
      TypeError: if ``model`` is not an ``nnx.Module``.
      ValueError: if a floating array of ``x`` holds NaN or ±inf (it would set NaN scales and
        so a NaN model); the message names the count and the first index.
    """
    check_model(model, "calibrate")
    _check_batch(x, "calibrate")
    found = [
        (path, node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, (_QuantLayer, QuantLatent))
    ]
    layers = [
        (".".join(map(str, path)), node)
        for path, node in sort_paths(found, definition_order(model))
    ]
    for _, layer in layers:
        layer.calibrating = True
    try:
        if jit:
            nnx.jit(lambda m, x: m(x, **call_kwargs))(model, x)
        else:
            model(x, **call_kwargs)
    finally:
        for _, layer in layers:
            layer.calibrating = False
    return [path for path, layer in layers if _calibrates(layer)]


def _calibrates(layer: Any) -> bool:
    """Whether :func:`calibrate` sets a layer's params or state from data."""
    if isinstance(layer, QuantLatent):
        return layer.calibrates
    return any(tq is not None and tq.learnable for tq in (layer.recipe.weight, layer.recipe.act))
