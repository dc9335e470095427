"""Forward+backward step time of each reference model at its default size (qflax.models).

One step = loss (softmax cross-entropy), gradients w.r.t. every Param, an SGD update and the
BatchNorm statistics update, as one ``jax.jit`` function on split NNX state (params donated).
Prints the median of ``--repeats`` steps after compilation, plus the compile time.

    python benchmarks/model_step_times.py                    # batch 128, 5 timed steps
    python benchmarks/model_step_times.py --models cnn vit --batch 32

The machine's load average is printed too: on a shared CPU, other jobs inflate the timings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qflax import models

# name -> (registry name, per-example input shape, num_classes, builder kwargs)
CONFIGS: dict[str, tuple[str, tuple[int, ...], int, dict]] = {
    "mlp": ("mlp", (28, 28, 1), 10, {}),
    "cnn": ("cnn", (28, 28, 1), 10, {}),
    "resnet20": ("resnet20", (32, 32, 3), 10, {}),
    "resnet18": ("resnet18", (32, 32, 3), 10, {}),
    "vit": ("vit", (32, 32, 3), 10, {}),
    "char_transformer": ("char_transformer", (128,), 96, {}),
}


def make_step(graphdef: nnx.GraphDef, learning_rate: float = 0.01) -> Callable:
    """A pure SGD step on ``(params, rest)``; ``rest`` holds the BatchNorm statistics."""

    def loss_fn(model, x, y):
        logits = model(x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(params, rest, x, y):
        model = nnx.merge(graphdef, params, rest)
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda p, g: p - learning_rate * g, params, grads))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return params, rest, loss

    return jax.jit(step, donate_argnums=(0, 1))


def time_model(key: str, batch: int, repeats: int) -> dict:
    name, input_shape, num_classes, kwargs = CONFIGS[key]
    model = models.build_model(
        name, input_shape=input_shape, num_classes=num_classes, rngs=nnx.Rngs(0), **kwargs
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    kx, ky = jax.random.split(jax.random.key(0))
    if name == "char_transformer":
        x = jax.random.randint(kx, (batch, *input_shape), 0, num_classes)
        y = jnp.roll(x, -1, axis=1)
    else:
        x = jax.random.normal(kx, (batch, *input_shape))
        y = jax.random.randint(ky, (batch,), 0, num_classes)
    step = make_step(graphdef)
    start = time.perf_counter()
    compiled = step.lower(params, rest, x, y).compile()
    compile_s = time.perf_counter() - start
    params, rest, first_loss = compiled(params, rest, x, y)  # warm-up
    jax.block_until_ready(first_loss)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        params, rest, loss = compiled(params, rest, x, y)
        jax.block_until_ready((params, rest, loss))
        times.append(time.perf_counter() - start)
    return dict(
        model=key,
        input=f"{batch}x" + "x".join(map(str, input_shape)),
        params=num_params,
        compile_s=compile_s,
        median_ms=1e3 * statistics.median(times),
        min_ms=1e3 * min(times),
        losses=(float(first_loss), float(loss)),  # the SGD steps should lower it
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, devices: {jax.devices()}, cpus: {os.cpu_count()}")
    print(f"load average before: {os.getloadavg()}")
    header = f"{'model':<18} {'input':<16} {'params':>11} {'compile s':>10} {'median ms':>10}"
    print(header + f" {'min ms':>9}  loss first -> last")
    for key in args.models:
        r = time_model(key, args.batch, args.repeats)
        print(
            f"{r['model']:<18} {r['input']:<16} {r['params']:>11,} {r['compile_s']:>10.1f} "
            f"{r['median_ms']:>10.1f} {r['min_ms']:>9.1f}  "
            f"{r['losses'][0]:.3f} -> {r['losses'][1]:.3f}",
            flush=True,
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
