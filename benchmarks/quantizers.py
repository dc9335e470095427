"""Throughput of every quantizer in ``qflax.quantizers`` against the memory floor of this machine.

Each quantizer runs on one float32 array of ``--size`` elements (default 2^24, shape 4096×4096),
in four modes, each compared with a floor program that moves the same bytes with trivial compute:

* ``fwd fresh``: ``y = q(x, params)`` into a new output buffer. Floor: ``y = −x``.
* ``fwd in-place``: the same, with ``y`` written into a donated buffer of its shape that has
  been written before (its pages are mapped). Floor: ``−x`` into a donated buffer.
* ``f+b fresh``: the forward value and the VJP a training step needs of a quantizer,
  ``(y, dx, dparams)`` from ``x`` and the cotangent ``g`` (``jax.vjp`` in one jitted program; the
  value is returned, so it cannot be dead code). Floor: ``(−x, g·1[x > 0])``: reads ``x`` and
  ``g``, writes two arrays (XLA:CPU emits it as 2 kernels; it has no multi-output loop fusion).
* ``f+b in-place``: the same with ``y`` and ``dx`` written into donated buffers.

The in-place modes donate separate output buffers rather than ``x`` itself: ``x`` and ``g`` stay
intact, so XLA never has to insert a copy to keep an input alive (donating ``x`` into a quantizer
that reads ``x`` twice, or into a group-granularity reshape, makes XLA allocate a temporary and
copy). A fresh 2^24-float output costs ~16k page faults (big buffers go back to the OS), so the
fresh modes run several times slower than the in-place ones; the in-place floor is the real
memory floor. Compare like with like: each mode has its own floor.

``ratio = floor time / quantizer time`` (1.0: at the floor; higher is faster), with the floor
timed right next to each quantizer call (order alternating between rounds). Every round visits
every quantizer and mode once (round-robin, after one warm-up call each), so a change in the
machine's load hits all of them alike; times are medians over ``--repeats`` rounds. ``GB/s``
counts the minimal bytes: 2 arrays (``fwd``) or 4 arrays (``f+b``) of ``x``'s size.
``kernels`` counts the compiled in-place program's top-level kernels that read or write a
full-size array (each is at least one pass over memory); ``--hlo NAME`` prints the programs.

Goals (``fwd goal`` column): forward ≥ 0.7× the floor for the uniform quantizer and the plain
straight-through rounding quantizers (one elementwise pass, no statistic of ``x``, no noise),
≥ 0.5× for the rest; forward+backward ≥ 0.5× of its own floor. ``met`` is judged on the in-place
ratios (page faults hide compute in the fresh ones).

    python benchmarks/quantizers.py                       # 2^24 elements, 7 repeats
    python benchmarks/quantizers.py --only 'uniform|lsq' --repeats 9 --json /tmp/q.json
    python benchmarks/quantizers.py --hlo 'pow2/ste/tensor'

Timings depend on the machine's load: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from qflax import quantizers as qz

MODES = ("fwd_fresh", "fwd_inplace", "fb_fresh", "fb_inplace")
_ARRAYS_MOVED = {"fwd": 2, "fb": 4}  # minimal full-size arrays read + written per call
FWD_GOAL_ELEMENTWISE = 0.7
FWD_GOAL_OTHER = 0.5
FB_GOAL = 0.5
_EPSILON = 0.25  # the DBSSQ blend weight (passed traced, as in training)


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked quantizer configuration."""

    # Row name, "<entry point>/<variant>".
    name: str
    # The public function of qflax.quantizers this row exercises (pairs: "pair:<catalogue name>").
    entry: str
    # apply(x, params, aux) -> y; params are differentiated, aux (keys, ε, σ) is not.
    apply: Callable[[jax.Array, Any, Any], jax.Array]
    # init(x) -> (params, aux), run once outside the timings.
    init: Callable[[jax.Array], tuple[Any, Any]]
    # The forward goal (ratio to the in-place floor).
    fwd_goal: float


