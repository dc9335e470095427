"""Integer inference against the float model: latency (batch 1 and 256) and bytes at rest.

Two models on mnist5k, one table each. The CNN (conv 32 -> conv 64 -> dense 128 -> head,
BatchNorm; conv-dominated): a float run (``--workdir``, or a short one trained here into a
temporary directory), quantized after training by ``qflax.export.ptq`` twice: W8A8 with every
layer on int8 codes, and W4A4 with the first and last layers float (the main job's layout); and,
with the first and last layers float, power-of-two 4-bit weights on int8 activation codes
(``recipes.pow2(4, 8, act_levels="uniform")`` applied to the float model, activation scales
calibrated on 8 training batches: post-training, no fine-tuning) whose integer program applies
the weights as shifts (one ternary int8 product per exponent, combined by left shifts; "one
kernel": the same accumulator from one int8/int16 kernel ``±2^(K−k)``,
``export_integer(..., shifts=False)``). The binary row is a W1A1 run of the ProxConnect++ pairs
layout (``experiments/mnist5k/pairs.py:scratch``, pair BNN, hardtanh CNN, conv2 and dense binary;
``--binary-workdir``, or trained here for ``--epochs``) whose integer program runs XNOR/popcount
on bits packed 32 per uint32 word. The MLP (784 -> ``--mlp-hidden`` -> 10, default 1024 ×3;
matmul-dominated): a float run (``--mlp-workdir`` or trained here), its PTQ W8A8 (every layer on
int8 codes) and a W1A1 pairs run of the same MLP (``--mlp-binary-workdir`` or trained here;
stem and head float, the hidden blocks XNOR/popcount). Each model runs as one ``jax.jit``
function on the same test images: the float model, the fake-quant model (float math on quantized
values) and the integer program (``qflax.export.integer_forward``). Timings are medians over
``--repeats`` interleaved rounds (every variant of a table once per round, after warm-up); batch
1 times ``--inner`` calls per round.

A third table times the kernels alone at batch 256 (what XLA:CPU makes of int8 operands at these
shapes): each model's layers as float32 and as int8 × int8 → int32 (``dot_general``,
``conv_general_dilated`` with ``preferred_element_type=int32``, and a convolution as im2col
patches times the kernel in one int8 ``dot_general``), an einsum projection, and one binary
dense layer as XNOR/popcount.

    python benchmarks/inference.py                          # trains 2 + 2 + 2 + 2 epochs (~4 min)
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
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

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
from qflax.export.integer._arith import CONV_DIMS, im2col, pack_words, xnor_dot
from qflax.layers import first_last_float_rules, quantize_model, recipes
from qflax.runs import load_config_file
from qflax.train import default_config, load_model, train_and_evaluate

BATCHES = (1, 256)
MLP_HIDDEN = (1024, 1024, 1024)


def train_float_run(
    workdir: pathlib.Path, epochs: int, model: str = "cnn", hidden: tuple[int, ...] = ()
) -> None:
    """The mnist5k float baseline's recipe (experiments/mnist5k/fp.py), shortened."""
    config = default_config()
    config.dataset = "mnist5k"
    config.model = model
    if hidden:
        config.model_kwargs.hidden = tuple(hidden)
    config.epochs = epochs
    config.batch_size = 128
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 3e-3 if model == "cnn" else 1e-3
    config.optimizer.schedule = "cosine"
    config.progress_bar = False
    train_and_evaluate(config, workdir)


def train_binary_run(
    workdir: pathlib.Path, epochs: int, model: str = "cnn", hidden: tuple[int, ...] = ()
) -> None:
    """The pairs study's W1A1 model (BNN pair, from scratch, hardtanh), shortened."""
    config = load_config_file("experiments/mnist5k/pairs.py:scratch")
    config.model = model
    if hidden:
        config.model_kwargs.hidden = tuple(hidden)
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


def time_variants(variants: dict, inputs: dict, repeats: int, inner: int) -> dict[str, float]:
    """Median seconds per call of each variant on its arguments ``inputs[name]``, rounds
    interleaved."""
    for name, fn in variants.items():  # compile and warm up
        jax.block_until_ready(fn(*inputs[name]))
        jax.block_until_ready(fn(*inputs[name]))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            args = inputs[name]
            start = time.perf_counter()
            for _ in range(inner):
                out = fn(*args)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(t) for name, t in times.items()}


def cnn_section(args, tmp: pathlib.Path) -> tuple[dict, dict, dict, np.ndarray]:
    """The CNN's variants, their (bytes, accuracy) rows, prediction agreement, test images."""
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
    differ = dict(summaries)
    differ[pow2_name] = pow2
    differ[binary_name] = binary
    return variants, rows, differ, np.asarray(dataset.test_x[: max(BATCHES)])


