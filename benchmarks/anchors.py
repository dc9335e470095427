"""qflax against qwix and AQT: train-step time and accuracy on the same CNN, data and schedule.

Needs the ``bench`` extra (qwix 0.1.8, aqtp 0.9.0), kept out of the main virtualenv::

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -e ".[bench]"
    .venv-bench/bin/python benchmarks/anchors.py                 # 3 epochs each, ~5 min
    .venv-bench/bin/python benchmarks/anchors.py --epochs 1 --only 'float|qwix'

The model is the mnist5k CNN of ``qflax.models`` (conv 32 → BN → ReLU → pool → conv 64 → BN →
ReLU → pool → dense 128 → ReLU → head; ``stem``, ``conv2``, ``dense``, ``head``):

* qflax and qwix quantize the same NNX module (``qflax.layers.quantize_model`` /
  ``qwix.quantize_model(model, qwix.QtProvider([...]), x)``) and train it with the same step
  (``qflax.train.make_train_step``, Adam from ``make_optimizer``);
* AQT's Flax API is Linen (``aqt_flax.AqtDotGeneral`` / ``AqtConvGeneralDilated`` injected into
  ``nn.Dense`` / ``nn.Conv``), so AQT runs a Linen copy of the same network (same layers, BN
  momentum and epsilon, the NNX model's initial weights copied in) with a step written like
  ``make_train_step`` (same loss, same optimizer chain); the Linen float model is timed too,
  so each library's overhead is also given against its own float step.

Every variant starts from the same weights and sees the same batches in the same order.

Quantized layer sets are equal within each comparison: ``conv2 + dense`` (the qflax default
with first and last layer float) for qflax against qwix and against AQT's convolution, and
``dense`` only for qflax against AQT's dense layers (AQT's own MNIST example quantizes only its
dense layers; its convolution injection returns zero gradients, see the ``note`` column).
Bits: qflax ``recipes.absmax(b, b)`` (weights per output channel, activations per tensor,
STE, float gradients); qwix ``QtRule(weight_qtype=intb, act_qtype=intb)`` (QAT, dynamic
absmax scales; its forward dots run on integer operands); AQT ``config.fully_quantized(
fwd_bits=8, bwd_bits=8)`` (its int8 training config: the two backward matmuls quantized
too, with stochastic rounding) and ``fwd_bits=b, bwd_bits=None`` (forward only, the same
work as qflax's recipe).

Every variant trains ``--epochs`` epochs on mnist5k (``qflax.data.load("mnist5k")``, batch 128,
the same shuffled batches; Adam 3e-3, 1 warm-up epoch, cosine), then its test accuracy is
measured on the 1,000 test images. Training is interleaved: at every step index each variant
takes its step on the same batch, the order rotating, and every step is timed; the first
``SKIP_STEPS`` steps are dropped. ``ms/step`` is the median; ratios are medians of per-step
paired ratios. Compile time is ``jit(...).lower(...).compile()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

from qflax import data, models
from qflax import layers as ql
from qflax.models import BN_EPSILON, BN_MOMENTUM
from qflax.train import (
    create_train_state,
    cross_entropy,
    default_config,
    make_eval_step,
    make_optimizer,
    make_train_step,
)

BATCH = 128
SEED = 0
SKIP_STEPS = 2  # steps dropped from the timings (first executions)
CONV_DENSE = ("conv2", "dense")
DENSE = ("dense",)


@dataclasses.dataclass
class Runner:
    """A built variant: its jitted step, live state and evaluation."""

    # step(state, batch) -> (state, metrics with "loss"); state donated.
    step: Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]]
    state: Any
    # accuracy(state, x, y) -> test accuracy in [0, 1].
    accuracy: Callable[[Any, np.ndarray, np.ndarray], float]
    # Gradient norms of the first step per layer (to show layers that get none).
    grad_norms: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row: a library, a bit-width and the layers it quantizes."""

    name: str
    library: str  # "qflax", "qwix", "aqt", "float"
    framework: str  # "nnx" or "linen" (the float reference of the row)
    layers: tuple[str, ...]
    # build(config, steps_per_epoch, sample_x) -> Runner
    build: Callable[..., Runner]