def _shape(size: int) -> tuple[int, int]:
    if size < 16 or size & (size - 1):
        raise ValueError(f"--size={size} is not allowed; allowed: a power of two >= 16")
    cols = 2 ** ((size.bit_length()) // 2)  # 2^24 -> 4096 x 4096; 2^10 -> 32 x 32
    return size // cols, cols


def build_cases(shape: tuple[int, int]) -> list[Case]:
    """Every quantizer of ``qflax.quantizers`` in the configurations worth timing."""
    group = min(128, shape[-1])
    cases: list[Case] = []

    def add(name, entry, apply, init, goal):
        cases.append(Case(name, entry, apply, init, goal))

    def with_config(fn, init_fn, config, key=False):
        def apply(x, params, aux):
            return fn(x, params, config, key=aux.get("key"))

        def init(x):
            return init_fn(x, config), ({"key": jax.random.key(1)} if key else {})

        return apply, init

    def gran(granularity):
        return {"granularity": granularity, "group_size": group if granularity == "group" else None}

    # Uniform: every gradient × granularity, then the learnable scale / zero point.
    for gradient in qz.UNIFORM_GRADIENTS:
        for g in qz.GRANULARITIES:
            config = qz.UniformConfig(bits=8, gradient=gradient, **gran(g))
            add(
                f"uniform/{gradient}/{g}",
                "uniform",
                *with_config(qz.uniform, qz.uniform_init, config),
                FWD_GOAL_ELEMENTWISE,
            )
    for g in ("tensor", "channel"):
        config = qz.UniformConfig(bits=8, learn_scale=True, **gran(g))
        add(
            f"uniform/learn_scale/{g}",
            "uniform",
            *with_config(qz.uniform, qz.uniform_init, config),
            FWD_GOAL_ELEMENTWISE,
        )
    config = qz.UniformConfig(
        bits=8, symmetric=False, gradient="clipped_ste", learn_scale=True, learn_zero_point=True
    )
    add(
        "uniform/affine_learn_scale_zp/tensor",
        "uniform",
        *with_config(qz.uniform, qz.uniform_init, config),
        FWD_GOAL_ELEMENTWISE,
    )

    for g in qz.GRANULARITIES:
        config = qz.LSQConfig(bits=4, **gran(g))
        add(f"lsq/{g}", "lsq", *with_config(qz.lsq, qz.lsq_init, config), FWD_GOAL_ELEMENTWISE)

    add(
        "pact/4bit",
        "pact",
        *with_config(qz.pact, qz.pact_init, qz.PACTConfig(bits=4, init_alpha=None)),
        FWD_GOAL_ELEMENTWISE,
    )

    for bits in (1, 4):
        add(
            f"dorefa_weights/{bits}bit",
            "dorefa_weights",
            lambda x, p, a, bits=bits: qz.dorefa_weights(x, bits=bits),
            lambda x: ({}, {}),
            FWD_GOAL_OTHER,
        )
    add(
        "dorefa_activations/4bit",
        "dorefa_activations",
        lambda x, p, a: qz.dorefa_activations(x, bits=4),
        lambda x: ({}, {}),
        FWD_GOAL_ELEMENTWISE,
    )
    add(
        "dorefa_quantize_k/4bit",
        "dorefa_quantize_k",
        lambda x, p, a: qz.dorefa_quantize_k(x, bits=4),
        lambda x: ({}, {}),
        FWD_GOAL_ELEMENTWISE,
    )
    add(
        "dorefa_gradients/8bit",
        "dorefa_gradients",
        lambda x, p, a: qz.dorefa_gradients(x, bits=8, key=a["key"]),
        lambda x: ({}, {"key": jax.random.key(2)}),
        FWD_GOAL_OTHER,
    )

    # Gradient quantizers of fully quantized training (applied to a cotangent-like tensor).
    for kind, fn in (
        ("ptq", qz.ptq_gradient),
        ("psq", qz.psq_gradient),
        ("bhq", qz.bhq_gradient),
        ("dorefa", qz.dorefa_quantize_gradient),
    ):
        add(
            f"{kind}_gradient/8bit",
            fn.__name__,
            lambda x, p, a, fn=fn: fn(x, bits=8, key=a["key"]),
            lambda x: ({}, {"key": jax.random.key(2)}),
            FWD_GOAL_OTHER,
        )
    add(
        "bit_split_quantize/paper",
        "bit_split_quantize",
        lambda x, p, a: qz.bit_split_quantize(x, a["key"], qz.BitSplitConfig(lss=False)),
        lambda x: ({}, {"key": jax.random.key(2)}),
        FWD_GOAL_OTHER,
    )
    hq = qz.HadamardConfig(block=min(32, shape[-1]))
    add(
        "hadamard_quantize/4bit",
        "hadamard_quantize",
        lambda x, p, a: qz.hadamard_quantize(x, p, hq),
        lambda x: (qz.hadamard_init(x, hq), {}),
        FWD_GOAL_OTHER,
    )

    # Split-learning compression of a cut (per-row μ ± 3σ, 4 levels: 2-bit codes).
    split = qz.SplitConfig(levels=4)
    add(
        "split_quantize/2bit",
        "split_quantize",
        lambda x, p, a: qz.split_quantize(x, split),
        lambda x: ({}, {}),
        FWD_GOAL_OTHER,
    )

    for granularity, backward, noise in (
        ("channel", "ste", "threefry"),
        ("channel", "noise", "threefry"),
        ("channel", "noise", "hash"),
        ("tensor", "lsq", "threefry"),
    ):
        config = qz.GDNSQWeightConfig(granularity=granularity, backward=backward, noise=noise)
        tag = "-hash" if noise == "hash" else ""
        add(
            f"gdnsq_weight/{backward}{tag}/{granularity}",
            "gdnsq_weight",
            *with_config(qz.gdnsq_weight, qz.gdnsq_weight_init, config, key=backward == "noise"),
            FWD_GOAL_OTHER,
        )
    for signed, backward, noise in ((False, "ste", "threefry"), (True, "noise", "threefry"),
                                    (True, "noise", "hash")):  # fmt: skip
        config = qz.GDNSQActConfig(
            signed=signed, backward=backward, init_log_range=None, noise=noise
        )
        tag = "-hash" if noise == "hash" else ""
        add(
            f"gdnsq_act/{backward}{tag}/{'signed' if signed else 'unsigned'}",
            "gdnsq_act",
            *with_config(qz.gdnsq_act, qz.gdnsq_act_init, config, key=backward == "noise"),
            FWD_GOAL_ELEMENTWISE,
        )

    for gradient, g in (("ste", "tensor"), ("clipped_ste", "channel"), ("true", "group")):
        config = qz.PowerOfTwoConfig(bits=4, gradient=gradient, **gran(g))
        add(
            f"pow2/{gradient}/{g}",
            "pow2",
            *with_config(qz.pow2, qz.pow2_init, config),
            FWD_GOAL_ELEMENTWISE,
        )

    binaries = (
        ("det/none/clipped_ste", qz.BinaryConfig(), FWD_GOAL_ELEMENTWISE),
        ("det/tensor/ste", qz.BinaryConfig(scaling="tensor", gradient="ste"), FWD_GOAL_OTHER),
        ("det/channel/clipped_ste", qz.BinaryConfig(scaling="channel"), FWD_GOAL_OTHER),
        ("stochastic/none/clipped_ste", qz.BinaryConfig(stochastic=True), FWD_GOAL_OTHER),
        (
            "stochastic-hash/none/clipped_ste",
            qz.BinaryConfig(stochastic=True, noise="hash"),
            FWD_GOAL_OTHER,
        ),
    )
    for variant, config, goal in binaries:
        add(
            f"binary/{variant}",
            "binary",
            *with_config(qz.binary, qz.binary_init, config, key=config.stochastic),
            goal,
        )
    for scaling, gradient in (("none", "ste"), ("tensor", "ste"), ("channel", "clipped_ste")):
        config = qz.TernaryConfig(scaling=scaling, gradient=gradient)
        add(
            f"ternary/{scaling}/{gradient}",
            "ternary",
            *with_config(qz.ternary, qz.ternary_init, config),
            FWD_GOAL_OTHER,
        )

    for variant, config in (
        ("learned_bits/ste", qz.CoDeQConfig()),
        ("fixed4/clipped_ste", qz.CoDeQConfig(fixed_bits=4, gradient="clipped_ste")),
    ):
        add(
            f"codeq/{variant}",
            "codeq",
            *with_config(qz.codeq, qz.codeq_init, config),
            FWD_GOAL_OTHER,
        )

    def eps_aux(x):
        return {}, {"epsilon": _EPSILON}

    for levels, bits in (("shift", 2), ("uniform", 4)):
        config = qz.DBSSQConfig(levels=levels, bits=bits)
        add(
            f"dbssq/{levels}/{bits}bit",
            "dbssq",
            lambda x, p, a, config=config: qz.dbssq(x, a["epsilon"], config),
            eps_aux,
            FWD_GOAL_OTHER,
        )
    config = qz.DBSSQConfig(levels="shift", bits=2)
    add(
        "dbssq_weight/shift/2bit",
        "dbssq_weight",
        lambda x, p, a: qz.dbssq_weight(x, a["epsilon"], a["sigma"], config),
        lambda x: ({}, {"epsilon": _EPSILON, "sigma": qz.dbssq_weight_init(x)}),
        FWD_GOAL_OTHER,
    )
    add(
        "dbssq_act/shift/2bit",
        "dbssq_act",
        lambda x, p, a: qz.dbssq_act(x, a["epsilon"], config),
        eps_aux,
        FWD_GOAL_OTHER,
    )

    # Latent (vector) quantizers of the last axis, on x viewed as [-1, D] vectors.
    def vectors(fn, dim):
        return lambda x, p, a: fn(x.reshape(-1, dim), p).reshape(x.shape)

    fsq_config = qz.FSQConfig(levels=(8, 5, 5, 5))
    add(
        "fsq/8x5x5x5",
        "fsq",
        vectors(lambda v, p: qz.fsq(v, fsq_config), 4),
        lambda x: ({}, {}),
        FWD_GOAL_OTHER,
    )
    for lattice in qz.Q2D2_LATTICES:
        q2d2_config = qz.Q2D2Config(levels=(5, 5), lattice=lattice)
        add(
            f"q2d2/{lattice}/5x5",
            "q2d2",
            vectors(lambda v, p, c=q2d2_config: qz.q2d2(v, c), 2),
            lambda x: ({}, {}),
            FWD_GOAL_OTHER,
        )

    def codebook_init(shape):
        def init(x):
            cb = jax.random.normal(jax.random.key(0), shape, jnp.float32) * jnp.std(x)
            return {"codebook": cb}, {}

        return init

    vq_config = qz.VQConfig(codebook_size=64, dim=4)
    add(
        "vq/64x4",
        "vq",
        vectors(lambda v, p: qz.vq(v, p["codebook"], vq_config), 4),
        codebook_init((64, 4)),
        FWD_GOAL_OTHER,
    )
    rvq_config = qz.RVQConfig(stages=4, codebook_size=64, dim=4)
    add(
        "rvq/4x64x4",
        "rvq",
        vectors(lambda v, p: qz.rvq(v, p["codebook"], rvq_config), 4),
        codebook_init((4, 64, 4)),
        FWD_GOAL_OTHER,
    )

    for name, factory in qz.PAIRS.items():
        q = factory()
        goal = FWD_GOAL_ELEMENTWISE if name == "bc" else FWD_GOAL_OTHER
        add(f"pair:{name}", f"pair:{name}", lambda x, p, a, q=q: q(x), lambda x: ({}, {}), goal)
    return cases


# ----------------------------------------------------------------------------------------------
# Compiled programs. Every program takes trailing output buffers (``out_*``) that it ignores: in
# the in-place modes they are donated, so XLA writes the outputs into them (already-touched
# pages, no page faults) while ``x`` and ``g`` stay intact and no copy has to be inserted.


def _forward(case: Case) -> Callable:
    def fwd(x, params, aux, out_y):
        del out_y
        return case.apply(x, params, aux)

    return fwd


def _forward_backward(case: Case) -> Callable:
    """``(x, params, aux, g) -> (y, dx, dparams)``: the value and the VJP a training step needs."""

    def fb(x, params, aux, g, out_y, out_dx):
        del out_y, out_dx
        y, vjp = jax.vjp(lambda x_, p_: case.apply(x_, p_, aux), x, params)
        dx, dparams = vjp(g)
        return y, dx, dparams

    return fb


def _floor_fwd(x, params, aux, out_y):
    del params, aux, out_y
    return -x


def _floor_fb(x, params, aux, g, out_y, out_dx):
    del params, aux, out_y, out_dx
    return -x, jnp.where(x > 0, g, jnp.zeros_like(g))


def _compile(fn: Callable, args: tuple, donate: tuple[int, ...]):
    start = time.perf_counter()
    jitted = jax.jit(fn, donate_argnums=donate, keep_unused=True)
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


_PASSIVE_OPS = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_SHAPE = re.compile(r"\b(?:f|s|u|pred|bf)\d*\[([\d,]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)")


def count_kernels(hlo_text: str, size: int) -> int:
    """Kernels of the ENTRY computation that read or write an array of ≥ ``size/2`` elements.

    Each is at least one pass over memory (parameters, constants, tuples and bitcasts are free).
    """
    lines = hlo_text.split("\n")
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("ENTRY"))
    except StopIteration:
        return -1
    elements: dict[str, int] = {}
    count = 0
    for line in lines[start + 1 :]:
        if line.startswith("}"):
            break
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape_text, opcode, rest = match.groups()
        dims = [math.prod(int(d) for d in s.split(",") if d) for s in _SHAPE.findall(shape_text)]
        elements[name] = max(dims, default=0)
        if opcode in _PASSIVE_OPS:
            continue
        operands = _OPERAND.findall(rest.split("), ")[0])
        touched = [elements[name], *(elements.get(o, 0) for o in operands)]
        if max(touched) >= size // 2:
            count += 1
    return count


