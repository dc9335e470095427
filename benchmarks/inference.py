"""Integer inference against the float model: latency (batch 1 and 256) and bytes at rest.

The mnist5k CNN (conv 32 -> conv 64 -> dense 128 -> head, BatchNorm): a float run (``--workdir``, or
a short one trained here into a temporary directory), quantized after training by
``qflax.export.ptq`` twice: W8A8 with every layer on int8 codes, and W4A4 with the first and last
layers float (the main job's layout); and, with the first and last layers float, power-of-two 4-bit
weights on int8 activation codes (``recipes.pow2(4, 8, act_levels="uniform")`` applied to the float
model, activation scales calibrated on 8 training batches: post-training, no fine-tuning) whose
integer program applies the weights as shifts (one ternary int8 product per exponent, combined by
left shifts; "one kernel": the same accumulator from one int8/int16 kernel ``±2^(K−k)``,
``export_integer(..., shifts=False)``). The binary row is a W1A1 run of the ProxConnect++ pairs
layout (``experiments/mnist5k/pairs.py:scratch``, pair BNN, hardtanh CNN, conv2 and dense binary;
``--binary-workdir``, or trained here for ``--epochs``) whose integer program runs XNOR/popcount on
bits packed 32 per uint32 word. Each model runs as one ``jax.jit`` function on the same test images:
the float model, the fake-quant model (float math on quantized values) and the integer program
(``qflax.export.integer_forward``). Timings are medians over ``--repeats`` interleaved rounds (every
variant once per round, after warm-up); batch 1 times ``--inner`` calls per round.

    python benchmarks/inference.py                          # trains 2 + 2 epochs first (~3 min)
    python benchmarks/inference.py --workdir runs/mnist5k-fp \
        --binary-workdir runs/mnist5k/pairs-cnn-scratch-bnn-s0 --repeats 15

Ratio = float time / variant time (> 1: faster than float); bytes ratio = float32 bytes /
packed bytes.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qflax import data
from qflax.export import (
    evaluate_integer,
    export_integer,
    export_model,
    integer_forward,
    load_ptq,
    packed_model_bytes,
    predict,
    ptq,
    static_act_scales,
)
from qflax.export import (
    model_forward as fake_quant_model,
)
from qflax.layers import first_last_float_rules, quantize_model, recipes
from qflax.runs import load_config_file
from qflax.train import default_config, load_model, train_and_evaluate

BATCHES = (1, 256)


def train_float_run(workdir: pathlib.Path, epochs: int) -> None:
    """The mnist5k float baseline's recipe (experiments/mnist5k/fp.py), shortened."""
    config = default_config()
    config.dataset = "mnist5k"
    config.model = "cnn"
    config.epochs = epochs
    config.batch_size = 128
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 3e-3
    config.optimizer.schedule = "cosine"
    config.progress_bar = False
    train_and_evaluate(config, workdir)


def train_binary_run(workdir: pathlib.Path, epochs: int) -> None:
    """The pairs study's W1A1 CNN (BNN pair, from scratch), shortened."""
    config = load_config_file("experiments/mnist5k/pairs.py:scratch")
    config.pair.name = "bnn"
    config.epochs = epochs
    config.progress_bar = False
    train_and_evaluate(config, workdir)


def pow2_model(workdir: pathlib.Path, dataset, batch_size: int) -> dict:
    """The float run with 4-bit power-of-two weights on int8 codes (first/last layers float),
    post-training: its fake-quant forward, integer program, accuracies and packed bytes."""
    model, _, _ = load_model(workdir)
    recipe = recipes.pow2(4, 8, act_levels="uniform")
    model, _ = quantize_model(model, first_last_float_rules(recipe))
    batches = [dataset.train_x[i : i + batch_size] for i in range(0, 8 * batch_size, batch_size)]
    scales = static_act_scales(model, batches)
    forward, state = fake_quant_model(model, scales)  # what `qflax eval --integer` compares with
    forward = jax.jit(forward)
    program = export_integer(model, scales)
    labels = np.asarray(dataset.test_y)
    reference = predict(forward, state, dataset.test_x, 256)
    integer = predict(integer_forward, program, dataset.test_x, 256)
    return {
        "forward": lambda x: forward(state, x),
        "program": program,
        "one_kernel": export_integer(model, scales, shifts=False),  # same int32 accumulator
        "fake_quant_test_accuracy": float(np.mean(reference == labels)),
        "test_accuracy": float(np.mean(integer == labels)),
        "differing_predictions": int(np.sum(integer != reference)),
        "test_examples": int(len(labels)),
        "model_bytes": packed_model_bytes(export_model(model)),
    }


def model_forward(model: nnx.Module):
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    return lambda x: forward(state, x)


def program_forward(program):
    jitted = jax.jit(integer_forward)
    return lambda x: jitted(program, x)