def training_config(epochs: int):
    """experiments/mnist5k/fp.py's optimizer (Adam 3e-3, 1 warm-up epoch, cosine)."""
    config = default_config()
    config.epochs = epochs
    config.batch_size = BATCH
    config.seed = SEED
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 3e-3
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_epochs = 1.0
    return config


# --------------------------------------------------------------------------- NNX: qflax, qwix


def _nnx_cnn() -> nnx.Module:
    return models.build_model("cnn", input_shape=(28, 28, 1), num_classes=10, rngs=nnx.Rngs(SEED))


def _nnx_runner(model: nnx.Module, config, steps_per_epoch: int) -> Runner:
    params = nnx.state(model, nnx.Param)
    tx = make_optimizer(config, params, steps_per_epoch=steps_per_epoch)
    graphdef, state, _ = create_train_state(model, tx, seed=SEED)
    eval_step = make_eval_step(graphdef)

    def accuracy(state, x, y):
        correct = count = 0.0
        for start in range(0, len(x), 500):
            xb, yb = x[start : start + 500], y[start : start + 500]
            out = eval_step(state.params, state.rest, (xb, yb), np.ones(len(xb), np.float32))
            correct += float(out["score_sum"])
            count += float(out["count"])
        return correct / count

    return Runner(make_train_step(graphdef, tx), state, accuracy)


def build_float_nnx(config, steps_per_epoch, sample_x) -> Runner:
    del sample_x
    return _nnx_runner(_nnx_cnn(), config, steps_per_epoch)


def build_qflax(bits: int, layers: tuple[str, ...]):
    def build(config, steps_per_epoch, sample_x) -> Runner:
        model = _nnx_cnn()
        pattern = "^(" + "|".join(layers) + ")$"
        rules = [ql.Rule(pattern, ql.recipes.absmax(bits, bits)), ql.Rule(".*", None)]
        model, report = ql.quantize_model(model, rules, copy=False)
        if tuple(sorted(report.quantized)) != tuple(sorted(layers)):
            raise RuntimeError(f"qflax quantized {report.quantized}, expected {layers}")
        ql.calibrate(model, sample_x)
        return _nnx_runner(model, config, steps_per_epoch)

    return build


def build_qwix(bits: int, layers: tuple[str, ...]):
    def build(config, steps_per_epoch, sample_x) -> Runner:
        import qwix

        qtype = f"int{bits}"
        rule = qwix.QtRule(module_path="|".join(layers), weight_qtype=qtype, act_qtype=qtype)
        model = qwix.quantize_model(_nnx_cnn(), qwix.QtProvider([rule]), sample_x[:2])
        return _nnx_runner(model, config, steps_per_epoch)

    return build


# --------------------------------------------------------------------------- Linen: AQT


class LinenCNN(nn.Module):
    """The qflax CNN in Linen, with AQT's injection points on ``conv2`` and ``dense``."""

    conv2_cls: Any = None  # conv_general_dilated_cls of conv2 (None: float)
    dense_cls: Any = None  # dot_general_cls of dense (None: float)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        def norm(name):
            return nn.BatchNorm(
                use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name
            )

        x = nn.Conv(32, (3, 3), padding="SAME", use_bias=False, name="stem")(x)
        x = nn.max_pool(nn.relu(norm("stem_norm")(x)), (2, 2), strides=(2, 2))
        x = nn.Conv(
            64,
            (3, 3),
            padding="SAME",
            use_bias=False,
            conv_general_dilated_cls=self.conv2_cls,
            name="conv2",
        )(x)
        x = nn.max_pool(nn.relu(norm("conv2_norm")(x)), (2, 2), strides=(2, 2))
        x = nn.Dense(128, dot_general_cls=self.dense_cls, name="dense")(x.reshape(x.shape[0], -1))
        return nn.Dense(10, name="head")(nn.relu(x))