# ----------------------------------------------------------------------------------------------
# Timing.


@dataclasses.dataclass
class _Candidate:
    case: Case | None  # None: a floor
    mode: str
    compiled: Any
    args: tuple  # without the trailing output buffers
    n_out: int  # trailing output buffers (donated in the in-place modes)
    kernels: int
    compile_s: float
    times: list[float] = dataclasses.field(default_factory=list)
    floor_times: list[float] = dataclasses.field(default_factory=list)


class _Buffers:
    """Two full-size buffers that travel through the in-place calls (donated, then returned)."""

    def __init__(self, x: jax.Array):
        self.pool = [x * 1.0, x * 2.0]  # written once: their pages are mapped

    def take(self, n: int) -> list[jax.Array]:
        return self.pool[:n]

    def give(self, out, n: int) -> None:
        arrays = [out] if n == 1 else list(out[:n])
        self.pool[:n] = arrays


def _call(c: _Candidate, buffers: _Buffers) -> float:
    inplace = c.mode.endswith("inplace")
    outs = buffers.take(c.n_out) if inplace else [buffers.pool[0]] * c.n_out
    jax.block_until_ready(outs)
    start = time.perf_counter()
    out = c.compiled(*c.args, *outs)
    jax.block_until_ready(out)
    elapsed = time.perf_counter() - start
    if inplace:  # the outputs were written into the donated buffers: they are the next ones
        buffers.give(out, c.n_out)
    del out
    return elapsed