def time_variants(variants: dict, x: jax.Array, repeats: int, inner: int) -> dict[str, float]:
    """Median seconds per call of each variant, rounds interleaved."""
    for fn in variants.values():  # compile and warm up
        jax.block_until_ready(fn(x))
        jax.block_until_ready(fn(x))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(inner):
                out = fn(x)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="a finished float mnist5k CNN run; default: train one")
    parser.add_argument(
        "--binary-workdir", help="a finished pairs.py (W1A1, hardtanh) run; default: train one"
    )
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the runs trained here")
    parser.add_argument("--repeats", type=int, default=11, help="interleaved timing rounds")
    parser.add_argument("--inner", type=int, default=20, help="calls per round at batch 1")
    args = parser.parse_args()
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        workdir = pathlib.Path(args.workdir) if args.workdir else tmp / "fp"
        if not args.workdir:
            train_float_run(workdir, args.epochs)
        float_model, config, _ = load_model(workdir)
        summaries = {
            "W8A8": ptq(workdir, tmp / "w8a8", weight_bits=8, act_bits=8, calibration="mse"),
            "W4A4 first/last float": ptq(
                workdir,
                tmp / "w4a4",
                weight_bits=4,
                act_bits=4,
                calibration="mse",
                first_last_float=True,
            ),
        }
        models = {name: load_ptq(tmp / name.split()[0].lower()) for name in summaries}
        dataset = data.load(config.dataset, seed=config.seed)
        pow2 = pow2_model(workdir, dataset, config.batch_size)
        binary_dir = pathlib.Path(args.binary_workdir) if args.binary_workdir else tmp / "w1a1"
        if not args.binary_workdir:
            train_binary_run(binary_dir, args.epochs)
        binary = evaluate_integer(binary_dir)
        binary_model, _, _ = load_model(binary_dir)
    variants = {"float": model_forward(float_model)}
    for name, model in models.items():
        variants[f"{name} fake-quant"] = model_forward(model)
        variants[f"{name} integer"] = program_forward(export_integer(model))
    pow2_name = "pow2 W4A8 first/last float (PTQ)"
    variants[f"{pow2_name} fake-quant"] = pow2["forward"]
    variants[f"{pow2_name} integer (shifts)"] = program_forward(pow2["program"])
    variants[f"{pow2_name} integer (one kernel)"] = program_forward(pow2["one_kernel"])
    binary_name = "W1A1 BNN first/last float"
    variants[f"{binary_name} fake-quant"] = model_forward(binary_model)
    variants[f"{binary_name} integer (XNOR)"] = program_forward(export_integer(binary_model, {}))
    float_bytes = next(iter(summaries.values()))["float32_bytes"]
    rows = {"float": (float_bytes, summaries["W8A8"]["fp_test_accuracy"])}
    for name, s in summaries.items():
        rows[f"{name} fake-quant"] = (s["model_bytes"], s["test_accuracy"])
        rows[f"{name} integer"] = (s["model_bytes"], s["integer_test_accuracy"])
    rows[f"{pow2_name} fake-quant"] = (pow2["model_bytes"], pow2["fake_quant_test_accuracy"])
    rows[f"{pow2_name} integer (shifts)"] = (pow2["model_bytes"], pow2["test_accuracy"])
    rows[f"{pow2_name} integer (one kernel)"] = (pow2["model_bytes"], pow2["test_accuracy"])
    rows[f"{binary_name} fake-quant"] = (binary["model_bytes"], binary["fake_quant_test_accuracy"])
    rows[f"{binary_name} integer (XNOR)"] = (binary["model_bytes"], binary["test_accuracy"])
    medians = {}
    for batch in BATCHES:
        x = jnp.asarray(np.asarray(dataset.test_x[:batch]))
        inner = args.inner if batch == 1 else 1
        medians[batch] = time_variants(variants, x, args.repeats, inner)

    print(
        f"Run: jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} cpus; "
        f"mnist5k CNN ({'--workdir ' + args.workdir if args.workdir else f'{args.epochs} epochs'}"
        f"), {args.repeats} interleaved repeats (batch 1: {args.inner} calls each); load "
        f"average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; "
        f"{time.perf_counter() - start:.0f} s\n"
    )
    header = "| model | test acc | bytes (×smaller) |"
    for batch in BATCHES:
        header += f" batch {batch} ms (×float) |"
    print(header)
    print("|---" * (3 + len(BATCHES)) + "|")
    for name, (nbytes, accuracy) in rows.items():
        line = f"| {name} | {accuracy:.3f} | {nbytes:,} ({float_bytes / nbytes:.2f}) |"
        for batch in BATCHES:
            t = medians[batch][name]
            line += f" {t * 1e3:.3f} ({medians[batch]['float'] / t:.2f}) |"
        print(line)
    differ = {name: s for name, s in summaries.items()}
    differ[pow2_name] = pow2
    differ[binary_name] = binary
    for name, s in differ.items():
        key = "differing_predictions"
        print(
            f"\n{name}: {s[key]} of {s['test_examples']} test predictions differ between "
            "integer and fake-quant"
        )


if __name__ == "__main__":
    main()