def mlp_section(args, tmp: pathlib.Path) -> tuple[dict, dict, dict, np.ndarray]:
    """The MLP's variants (float, PTQ W8A8, W1A1 pairs), their rows, prediction agreement and
    test images."""
    hidden = tuple(args.mlp_hidden)
    workdir = pathlib.Path(args.mlp_workdir) if args.mlp_workdir else tmp / "mlp-fp"
    if not args.mlp_workdir:
        train_float_run(workdir, args.epochs, "mlp", hidden)
    float_model, config, _ = load_model(workdir)
    dataset = data.load(config.dataset, seed=config.seed)
    summary = ptq(workdir, tmp / "mlp-w8a8", weight_bits=8, act_bits=8, calibration="mse")
    w8a8 = load_ptq(tmp / "mlp-w8a8")
    binary_dir = (
        pathlib.Path(args.mlp_binary_workdir) if args.mlp_binary_workdir else tmp / "mlp-w1a1"
    )
    if not args.mlp_binary_workdir:
        train_binary_run(binary_dir, args.epochs, "mlp", hidden)
    binary = evaluate_integer(binary_dir)
    binary_model, _, _ = load_model(binary_dir)
    binary_name = "W1A1 BNN first/last float"
    variants = {
        "float": model_forward(float_model),
        "W8A8 fake-quant": model_forward(w8a8),
        "W8A8 integer": program_forward(export_integer(w8a8)),
        f"{binary_name} fake-quant": model_forward(binary_model),
        f"{binary_name} integer (XNOR)": program_forward(export_integer(binary_model, {})),
    }
    rows = {
        "float": (summary["float32_bytes"], summary["fp_test_accuracy"]),
        "W8A8 fake-quant": (summary["model_bytes"], summary["test_accuracy"]),
        "W8A8 integer": (summary["model_bytes"], summary["integer_test_accuracy"]),
        f"{binary_name} fake-quant": (binary["model_bytes"], binary["fake_quant_test_accuracy"]),
        f"{binary_name} integer (XNOR)": (binary["model_bytes"], binary["test_accuracy"]),
    }
    differ = {"W8A8": summary, binary_name: binary}
    return variants, rows, differ, np.asarray(dataset.test_x[: max(BATCHES)])


def _conv(dtype, strides=(1, 1)):
    kwargs = {} if dtype == jnp.float32 else {"preferred_element_type": jnp.int32}
    return jax.jit(
        lambda x, w: lax.conv_general_dilated(
            x, w, strides, "SAME", dimension_numbers=CONV_DIMS, **kwargs
        )
    )


def _im2col_conv(dtype):
    kwargs = {} if dtype == jnp.float32 else {"preferred_element_type": jnp.int32}

    def conv(x, w):  # as integer_forward runs integer convolutions
        patches = im2col(x, w.shape[:2], (1, 1), "SAME")
        rows = patches.reshape(-1, patches.shape[-1])
        acc = lax.dot_general(
            rows, w.reshape(rows.shape[-1], -1), (((1,), (0,)), ((), ())), **kwargs
        )
        return acc.reshape(*patches.shape[:-1], w.shape[-1])

    return jax.jit(conv)


def _dense(dtype):
    kwargs = {} if dtype == jnp.float32 else {"preferred_element_type": jnp.int32}
    return jax.jit(lambda x, w: lax.dot_general(x, w, (((1,), (0,)), ((), ())), **kwargs))


def _einsum(dtype):
    kwargs = {} if dtype == jnp.float32 else {"preferred_element_type": jnp.int32}
    return jax.jit(lambda x, w: jnp.einsum("bsd,dhk->bshk", x, w, **kwargs))