def _linen_runner(module: LinenCNN, config, steps_per_epoch: int, sample_x) -> Runner:
    variables = module.init({"params": jax.random.key(SEED)}, sample_x[:2], train=False)
    batch_stats = variables["batch_stats"]
    # Start from the NNX model's weights, so every variant starts from the same point.
    params = nnx.state(_nnx_cnn(), nnx.Param).to_pure_dict()
    same = jax.tree.structure(params) == jax.tree.structure(variables["params"]) and all(
        a.shape == b.shape
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(variables["params"]), strict=True)
    )
    if not same:
        raise RuntimeError("the Linen CNN's parameters do not match the NNX CNN's")
    tx = make_optimizer(config, params, steps_per_epoch=steps_per_epoch)

    def loss_fn(p, batch_stats, batch, key):
        inputs, labels = batch
        logits, updated = module.apply(
            {"params": p, "batch_stats": batch_stats},
            inputs,
            train=True,
            rngs={"params": key},
            mutable=["batch_stats"],
        )
        return jnp.mean(cross_entropy(logits, labels)), updated["batch_stats"]

    def step(state, batch):
        params, batch_stats, opt_state, key = state
        key, sub = jax.random.split(key)
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, batch, sub
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, batch_stats, opt_state, key), {"loss": loss}

    @jax.jit
    def logits_fn(params, batch_stats, x):
        return module.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=False,
            rngs={"params": jax.random.key(1)},
        )

    def accuracy(state, x, y):
        params, batch_stats = state[0], state[1]
        correct = 0
        for start in range(0, len(x), 500):
            logits = logits_fn(params, batch_stats, x[start : start + 500])
            correct += int(jnp.sum(jnp.argmax(logits, -1) == y[start : start + 500]))
        return correct / len(x)

    # Which layers get a gradient at all (AQT's convolution passes none), outside the timings.
    grads = jax.jit(jax.grad(loss_fn, has_aux=True))(
        params, batch_stats, (sample_x, jnp.zeros(len(sample_x), jnp.int32)), jax.random.key(2)
    )[0]
    norms = {k: float(optax.global_norm(v)) for k, v in grads.items()}
    state = (params, batch_stats, tx.init(params), jax.random.key(SEED + 1))
    return Runner(jax.jit(step, donate_argnums=0), state, accuracy, norms)


def build_float_linen(config, steps_per_epoch, sample_x) -> Runner:
    return _linen_runner(LinenCNN(), config, steps_per_epoch, sample_x)


def _aqt_dot_config(bits: int, backward: bool):
    from aqt.jax.v2 import config as aqt_config

    if backward:  # AQT's int8 training config (its MNIST example): bwd quantized, SR
        return aqt_config.fully_quantized(fwd_bits=bits, bwd_bits=bits)
    return aqt_config.fully_quantized(
        fwd_bits=bits,
        bwd_bits=None,
        use_stochastic_rounding=None,
        vjp_lhs_stochastic_rounding=False,
        vjp_rhs_stochastic_rounding=False,
    )


def build_aqt(bits: int, layers: tuple[str, ...], backward: bool):
    def build(config, steps_per_epoch, sample_x) -> Runner:
        from aqt.jax.v2 import aqt_conv_general
        from aqt.jax.v2 import config as aqt_config
        from aqt.jax.v2.flax import aqt_flax

        dense_cls = conv_cls = None
        if "dense" in layers:
            dense_cls = functools.partial(aqt_flax.AqtDotGeneral, _aqt_dot_config(bits, backward))
        if "conv2" in layers:
            # As AQT's examples/flax_e2e_model.py wires a convolution (forward config only).
            conv_cfg = aqt_config.default_unquantized_config()
            conv_cfg.fwd = aqt_conv_general.conv_general_dilated_make(2, bits, bits)
            conv_cls = functools.partial(aqt_flax.AqtConvGeneralDilated, conv_cfg)
        module = LinenCNN(conv2_cls=conv_cls, dense_cls=dense_cls)
        return _linen_runner(module, config, steps_per_epoch, sample_x)

    return build


# --------------------------------------------------------------------------- the variants