def _program(case: Case | None, mode: str, x, g, params, aux, size: int) -> _Candidate:
    fb = mode.startswith("fb")
    if case is None:
        fn = _floor_fb if fb else _floor_fwd
    else:
        fn = _forward_backward(case) if fb else _forward(case)
    args = (x, params, aux, g) if fb else (x, params, aux)
    n_out = 2 if fb else 1
    donate = tuple(range(len(args), len(args) + n_out)) if mode.endswith("inplace") else ()
    compiled, secs = _compile(fn, (*args, *[x] * n_out), donate)
    kernels = count_kernels(compiled.as_text(), size)
    return _Candidate(case, mode, compiled, args, n_out, kernels, secs)


def _prepare(
    cases: Sequence[Case], shape: tuple[int, int], modes: Sequence[str], log
) -> tuple[list, dict, _Buffers]:
    size = math.prod(shape)
    kx, kg = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, shape, jnp.float32)
    g = jax.random.normal(kg, shape, jnp.float32)
    floors = {mode: _program(None, mode, x, g, {}, {}, size) for mode in modes}
    candidates = []
    for case in cases:
        params, aux = case.init(x)
        for mode in modes:
            candidates.append(_program(case, mode, x, g, params, aux, size))
        log(f"  compiled {case.name}")
    return candidates, floors, _Buffers(x)