def kernel_section(batch: int, repeats: int) -> list[tuple[str, str, dict[str, float]]]:
    """``(layer, shapes, {kind: seconds})`` of single layers at ``batch``: float32 and int8."""
    rng = np.random.default_rng(0)

    def arrays(*shapes):
        f = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
        i = [jnp.asarray(rng.integers(-127, 128, s), jnp.int8) for s in shapes]
        return f, i

    layers: list[tuple[str, str, dict[str, Callable], dict[str, tuple]]] = []
    for name, xs, ws in (
        ("CNN stem conv 3×3", (batch, 28, 28, 1), (3, 3, 1, 32)),
        ("CNN conv2 3×3", (batch, 14, 14, 32), (3, 3, 32, 64)),
    ):
        (xf, wf), (xi, wi) = arrays(xs, ws)
        fns = {
            "float32": _conv(jnp.float32),
            "int8": _conv(jnp.int8),
            "im2col float32": _im2col_conv(jnp.float32),
            "im2col int8": _im2col_conv(jnp.int8),
        }
        ins = {"float32": (xf, wf), "int8": (xi, wi)}
        ins |= {"im2col float32": (xf, wf), "im2col int8": (xi, wi)}
        layers.append((name, f"x {xs}, w {ws}", fns, ins))
    for name, xs, ws in (
        ("CNN dense", (batch, 3136), (3136, 128)),
        ("MLP stem", (batch, 784), (784, 1024)),
        ("MLP block", (batch, 1024), (1024, 1024)),
    ):
        (xf, wf), (xi, wi) = arrays(xs, ws)
        fns = {"float32": _dense(jnp.float32), "int8": _dense(jnp.int8)}
        layers.append((name, f"x {xs}, w {ws}", fns, {"float32": (xf, wf), "int8": (xi, wi)}))
        if name == "MLP block":
            bits = jnp.asarray(rng.integers(0, 2, xs), jnp.uint8)
            words = pack_words(jnp.asarray(rng.integers(0, 2, ws[::-1]), jnp.uint8)).T
            fns["XNOR"] = jax.jit(lambda b, k, shape=ws: xnor_dot(b, k, shape))
            layers[-1][3]["XNOR"] = (bits, words)
    xs, ws = (batch // 8, 64, 512), (512, 8, 64)  # a transformer projection, batch·seq rows
    (xf, wf), (xi, wi) = arrays(xs, ws)
    fns = {"float32": _einsum(jnp.float32), "int8": _einsum(jnp.int8)}
    layers.append(("einsum bsd,dhk->bshk", f"x {xs}, w {ws}", fns, {"float32": (xf, wf)}))
    layers[-1][3]["int8"] = (xi, wi)
    out = []
    for name, shapes, fns, ins in layers:
        out.append((name, shapes, time_variants(fns, ins, repeats, 1)))
    return out


def print_table(title: str, rows: dict, medians: dict) -> None:
    float_bytes = rows["float"][0]
    print(f"\n{title}\n")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="a finished float mnist5k CNN run; default: train one")
    parser.add_argument(
        "--binary-workdir", help="a finished pairs.py (W1A1, hardtanh) run; default: train one"
    )
    parser.add_argument("--mlp-workdir", help="a finished float mnist5k MLP run (--mlp-hidden)")
    parser.add_argument("--mlp-binary-workdir", help="a finished pairs.py MLP run (W1A1)")
    parser.add_argument(
        "--mlp-hidden", type=int, nargs="+", default=MLP_HIDDEN, help="MLP hidden widths"
    )
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the runs trained here")
    parser.add_argument("--repeats", type=int, default=11, help="interleaved timing rounds")
    parser.add_argument("--inner", type=int, default=20, help="calls per round at batch 1")
    parser.add_argument(
        "--models", nargs="+", default=["cnn", "mlp", "kernels"], help="tables to print"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    sections = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        if "cnn" in args.models:
            sections["mnist5k CNN"] = cnn_section(args, tmp)
        if "mlp" in args.models:
            sections[f"mnist5k MLP 784-{'-'.join(map(str, args.mlp_hidden))}-10"] = mlp_section(
                args, tmp
            )
    medians = {}
    for title, (variants, _, _, test_x) in sections.items():
        medians[title] = {}
        for batch in BATCHES:
            x = (jnp.asarray(test_x[:batch]),)
            inner = args.inner if batch == 1 else 1
            inputs = {name: x for name in variants}
            medians[title][batch] = time_variants(variants, inputs, args.repeats, inner)
    kernels = kernel_section(256, args.repeats) if "kernels" in args.models else []

    source = "--workdir " + args.workdir if args.workdir else f"{args.epochs} epochs"
    print(
        f"Run: jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} cpus; "
        f"mnist5k ({source}), {args.repeats} interleaved repeats (batch 1: {args.inner} calls "
        f"each); load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; "
        f"{time.perf_counter() - start:.0f} s"
    )
    for title, (_, rows, differ, _) in sections.items():
        print_table(title, rows, medians[title])
        for name, s in differ.items():
            print(
                f"\n{name}: {s['differing_predictions']} of {s['test_examples']} test predictions "
                "differ between integer and fake-quant"
            )
    if kernels:
        print("\nSingle layers at batch 256, ms (×float32)\n")
        kinds = list(dict.fromkeys(k for _, _, t in kernels for k in t))
        print("| layer | shapes | " + " | ".join(kinds) + " |")
        print("|---" * (2 + len(kinds)) + "|")
        for name, shapes, t in kernels:
            cells = [
                f"{t[k] * 1e3:.3f} ({t['float32'] / t[k]:.2f})" if k in t else "—" for k in kinds
            ]
            print(f"| {name} | {shapes} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