VARIANTS: tuple[Variant, ...] = (
    Variant("float (NNX)", "float", "nnx", (), build_float_nnx),
    Variant("qflax W8A8", "qflax", "nnx", CONV_DENSE, build_qflax(8, CONV_DENSE)),
    Variant("qwix int8 QT", "qwix", "nnx", CONV_DENSE, build_qwix(8, CONV_DENSE)),
    Variant("qflax W4A4", "qflax", "nnx", CONV_DENSE, build_qflax(4, CONV_DENSE)),
    Variant("qwix int4 QT", "qwix", "nnx", CONV_DENSE, build_qwix(4, CONV_DENSE)),
    Variant("qflax W8A8 dense", "qflax", "nnx", DENSE, build_qflax(8, DENSE)),
    Variant("float (Linen)", "float", "linen", (), build_float_linen),
    Variant("AQT int8 fwd+bwd dense", "aqt", "linen", DENSE, build_aqt(8, DENSE, True)),
    Variant("AQT int8 fwd dense", "aqt", "linen", DENSE, build_aqt(8, DENSE, False)),
    Variant("AQT int8 fwd", "aqt", "linen", CONV_DENSE, build_aqt(8, CONV_DENSE, False)),
)

# (qflax row, anchor row): the step-time ratio qflax / anchor and both accuracies.
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("qflax W8A8", "qwix int8 QT"),
    ("qflax W4A4", "qwix int4 QT"),
    ("qflax W8A8", "AQT int8 fwd"),
    ("qflax W8A8 dense", "AQT int8 fwd+bwd dense"),
    ("qflax W8A8 dense", "AQT int8 fwd dense"),
)


def _error_text(error: BaseException) -> str:
    """The exception's type and first line, without the HLO dumps some carry."""
    first = str(error).strip().split("\n")[0]
    return f"{type(error).__name__}: {first[:300]}"