def _row(case: Case, by_mode: dict[str, _Candidate], size: int) -> dict:
    row: dict[str, Any] = {"name": case.name, "entry": case.entry, "fwd_goal": case.fwd_goal}
    for mode, c in by_mode.items():
        t = statistics.median(c.times)
        floor_t = statistics.median(c.floor_times)
        moved = _ARRAYS_MOVED[mode.split("_")[0]] * size * 4
        row[mode] = {
            "median_s": t,
            "floor_median_s": floor_t,
            "ratio": floor_t / t,
            "gbps": moved / t / 1e9,
            "kernels": c.kernels,
            "compile_s": c.compile_s,
            "times_s": c.times,
            "floor_times_s": c.floor_times,
        }
    # Judged on the in-place ratios; None where that mode was not run.
    row["fwd_met"] = row["fwd_inplace"]["ratio"] >= case.fwd_goal if "fwd_inplace" in row else None
    row["fb_met"] = row["fb_inplace"]["ratio"] >= FB_GOAL if "fb_inplace" in row else None
    return row


def run(
    size: int = 2**24,
    repeats: int = 7,
    only: str | None = None,
    modes: Sequence[str] = MODES,
    log=print,
) -> tuple[list[dict], dict]:
    """Times every selected case; returns (rows, floors) as plain dicts (see ``--json``)."""
    shape = _shape(size)
    cases = build_cases(shape)
    if only:
        pattern = re.compile(only)
        cases = [c for c in cases if pattern.search(c.name)]
    log(f"compiling {len(cases)} quantizers x {len(modes)} modes on shape {shape}")
    candidates, floors, buffers = _prepare(cases, shape, modes, log)
    for c in [*floors.values(), *candidates]:  # warm-up: first calls, page-in, allocator
        _call(c, buffers)
    for r in range(repeats):
        start = time.perf_counter()
        for c in candidates:
            floor = floors[c.mode]
            if r % 2:
                c.times.append(_call(c, buffers))
                c.floor_times.append(_call(floor, buffers))
            else:
                c.floor_times.append(_call(floor, buffers))
                c.times.append(_call(c, buffers))
            floor.times.append(c.floor_times[-1])
        log(f"  round {r + 1}/{repeats}: {time.perf_counter() - start:.1f} s")
    rows = []
    for case in cases:
        by_mode = {c.mode: c for c in candidates if c.case is case}
        rows.append(_row(case, by_mode, size))
    floor_rows = {}
    for mode, f in floors.items():
        moved = _ARRAYS_MOVED[mode.split("_")[0]] * size * 4
        t = statistics.median(f.times) if f.times else float("nan")
        floor_rows[mode] = {"median_s": t, "gbps": moved / t / 1e9, "kernels": f.kernels}
    return rows, floor_rows


