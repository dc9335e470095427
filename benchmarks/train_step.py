"""Training-step overhead of the quantization recipes against the float step, per model.

Each variant is one jitted training step built exactly as ``qflax train`` builds it
(``qflax.train.build_trainer`` from a training config: ``make_optimizer``, ``create_train_state``,
``make_train_step`` with the state donated; for GDNSQ the bit-width penalty's
``PenaltySettings``): Adam, cross-entropy, the
BatchNorm statistics and the optimizer update included. Every quantized variant keeps the first
(``stem``) and last (``head``) layer float (``qflax.layers.first_last_float_rules``) and is
calibrated on the benchmark batch, as the loop calibrates on the first training batch.

Variants: ``float``; ``W8A8`` (``recipes.absmax(8, 8)``: scales recomputed from each tensor);
``W4A4`` (``recipes.learned_step(4, 4)``: learned scales); ``W8A8 int8`` and ``W4A4 int8``
(the same with ``forward_dtype="int8"``: the dense and einsum layers' forward products on int8
codes, int32 accumulation); ``GDNSQ`` (``recipes.gdnsq(4, 4)``,
learned bit-widths, with the exterior-point penalty in the loss; no teacher: distillation would
add a float forward pass of its own; the STE rule of experiments/mnist5k/gdnsq.py), ``GDNSQ
noise`` and ``GDNSQ noise-hash`` (the paper's noise-scale rule, its signs from threefry or the
counter hash); ``BNN++`` (``recipes.binary(pair="bnn++", mu=5.0)``);
fully quantized training (METHODS.md §7, ``experiments/fqt_rows.py``): ``FQT PSQ8`` and
``FQT BHQ8`` (absmax W8A8 with 8-bit per-sample / block-Householder stochastic gradients, two
draws per layer; the rounding noise a counter hash, the default), the same two with
``noise="threefry"`` (``jax.random.uniform``; no goal) and ``INT4 HQ+LSS`` (the Hadamard INT4
forward, bit-split gradients with leverage-score sampling).
Models: the small CNN (28×28×1), ResNet-20 (32×32×3), and the character transformer at its
default size (d128, depth 4, 4 heads, 128 tokens, vocabulary 96; its attention's score and value
einsums are activation×activation products, which the layer rules leave in float), and a
matmul-bound MLP (28×28 images flattened, four hidden layers of 1,024).

Timing: after compilation and one warm-up step per variant, every round runs every variant of a
model once, round-robin, the order rotating between rounds, so a change in the machine's load
hits all variants alike; one sample is the mean of ``k`` back-to-back steps (``k`` chosen so a
sample of the float step lasts ~0.2 s). ``ms/step`` is the median over rounds; ``×float`` is the
median over rounds of the paired ratio (variant sample / float sample of the same round).
``compile s`` is ``jit(...).lower(...).compile()`` (trace, lower and XLA compile: the first
call's cost less one step). Memory is XLA's own account of the compiled step
(``compiled.memory_analysis()``): ``temp MiB`` is the scratch the step allocates beyond its
arguments and outputs (activations kept for the backward pass, gradients, fusion temporaries),
``args MiB`` the donated state plus the batch; not the process RSS.

    python benchmarks/train_step.py                          # every model and variant, 5 rounds
    python benchmarks/train_step.py --models cnn --rounds 9
    python benchmarks/train_step.py --quick                  # 3 rounds instead of 5

Goals: a fixed-bit fake-quantized step (W8A8, W4A4, BNN++) ≤ 1.10× the float step, GDNSQ
≤ 1.25×, an 8-bit FQT step ≤ 1.30× (AQT's 8/8 configuration measured 2.6× here); the INT4 row
has no goal of its own (reported). The machine's load average is printed next to the table: on
a shared CPU the ratios carry noise (see RESULTS.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from qflax import layers as ql
from qflax import models
from qflax.train import build_trainer, default_config

# Training-set size behind the schedules' steps_per_epoch (mnist5k: 4,000 images, batch 128).
STEPS_PER_EPOCH = 31
FIXED_BIT_GOAL = 1.10
GDNSQ_GOAL = 1.25
FQT_GOAL = 1.30
SAMPLE_SECONDS = 0.2  # aim of one timed sample (k back-to-back steps) of the float step


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model."""

    # Registry name (qflax.models.MODELS).
    name: str
    # Per-example input shape (channels last; (seq_len,) for the char LM).
    input_shape: tuple[int, ...]
    # Logits (the vocabulary for the char LM).
    num_classes: int
    # Model knobs (qflax.models.build_model kwargs).
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One benchmarked quantization of a model."""

    # Table name.
    name: str
    # () -> the recipe of the quantized layers, or None for the float model.
    recipe: Callable[[], ql.Recipe] | None
    # Goal as × the float step (None: the float row).
    goal: float | None
    # Config overrides (dotted key -> value) applied to the training config.
    config: dict[str, Any] = dataclasses.field(default_factory=dict)


MODELS: dict[str, ModelSpec] = {
    "cnn": ModelSpec("cnn", (28, 28, 1), 10),
    "resnet20": ModelSpec("resnet20", (32, 32, 3), 10),
    "char_transformer": ModelSpec("char_transformer", (128,), 96),
    # Matmul-bound: four 1024-wide layers on flattened 28×28 images (the three 1024×1024
    # blocks are quantized; stem and head stay float).
    "mlp": ModelSpec("mlp", (28, 28, 1), 10, {"hidden": (1024, 1024, 1024, 1024)}),
}

VARIANTS: tuple[Variant, ...] = (
    Variant("float", None, None),
    Variant("W8A8", lambda: ql.recipes.absmax(8, 8), FIXED_BIT_GOAL),
    Variant("W4A4", lambda: ql.recipes.learned_step(4, 4), FIXED_BIT_GOAL),
    # The same two with the forward products on int8 codes (Recipe.forward_dtype="int8"; dense
    # and einsum layers, convolutions stay float32).
    Variant(
        "W8A8 int8",
        lambda: ql.recipes.build("absmax", weight_bits=8, act_bits=8, forward_dtype="int8"),
        FIXED_BIT_GOAL,
    ),
    Variant(
        "W4A4 int8",
        lambda: ql.recipes.build("learned_step", weight_bits=4, act_bits=4, forward_dtype="int8"),
        FIXED_BIT_GOAL,
    ),
    # experiments/mnist5k/gdnsq.py's settings (ste backward, start at 8 bits, constant rates).
    Variant(
        "GDNSQ",
        lambda: ql.recipes.gdnsq(4, 4, backward="ste", init_bits=8.0),
        GDNSQ_GOAL,
        {
            "optimizer.schedule": "constant",
            "optimizer.warmup_epochs": 0.0,
            "quant.learning_rate": 0.05,
            "penalty.warmup_epochs": 0.5,
        },
    ),
    # The paper's noise-scale rule (the recipe default since issue 17): its signs drawn by
    # threefry (the default) or by the counter hash.
    *(
        Variant(
            name,
            lambda noise=noise: ql.recipes.gdnsq(4, 4, init_bits=8.0, noise=noise),
            GDNSQ_GOAL,
            {
                "optimizer.schedule": "constant",
                "optimizer.warmup_epochs": 0.0,
                "quant.learning_rate": 0.05,
                "penalty.warmup_epochs": 0.5,
            },
        )
        for name, noise in (("GDNSQ noise", "threefry"), ("GDNSQ noise-hash", "hash"))
    ),
    Variant("BNN++", lambda: ql.recipes.binary(pair="bnn++", mu=5.0), FIXED_BIT_GOAL),
    Variant(
        "FQT PSQ8",
        lambda: ql.recipes.build("absmax", weight_bits=8, act_bits=8, grad="psq", grad_bits=8),
        FQT_GOAL,
    ),
    Variant(
        "FQT BHQ8",
        lambda: ql.recipes.build("absmax", weight_bits=8, act_bits=8, grad="bhq", grad_bits=8),
        FQT_GOAL,
    ),
    # The same with the rounding noise of jax.random.uniform (the default before 2026-12-05).
    Variant(
        "FQT PSQ8 threefry",
        lambda: ql.recipes.build(
            "absmax",
            weight_bits=8,
            act_bits=8,
            grad="psq",
            grad_bits=8,
            grad_config={"noise": "threefry"},
        ),
        None,
    ),
    Variant(
        "FQT BHQ8 threefry",
        lambda: ql.recipes.build(
            "absmax",
            weight_bits=8,
            act_bits=8,
            grad="bhq",
            grad_bits=8,
            grad_config={"noise": "threefry"},
        ),
        None,
    ),
    Variant(
        "INT4 HQ+LSS",
        lambda: ql.recipes.build("hadamard_int4", weight_bits=4, act_bits=4, grad="bitsplit"),
        None,
    ),
)


def training_config(spec: ModelSpec, variant: Variant) -> ml_collections.ConfigDict:
    """The training config the step is built from (defaults: Adam, cosine, batch 128)."""
    config = default_config()
    config.model = spec.name
    for key, value in variant.config.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def make_batch(spec: ModelSpec, batch: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """A random batch: images ~ N(0, 1) and labels, or tokens and next-token targets."""
    kx, ky = jax.random.split(jax.random.key(seed))
    if spec.name == "char_transformer":
        x = jax.random.randint(kx, (batch, *spec.input_shape), 0, spec.num_classes)
        return x, jnp.roll(x, -1, axis=1)
    x = jax.random.normal(kx, (batch, *spec.input_shape), jnp.float32)
    return x, jax.random.randint(ky, (batch,), 0, spec.num_classes)


@dataclasses.dataclass
class Prepared:
    """A compiled step and its live state."""

    variant: Variant
    compiled: Any
    state: Any
    compile_s: float
    temp_bytes: int | None
    arg_bytes: int | None
    quantized: tuple[str, ...]
    penalty: bool
    losses: list[float] = dataclasses.field(default_factory=list)
    samples: list[float] = dataclasses.field(default_factory=list)

    def run(self, batch, k: int) -> float:
        """Seconds per step over ``k`` back-to-back steps (state carried on)."""
        start = time.perf_counter()
        metrics = None
        for _ in range(k):
            self.state, metrics = self.compiled(self.state, batch)
        jax.block_until_ready((self.state, metrics))
        elapsed = (time.perf_counter() - start) / k
        self.losses.append(float(metrics["loss"]))
        return elapsed


def prepare(spec: ModelSpec, variant: Variant, batch: tuple[jax.Array, jax.Array]) -> Prepared:
    """Builds, quantizes, calibrates and compiles one variant's train step (as the loop does)."""
    config = training_config(spec, variant)
    model = models.build_model(
        spec.name,
        input_shape=spec.input_shape,
        num_classes=spec.num_classes,
        rngs=nnx.Rngs(0),
        **spec.kwargs,
    )
    quantized: tuple[str, ...] = ()
    if variant.recipe is not None:
        rules = ql.first_last_float_rules(variant.recipe())
        model, report = ql.quantize_model(model, rules, copy=False)
        quantized = tuple(report.quantized)
        ql.calibrate(model, batch[0])
    trainer = build_trainer(config, model, steps_per_epoch=STEPS_PER_EPOCH)
    step, state, penalty = trainer.train_step, trainer.state, trainer.penalty
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    temp = args = None
    try:
        analysis = compiled.memory_analysis()
        temp, args = int(analysis.temp_size_in_bytes), int(analysis.argument_size_in_bytes)
    except Exception:  # noqa: BLE001 - a backend without the analysis: leave the cells empty
        pass
    return Prepared(variant, compiled, state, compile_s, temp, args, quantized, penalty is not None)