def run(
    variants: Sequence[Variant],
    *,
    epochs: int,
    max_steps: int | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> list[dict[str, Any]]:
    """Builds, compiles, trains (interleaved) and evaluates every variant; one row each."""
    if epochs < 1:
        raise ValueError(f"epochs={epochs} is not allowed; allowed: an int >= 1")
    dataset = data.load("mnist5k", seed=SEED)
    steps_per_epoch = len(dataset.train_x) // BATCH
    config = training_config(epochs)
    sample_x = jnp.asarray(dataset.train_x[:BATCH])
    sample = (sample_x, jnp.asarray(dataset.train_y[:BATCH]))
    rows: dict[str, dict[str, Any]] = {}
    live: dict[str, Runner] = {}
    for v in variants:
        row = rows[v.name] = dict(
            name=v.name, library=v.library, framework=v.framework, layers=v.layers, error=None
        )
        try:
            runner = v.build(config, steps_per_epoch, sample_x)
            start = time.perf_counter()
            runner.step = runner.step.lower(runner.state, sample).compile()
            row["compile_s"] = time.perf_counter() - start
            live[v.name] = runner
            log(f"  {v.name}: compiled in {row['compile_s']:.1f} s")
        except Exception as error:  # noqa: BLE001 - an anchor that fails is a result
            row["error"] = _error_text(error)
            log(f"  {v.name}: FAILED {row['error']}")
            log("".join(traceback.format_exception(error, limit=-2)))
    names = list(live)
    times: dict[str, list[float]] = {n: [] for n in names}
    losses: dict[str, list[float]] = {n: [] for n in names}
    index = 0
    for epoch in range(epochs):
        for x, y in data.batches(dataset.train_x, dataset.train_y, BATCH, seed=SEED, epoch=epoch):
            if max_steps is not None and index >= max_steps:
                break
            batch = (jnp.asarray(x), jnp.asarray(y))
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                runner = live[name]
                start = time.perf_counter()
                runner.state, metrics = runner.step(runner.state, batch)
                jax.block_until_ready((runner.state, metrics))
                times[name].append(time.perf_counter() - start)
                losses[name].append(float(metrics["loss"]))
            index += 1
        log(f"  epoch {epoch + 1}: {index} steps")
    skip = min(SKIP_STEPS, max(index - 1, 0))
    for name in names:
        runner, row = live[name], rows[name]
        row["times"] = times[name][skip:]
        row["ms"] = 1e3 * statistics.median(row["times"])
        row["loss_last"] = losses[name][-1]
        row["accuracy"] = runner.accuracy(runner.state, dataset.test_x, dataset.test_y)
        zero = [k for k, v in runner.grad_norms.items() if v == 0.0]
        row["zero_grad_layers"] = zero
    for name in names:
        row = rows[name]
        reference = "float (NNX)" if row["framework"] == "nnx" else "float (Linen)"
        if reference in live:
            row["x_own_float"] = paired_ratio(row["times"], rows[reference]["times"])
        if "float (NNX)" in live:
            row["x_nnx_float"] = paired_ratio(row["times"], rows["float (NNX)"]["times"])
    return [rows[v.name] for v in variants]


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median of ``a[i] / b[i]`` (the same step index, so the same load)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def format_tables(rows: Sequence[dict[str, Any]]) -> str:
    """The per-variant table and the comparison table (markdown)."""
    by_name = {r["name"]: r for r in rows}
    lines = [
        "| variant | quantized layers | ms/step | × own float | × NNX float | compile s "
        "| test acc | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        layers = " + ".join(r["layers"]) or "none"
        if r["error"]:
            lines.append(f"| {r['name']} | {layers} | — | — | — | — | — | failed: `{r['error']}` |")
            continue
        note = ""
        if r.get("zero_grad_layers"):
            note = "zero gradient to " + ", ".join(r["zero_grad_layers"])
        lines.append(
            f"| {r['name']} | {layers} | {r['ms']:.1f} | {r.get('x_own_float', float('nan')):.2f}"
            f" | {r.get('x_nnx_float', float('nan')):.2f} | {r['compile_s']:.1f} | "
            f"{r['accuracy']:.3f} | {note} |"
        )
    lines += [
        "",
        "| qflax | anchor | layers | qflax / anchor step time | goal ≤ 1.00 | qflax acc "
        "| anchor acc | acc ≥ anchor | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ours, theirs in COMPARISONS:
        a, b = by_name.get(ours), by_name.get(theirs)
        if a is None or b is None:
            continue
        layers = " + ".join(a["layers"])
        if a["error"] or b["error"]:
            failed = theirs if b["error"] else ours
            lines.append(f"| {ours} | {theirs} | {layers} | — | — | — | — | — | {failed} failed |")
            continue
        ratio = paired_ratio(a["times"], b["times"])
        better = a["accuracy"] >= b["accuracy"]
        note = ""
        if b.get("zero_grad_layers"):
            note = (
                f"{theirs} computes no gradient for {', '.join(b['zero_grad_layers'])}: "
                "less work, not like for like"
            )
        lines.append(
            f"| {ours} | {theirs} | {layers} | {ratio:.2f} | {'yes' if ratio <= 1 else '**no**'} "
            f"| {a['accuracy']:.3f} | {b['accuracy']:.3f} | {'yes' if better else '**no**'} "
            f"| {note} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Parses the options, runs, prints the tables; returns the rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per variant")
    parser.add_argument("--only", default=None, help="regex on the variant names")
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (smoke runs)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs={args.epochs} is not allowed; allowed: an int >= 1")
    variants = [v for v in VARIANTS if args.only is None or re.search(args.only, v.name)]

    def log(message):
        print(message, file=sys.stderr, flush=True)

    import importlib.metadata as md

    versions = {}
    for package in ("qwix", "aqtp", "flax"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = "not installed"
    start = time.perf_counter()
    load_before = os.getloadavg()
    rows = run(variants, epochs=args.epochs, max_steps=args.max_steps, log=log)
    load_after = os.getloadavg()
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cpus; "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f"; mnist5k CNN, batch {BATCH}, {args.epochs} epochs each, interleaved; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        f"{time.perf_counter() - start:.0f} s\n"
    )
    print(format_tables(rows))
    return rows


if __name__ == "__main__":
    main()