# ----------------------------------------------------------------------------------------------
# Output.


def format_table(rows: list[dict], floors: dict) -> str:
    """The markdown table: GB/s and ratio to the floor per mode, kernels, goals."""
    head = (
        "| quantizer | fwd goal | fwd fresh GB/s (×floor) | fwd in-place GB/s (×floor) "
        "| f+b fresh GB/s (×floor) | f+b in-place GB/s (×floor) | kernels fwd/f+b "
        "| fwd met | f+b met |"
    )
    lines = [head, "|" + "---|" * 9]

    def cell(d, ratio=True):
        if d is None:
            return "—"
        return f"{d['gbps']:.1f} ({d['ratio'] if ratio else 1.0:.2f})"

    def kernels(d):
        fwd = d.get("fwd_inplace") or d.get("fwd_fresh")
        fb = d.get("fb_inplace") or d.get("fb_fresh")
        return "/".join("—" if m is None else str(m["kernels"]) for m in (fwd, fb))

    def met(value):
        return "—" if value is None else ("yes" if value else "**no**")

    lines.append(
        "| **floor** (`−x`; `(−x, g·1[x>0])`) | — | "
        + " | ".join(cell(floors.get(m), ratio=False) for m in MODES)
        + f" | {kernels(floors)} | — | — |"
    )
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['fwd_goal']:.1f} | "
            + " | ".join(cell(row.get(m)) for m in MODES)
            + f" | {kernels(row)} | {met(row['fwd_met'])} | {met(row['fb_met'])} |"
        )
    return "\n".join(lines)