def measure_model(
    spec: ModelSpec,
    variants: Sequence[Variant],
    *,
    rounds: int,
    batch_size: int,
    log: Callable[[str], None] = lambda message: None,
) -> list[dict[str, Any]]:
    """Times every variant of one model interleaved; returns one row per variant.

    The first variant is the reference (``float``); ratios are paired per round.
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds} is not allowed; allowed: an int >= 1")
    batch = make_batch(spec, batch_size)
    prepared = []
    for variant in variants:
        p = prepare(spec, variant, batch)
        log(f"  {spec.name}/{variant.name}: compiled in {p.compile_s:.1f} s")
        prepared.append(p)
    warm = [p.run(batch, 1) for p in prepared]  # first execution (page faults, thread pools)
    k = max(1, min(20, math.ceil(SAMPLE_SECONDS / max(warm[0], 1e-6))))
    for r in range(rounds):
        order = list(range(len(prepared)))
        shift = r % len(order)
        order = order[shift:] + order[:shift]
        if r % 2:
            order.reverse()
        for i in order:
            prepared[i].samples.append(prepared[i].run(batch, k))
    reference = prepared[0].samples
    rows = []
    for p in prepared:
        ratios = [s / f for s, f in zip(p.samples, reference, strict=True)]
        ratio = statistics.median(ratios)
        rows.append(
            dict(
                model=spec.name,
                variant=p.variant.name,
                quantized=p.quantized,
                penalty=p.penalty,
                ms=1e3 * statistics.median(p.samples),
                ratio=ratio,
                ratio_min=min(ratios),
                ratio_max=max(ratios),
                goal=p.variant.goal,
                met=None if p.variant.goal is None else bool(ratio <= p.variant.goal),
                compile_s=p.compile_s,
                temp_mib=None if p.temp_bytes is None else p.temp_bytes / 2**20,
                arg_mib=None if p.arg_bytes is None else p.arg_bytes / 2**20,
                steps_per_sample=k,
                rounds=rounds,
                loss_first=p.losses[0],
                loss_last=p.losses[-1],
            )
        )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The markdown table of :func:`measure_model` rows."""

    def mib(value):
        return "—" if value is None else f"{value:,.1f}"

    lines = [
        "| model | variant | quantized layers | ms/step | ×float (min–max) | goal | met "
        "| compile s | temp MiB | args MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        goal = "—" if r["goal"] is None else f"≤ {r['goal']:.2f}"
        met = "—" if r["met"] is None else ("yes" if r["met"] else "**no**")
        layers = len(r["quantized"])
        quantized = "none" if not layers else f"{layers}" + (" + penalty" if r["penalty"] else "")
        lines.append(
            f"| {r['model']} | {r['variant']} | {quantized} | {r['ms']:,.1f} | "
            f"{r['ratio']:.2f} ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) | {goal} | {met} | "
            f"{r['compile_s']:.1f} | {mib(r['temp_mib'])} | {mib(r['arg_mib'])} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Parses the options, runs the benchmark, prints the table; returns the rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[v.name for v in VARIANTS],
        choices=[v.name for v in VARIANTS],
        help="float is always included (the reference)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="3 rounds (overrides --rounds)")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    if rounds < 1:
        parser.error(f"--rounds={rounds} is not allowed; allowed: an int >= 1")
    names = {"float", *args.variants}
    variants = [v for v in VARIANTS if v.name in names]

    def log(message):
        print(message, file=sys.stderr, flush=True)

    start = time.perf_counter()
    load_before = os.getloadavg()
    rows = []
    for key in args.models:
        log(f"{key}:")
        rows += measure_model(MODELS[key], variants, rounds=rounds, batch_size=args.batch, log=log)
    load_after = os.getloadavg()
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cpus; batch "
        f"{args.batch}, {rounds} interleaved rounds; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after; {time.perf_counter() - start:.0f} s\n"
    )
    print(format_table(rows))
    print()
    judged = [r for r in rows if r["met"] is not None]
    missed = [f"{r['model']}/{r['variant']}" for r in judged if not r["met"]]
    print(f"goal met by {len(judged) - len(missed)}/{len(judged)}; missed: {missed}")
    return rows


if __name__ == "__main__":
    main()
