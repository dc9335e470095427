"""The train step on a device mesh against one device, same global batch (issue 18).

One process with 8 forced host devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``,
set here before JAX starts, so every variant runs under the same flags): the mnist5k CNN's W4A4
step (``recipes.learned_step(4, 4)``, stem and head float; Adam; batch 128) built by
``build_trainer`` exactly as ``qflax train`` builds it, on one device (``mesh`` all 1), 8-way
data parallel (``mesh.data=8``) and 8-way FSDP (``mesh.fsdp=8``). Timing is
``benchmarks/train_step.py``'s: compiled once, round-robin rounds with the order rotating,
median of paired ratios against the one-device step.

On a CPU the 8 "devices" share its cores, so the ratio measures the cost of partitioning (the
collectives and the per-device launch overhead), not a speed-up; on 8 real accelerators the same
command measures the scaling.

    python -m benchmarks.mesh_step                 # 5 rounds
    python -m benchmarks.mesh_step --rounds 9 --model resnet20

Goal: none on a CPU (reported); on accelerators, data parallel ≥ 0.8 × linear speed-up.
"""

from __future__ import annotations

import argparse
import os
import sys

DEVICES = 8
_FLAG = f"--xla_force_host_platform_device_count={DEVICES}"
if _FLAG not in os.environ.get("XLA_FLAGS", "") and "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax  # noqa: E402

from benchmarks import train_step as ts  # noqa: E402
from qflax import layers as ql  # noqa: E402

MESHES = {
    "one device": {},
    "data=8": {"mesh.data": DEVICES},
    "fsdp=8": {"mesh.fsdp": DEVICES},
}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", choices=list(ts.MODELS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)
    if jax.device_count() < DEVICES:
        parser.error(
            f"{jax.device_count()} devices; allowed: run with XLA_FLAGS={_FLAG} set before JAX "
            "starts (this script sets it when it starts JAX itself)"
        )
    variants = [
        ts.Variant(name, lambda: ql.recipes.learned_step(4, 4), None, mesh)
        for name, mesh in MESHES.items()
    ]
    rows = ts.measure_model(
        ts.MODELS[args.model], variants, rounds=args.rounds, batch_size=args.batch, log=print
    )
    print(f"\n{args.model} W4A4, global batch {args.batch}, {jax.device_count()} CPU devices")
    print("| mesh | ms/step | × one device (min–max) | compile s | loss first → last |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['variant']} | {row['ms']:.1f} | {row['ratio']:.2f} "
            f"({row['ratio_min']:.2f}–{row['ratio_max']:.2f}) | {row['compile_s']:.1f} | "
            f"{row['loss_first']:.4f} → {row['loss_last']:.4f} |"
        )
    print(f"load average: {os.getloadavg()}")
    return rows


if __name__ == "__main__":
    main()