def _print_hlo(name: str, size: int) -> None:
    """Prints the compiled in-place programs of one case (metadata stripped)."""
    shape = _shape(size)
    matches = [c for c in build_cases(shape) if c.name == name]
    if not matches:
        raise SystemExit(f"--hlo {name!r}: no such case")
    case = matches[0]
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    params, aux = case.init(x)
    for mode in ("fwd_inplace", "fb_inplace"):
        c = _program(case, mode, x, x, params, aux, size)
        text = re.sub(r", metadata=\{[^}]*\}", "", c.compiled.as_text())
        keep = ("HloModule", "%", "ENTRY", " ", "}")  # drop the source-location tables
        text = "\n".join(line for line in text.split("\n") if line.startswith(keep))
        print(f"==== {name}: {mode} ({c.kernels} full-size kernels)\n{text}\n")


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Parses the options, runs the benchmark, prints the table; returns the rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2**24, help="elements (a power of two)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median)")
    parser.add_argument("--only", default=None, help="regex on the row names")
    parser.add_argument("--json", default=None, help="write the rows (all times) here")
    parser.add_argument(
        "--modes", nargs="+", default=list(MODES), choices=MODES, help="modes to time"
    )
    parser.add_argument("--hlo", default=None, help="print the compiled HLO of this case, exit")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} is not allowed; allowed: an int >= 1")
    if args.hlo:
        _print_hlo(args.hlo, args.size)
        return []

    def log(message):
        print(message, file=sys.stderr, flush=True)

    start = time.perf_counter()
    load_before = os.getloadavg()
    modes = [m for m in MODES if m in args.modes]
    rows, floors = run(args.size, args.repeats, args.only, modes, log)
    load_after = os.getloadavg()
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cpus; "
        f"{args.size} float32 elements, shape {_shape(args.size)}, {args.repeats} repeats; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        f"{time.perf_counter() - start:.0f} s\n"
    )
    print(format_table(rows, floors))
    print()
    for key, label in (("fwd_met", "forward"), ("fb_met", "forward+backward")):
        judged = [r for r in rows if r[key] is not None]
        missed = [r["name"] for r in judged if not r[key]]
        print(f"{label} goal met by {len(judged) - len(missed)}/{len(judged)}; missed: {missed}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": list(argv or sys.argv[1:]), "floors": floors, "rows": rows}, f)
    return rows


if __name__ == "__main__":
    main()
