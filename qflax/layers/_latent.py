"""A layer that quantizes a latent tensor: :class:`QuantLatent` (any quantizer family).

It holds one :class:`TensorQuant` and the family's params (``QuantParam``: e.g. a learned VQ
codebook) and state (``QuantStat``: e.g. an EMA codebook), asks the family for everything
(:class:`qflax.quantizers.QuantizerFamily`: ``apply``, ``losses``, ``update_stats``,
``calibrate_stats``, ``indices``) and has no per-family branch.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qflax.layers._recipes import TensorQuant
from qflax.layers._variables import AuxLoss, QuantParam, QuantStat
from qflax.quantizers import QuantizerFamily

__all__ = ["QuantLatent", "latent_codes", "latent_summaries"]


class QuantLatent(nnx.Module):
    """Quantizes its input with one :class:`TensorQuant`: ``y = layer(z, train=...)``.

    * Params of a learnable family are ``QuantParam`` s ``param_<name>`` (placeholders until
      :func:`~qflax.layers.calibrate` initialises them from the first batch, e.g. a k-means VQ
      codebook); state is ``QuantStat`` s ``stat_<name>`` (calibrated by the family's
      ``calibrate_stats``); ``noise_key`` (a ``QuantStat``) is split on every call.
    * ``train=True``: the family's ``losses`` (summed) go to the ``AuxLoss`` ``aux_loss``, which
      the train step adds to the task loss, and its ``update_stats`` (e.g. EMA codebook and
      dead-code restarts) replace the state after the forward, which used the state before.

    >>> from qflax import quantizers as qz
    >>> layer = QuantLatent(TensorQuant(kind="fsq", config=qz.FSQConfig(levels=(5, 5))))
    >>> layer(jnp.zeros((2, 2))).shape, layer.quant_info()["codebook_size"]
    ((2, 2), 25)
    """

    def __init__(self, quant: TensorQuant, *, features: int | None = None, seed: int = 0):
        """``quant``: an activation quantizer spec; ``features``: the size of the input's last
        axis (the example shape of placeholder params; default the family's vector length);
        ``seed``: of ``noise_key``."""
        if not isinstance(quant, TensorQuant):
            raise ValueError(f"quant={quant!r} is not allowed; allowed: a qflax TensorQuant")
        if "act" not in quant.roles:
            raise ValueError(
                f"quant={quant} quantizes {'/'.join(quant.roles)} tensors; allowed: a spec whose "
                "family quantizes activations"
            )
        dim = quant.vector_dim
        if features is not None and dim is not None and features != dim:
            raise ValueError(
                f"features={features!r} does not match {quant}'s vector length; allowed: {dim}"
            )
        self.quant = quant
        # Static: True only inside `calibrate` (initialise params and state from the batch).
        self.calibrating = False
        shape = (1, features or dim or 1)
        tags = quant.param_tags
        params = quant.placeholder(shape) if quant.learnable else {}
        for name, value in params.items():
            param = QuantParam(jnp.asarray(value, jnp.float32), tags=tags.get(name, ()))
            setattr(self, f"param_{name}", param)
        self.param_names = tuple(params)
        stats = quant.stats_init(None)
        for name, value in stats.items():
            setattr(self, f"stat_{name}", QuantStat(jnp.asarray(value, jnp.float32)))
        self.stat_names = tuple(stats)
        self.noise_key = QuantStat(jax.random.key_data(jax.random.key(seed)))
        self.aux_loss = AuxLoss(jnp.zeros((), jnp.float32))
        # Static: True only inside `latent_codes` (the call sows its codes as an Intermediate).
        self.record = False

    @classmethod
    def from_module(cls, module: Any, recipe: Any) -> QuantLatent:
        """The quantized version of a :class:`~qflax.layers.Latent` slot: the recipe's
        activation quantizer on vectors of ``module.dim`` (``quantize_model``)."""
        from qflax.layers._slots import Latent

        if not isinstance(module, Latent):
            raise ValueError(
                f"module={type(module).__name__} is not allowed; allowed: a qflax.layers.Latent"
            )
        if recipe.act is None:
            raise ValueError(
                f"recipe {recipe} has no activation quantizer for a Latent slot; allowed: a "
                "recipe with one (recipes.latent(kind, ...))"
            )
        return cls(recipe.act, features=module.dim)

    def seed_noise(self, seed: int) -> None:
        """Reseeds ``noise_key``."""
        self.noise_key[...] = jax.random.key_data(jax.random.key(seed))

    @property
    def calibrates(self) -> bool:
        """Whether :func:`~qflax.layers.calibrate` sets params or state from data."""
        family = self.quant.family
        own = type(family).calibrate_stats is not QuantizerFamily.calibrate_stats
        return self.quant.learnable or (bool(self.stat_names) and own)

    def _params(self) -> dict[str, jax.Array]:
        return {name: getattr(self, f"param_{name}")[...] for name in self.param_names}

    def _stats(self) -> dict[str, jax.Array]:
        return {name: getattr(self, f"stat_{name}")[...] for name in self.stat_names}

    def _next_key(self) -> jax.Array:
        key, carry = jax.random.split(jax.random.wrap_key_data(self.noise_key[...]))
        self.noise_key[...] = jax.random.key_data(carry)
        return key

    def _calibrate(self, z: jax.Array) -> None:
        if self.quant.learnable:
            for name, value in self.quant.init(z).items():
                getattr(self, f"param_{name}")[...] = jnp.asarray(value, jnp.float32)
        if self.stat_names:
            for name, value in self.quant.calibrate_stats(z, self._stats()).items():
                getattr(self, f"stat_{name}")[...] = jnp.asarray(value, jnp.float32)

    def __call__(self, z: jax.Array, *, train: bool = False) -> jax.Array:
        """The quantized ``z``; ``train=True`` also sets ``aux_loss`` and updates the state."""
        z = jnp.asarray(z)
        if self.calibrating:
            self._calibrate(jax.lax.stop_gradient(z))
        params, stats = self._params(), self._stats()
        apply_key, update_key = jax.random.split(self._next_key())
        key = apply_key if self.quant.needs_key else None
        y = self.quant.apply(z, params, key=key, stats=stats)
        if self.record:
            self.sow(nnx.Intermediate, "codes", self.quant.indices(z, params, stats))
        if train and not self.calibrating:
            losses = self.quant.losses(z, params, stats)
            total = sum((jnp.asarray(v, jnp.float32) for v in losses.values()), jnp.zeros(()))
            self.aux_loss[...] = total
            if self.stat_names:
                new = self.quant.update_stats(z, params, stats, key=update_key)
                for name in self.stat_names:
                    value = jax.lax.stop_gradient(jnp.asarray(new[name], jnp.float32))
                    getattr(self, f"stat_{name}")[...] = value
        return y

    def indices(self, z: jax.Array) -> jax.Array:
        """The int32 code of every vector of ``z`` (the family's ``indices``)."""
        return self.quant.indices(z, self._params(), self._stats())

    def from_indices(self, idx: jax.Array) -> jax.Array:
        """The quantized vectors of codes ``idx`` (the family's ``from_indices``)."""
        return self.quant.from_indices(idx, self._params(), self._stats())

    def quant_info(self) -> dict[str, Any]:
        """``family`` (kind), ``quantizer`` (its description), ``codebook_size`` and
        ``vector_dim`` (None for a scalar quantizer), ``bits_per_vector`` (``log2`` of the
        codebook size, or None), ``act_bits`` (the family's ``bits``: per element, rounded up)
        and ``params`` (elements of the ``QuantParam`` s)."""
        size = self.quant.codebook_size
        params = sum(
            math.prod(v.shape) for _, v in nnx.iter_graph(self) if isinstance(v, QuantParam)
        )
        return {
            "family": self.quant.kind,
            "quantizer": str(self.quant),
            "codebook_size": size,
            "vector_dim": self.quant.vector_dim,
            "bits_per_vector": None if size is None else math.log2(size),
            "act_bits": self.quant.bits,
            "params": int(params),
        }


def _latent_layers(model: nnx.Module) -> list[tuple[str, QuantLatent]]:
    return [
        (".".join(str(p) for p in path), node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, QuantLatent)
    ]


def latent_codes(
    model: nnx.Module, x: Any, *, batch_size: int = 500, **call_kwargs: Any
) -> dict[str, np.ndarray]:
    """The codes every :class:`QuantLatent` of ``model`` gives for the inputs ``x`` (the model
    in inference mode, ``batch_size`` examples per compiled call): ``{path: int32 codes}``, the
    codes of all of ``x`` concatenated along the first axis."""
    layers = _latent_layers(model)
    if not layers:
        return {}

    def forward(model, xb):
        return model(xb, train=False, **call_kwargs)

    @nnx.jit
    def run(model, xb):
        # The layers sow their codes as Intermediates; nnx.capture collects them.
        _, sown = nnx.capture(forward, nnx.Intermediate)(model, xb)
        return sown

    out: dict[str, list[np.ndarray]] = {path: [] for path, _ in layers}
    x = np.asarray(x)
    for _, layer in layers:
        layer.record = True
    try:
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size]
            n = len(xb)
            if n < batch_size and len(x) > batch_size:  # pad to reuse the compiled call
                xb = np.concatenate([xb, np.repeat(xb[-1:], batch_size - n, axis=0)])
            sown = run(model, xb)
            for path, _layer in layers:
                node = sown
                for part in path.split("."):
                    node = node[int(part) if part.isdigit() else part]
                out[path].append(np.asarray(node["codes"].get_value()[0])[:n])
    finally:
        for _, layer in layers:
            layer.record = False
    return {path: np.concatenate(chunks) for path, chunks in out.items()}


def latent_summaries(model: nnx.Module, x: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """One dict per :class:`QuantLatent`: its :meth:`~QuantLatent.quant_info` and, from its
    codes of the inputs ``x`` (:func:`latent_codes`): ``codes_per_sample``, ``code_bits``
    (``log2`` of the codebook size: the bits of one code; a scalar quantizer's codes are its
    elements), ``bits_per_sample`` (nominal), ``perplexity`` (of the code frequencies; a
    residual quantizer: the product over its stages), ``utilisation`` (perplexity / codebook
    size; residual: the mean over stages), ``usage`` (the fraction of the codebook's codes
    used at least once — the FSQ paper's "codebook usage"; residual: the mean over stages; it
    depends on how many vectors ``x`` holds: compare runs on the same inputs), ``entropy_bits``
    (of one code: the rate an entropy coder reaches) and ``bytes_per_sample`` (the family's
    ``payload_bytes`` of one sample when it defines it, else the nominal bits rounded up to
    bytes)."""
    from qflax.quantizers import code_perplexity

    codes = latent_codes(model, x, **kwargs)
    rows = []
    for path, layer in _latent_layers(model):
        info = {"path": path, **layer.quant_info()}
        c = codes[path]
        family = layer.quant.family
        size = layer.quant.codebook_size
        if size is None:  # no codes to count
            rows.append(info)
            continue
        stages = int(family.code_stages(layer.quant))
        per_stage = round(size ** (1 / stages))
        stage_codes = c.reshape(-1, stages) if stages > 1 else c.reshape(-1, 1)
        perplexities = [
            float(code_perplexity(jnp.asarray(stage_codes[:, s]), per_stage)) for s in range(stages)
        ]
        used = [np.unique(stage_codes[:, s]).size / per_stage for s in range(stages)]
        sample_shape = tuple(c.shape[1:])
        per_sample = math.prod(sample_shape) // stages
        code_bits = math.log2(size)
        bits = per_sample * code_bits
        payload = getattr(family, "payload_bytes", None)
        info.update(
            codes_per_sample=per_sample,
            code_bits=code_bits,
            bits_per_sample=bits,
            perplexity=float(np.prod(perplexities)),
            utilisation=float(np.mean([p / per_stage for p in perplexities])),
            usage=float(np.mean(used)),
            entropy_bits=float(sum(math.log2(max(p, 1.0)) for p in perplexities)),
            bytes_per_sample=(
                int(payload(layer.quant, sample_shape)) if payload else math.ceil(bits / 8)
            ),
        )
        rows.append(info)
    return rows
