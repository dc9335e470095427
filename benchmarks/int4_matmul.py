"""The INT4 (Xi et al. 2023) forward matmul: fake quant in float against int8 codes with int32
accumulation, side by side with the float32 matmul.

For each transformer-sized shape ``X (tokens, d_in) · W (d_in, d_out)`` (tokens = 128·64), one
jitted function per variant, all timed in one process, interleaved (every variant once per round,
after warm-up), medians over ``--repeats`` rounds:

* ``float``: ``X @ W`` in float32 (the reference; ratio 1);
* ``fake-quant HQ``: Hadamard (block 32) on both operands, LSQ quantize-dequantize at a fixed step
  (grid [−8, 7]), float matmul: ``Q(XH)·Q(WH)ᵀ``;
* ``layer path``: what a ``QuantLinear`` with ``recipes.hadamard_int4`` computes in training:
  ``hadamard_quantize`` of both operands (rotated back by ``Hᵀ``) and a float matmul;
* ``int8 codes``: Hadamard, int8 codes, ``lax.dot_general(..., preferred_element_type=int32)``
  and one rescale ``s_x·s_w`` — checked equal to ``fake-quant HQ`` up to float rounding;
* ``matmul only``: the two products alone on precomputed operands (float32 on the dequantized
  values vs int8 codes → int32), the part an integer kernel can speed up.

Ratios are time ÷ the float matmul's time (< 1: faster than float).

    .venv/bin/python benchmarks/int4_matmul.py               # ~1 min on 2 cores
    .venv/bin/python benchmarks/int4_matmul.py --repeats 31 --tokens 8192
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qflax import quantizers as qz

BLOCK = 32
SHAPES = ((128, 512), (512, 128))
DOT = (((1,), (0,)), ((), ()))


def _codes(rotated: jax.Array, step: jax.Array) -> jax.Array:
    return jnp.round(jnp.clip(rotated / step, -8.0, 7.0))


def variants(block: int = BLOCK):
    """``{name: fn(x, w, s_x, s_w)}`` of the forward variants (unjitted)."""

    def float_mm(x, w, sx, sw):
        return x @ w

    def fake_quant(x, w, sx, sw):
        qx = _codes(qz.block_hadamard(x, block, -1), sx) * sx
        qw = _codes(qz.block_hadamard(w, block, -2), sw) * sw
        return qx @ qw

    act_cfg = qz.HadamardConfig(block=block, axis=-1)
    weight_cfg = qz.HadamardConfig(block=block, axis=-2)

    def layer_path(x, w, sx, sw):
        return qz.hadamard_quantize(x, {"step": sx}, act_cfg) @ qz.hadamard_quantize(
            w, {"step": sw}, weight_cfg
        )

    def int8_codes(x, w, sx, sw):
        cx = _codes(qz.block_hadamard(x, block, -1), sx).astype(jnp.int8)
        cw = _codes(qz.block_hadamard(w, block, -2), sw).astype(jnp.int8)
        acc = lax.dot_general(cx, cw, DOT, preferred_element_type=jnp.int32)
        return acc.astype(jnp.float32) * (sx * sw)

    return {
        "float": float_mm,
        "fake-quant HQ": fake_quant,
        "layer path": layer_path,
        "int8 codes": int8_codes,
    }


def _time(fn, args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def run(tokens: int, repeats: int, shapes=SHAPES, seed: int = 0) -> list[dict]:
    rows = []
    for d_in, d_out in shapes:
        kx, kw = jax.random.split(jax.random.key(seed))
        x = jax.random.normal(kx, (tokens, d_in), jnp.float32)
        w = jax.random.normal(kw, (d_in, d_out), jnp.float32) / np.sqrt(d_in)
        sx = qz.hadamard_init(x, qz.HadamardConfig(block=BLOCK, axis=-1))["step"]
        sw = qz.hadamard_init(w, qz.HadamardConfig(block=BLOCK, axis=-2))["step"]
        args = (x, w, sx, sw)
        fns = {name: jax.jit(fn) for name, fn in variants().items()}
        # matmul only: the products on precomputed operands
        qx = _codes(qz.block_hadamard(x, BLOCK, -1), sx)
        qw = _codes(qz.block_hadamard(w, BLOCK, -2), sw)
        mm_args = {
            "matmul only: float32": (qx * sx, qw * sw),
            "matmul only: int8→int32": (qx.astype(jnp.int8), qw.astype(jnp.int8)),
        }
        fns["matmul only: float32"] = jax.jit(lambda a, b: a @ b)
        fns["matmul only: int8→int32"] = jax.jit(
            lambda a, b: lax.dot_general(a, b, DOT, preferred_element_type=jnp.int32)
        )
        call_args = {name: mm_args.get(name, args) for name in fns}
        # correctness: integer codes equal fake quant up to float rounding
        fq = np.asarray(fns["fake-quant HQ"](*args))
        ic = np.asarray(fns["int8 codes"](*args))
        lp = np.asarray(fns["layer path"](*args))
        scale = float(np.max(np.abs(fq)))
        int_err = float(np.max(np.abs(ic - fq))) / scale
        layer_err = float(np.max(np.abs(lp - fq))) / scale
        assert int_err < 1e-5, f"int8 codes differ from fake quant by {int_err:.2e} (relative)"
        assert layer_err < 1e-4, f"the layer path differs from fake quant by {layer_err:.2e}"
        for name, fn in fns.items():  # warm-up (compile)
            _time(fn, call_args[name])
            _time(fn, call_args[name])
        times = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                times[name].append(_time(fn, call_args[name]))
        base = statistics.median(times["float"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append(
                {
                    "shape": f"{tokens}×{d_in}→{d_out}",
                    "variant": name,
                    "median_ms": 1e3 * med,
                    "x_float": med / base,
                    "max_rel_err": {"int8 codes": int_err, "layer path": layer_err}.get(name),
                }
            )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128 * 64)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args(argv)
    print(
        f"jax {jax.__version__}, {jax.devices()[0].device_kind}, tokens={args.tokens}, "
        f"block={BLOCK}, medians of {args.repeats} interleaved rounds"
    )
    rows = run(args.tokens, args.repeats)
    print(
        f"{'shape':>16}  {'variant':<26}{'median ms':>10}{'× float':>9}  max rel err vs fake quant"
    )
    for r in rows:
        err = "" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
        timing = f"{r['median_ms']:>10.3f}{r['x_float']:>9.2f}"
        print(f"{r['shape']:>16}  {r['variant']:<26}{timing}  {err}")


if __name__ == "__main__":
    main()
