"""Runs the mnist5k sweeps (float teachers, GDNSQ targets, LSQ/PACT/DoReFa baselines) over
seeds and writes the results table into ``experiments/mnist5k/README.md``.

    python -m experiments.mnist5k.sweep                      # every row, seeds 0 1 2
    python -m experiments.mnist5k.sweep --rows gdnsq-w2a2 lsq-w2a2 --seeds 0
    python -m experiments.mnist5k.sweep --table-only         # rebuild the table from runs/

Each run is one ``qflax train`` command (printed, and given per row in the table) in
``runs/mnist5k/<row>-s<seed>``; finished runs are not repeated (``qflax train`` on a finished
workdir only re-summarises it). Quantized rows distil from, and start from, the float run of
the same seed. On the 2-core CPU one float run takes ~2 min and one quantized run ~3-4 min.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import statistics
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
README = HERE / "README.md"
BEGIN, END = "<!-- sweep table begin -->", "<!-- sweep table end -->"

# name -> (config spec, overrides, description)
ROWS: dict[str, tuple[str, tuple[tuple[str, str], ...], str]] = {
    "fp": ("fp.py", (), "float CNN (teacher)"),
    **{
        f"gdnsq-w{b}a{b}": (
            "gdnsq.py",
            (("target_bits", str(b)), ("quant.learning_rate", "0.05")),
            f"GDNSQ target W{b}A{b}",
        )
        for b in (8, 4, 3, 2, 1)
    },
    "gdnsq-w1a32": ("gdnsq.py:w1a32", (("quant.learning_rate", "0.05"),), "GDNSQ target W1A32"),
    **{
        f"{m}-w{b}a{b}": (f"{m}.py", (("target_bits", str(b)),), f"{label} W{b}A{b}")
        for m, label in (("lsq", "LSQ"), ("pact", "PACT"), ("dorefa", "DoReFa"))
        for b in (4, 2)
    },
    "lsq-w2a2-channel": (
        "lsq.py",
        (("target_bits", "2"), ("recipe_kwargs.weight_granularity", "channel")),
        "LSQ W2A2, weight steps per channel (as GDNSQ's)",
    ),
}


def command(name: str, seed: int, root: pathlib.Path) -> list[str]:
    """The ``qflax train`` command of one row and seed."""
    spec, overrides, _ = ROWS[name]
    args = ["qflax", "train", "--config", f"experiments/mnist5k/{spec}"]
    args += [f"--config.{k}={v}" for k, v in overrides]
    args += [f"--config.seed={seed}", "--config.progress_bar=false"]
    if name != "fp":
        args += [
            "--config.teacher.mode=checkpoint",
            f"--config.teacher.path={root / f'fp-s{seed}'}",
        ]
    return args + ["--workdir", str(root / f"{name}-s{seed}")]


def run(name: str, seed: int, root: pathlib.Path) -> None:
    args = command(name, seed, root)
    print("$", shlex.join(args), flush=True)
    subprocess.run([sys.executable, "-m", "qflax.cli", *args[1:]], check=True, cwd=REPO)


def _summary(root: pathlib.Path, name: str, seed: int) -> dict | None:
    path = root / f"{name}-s{seed}" / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _bits(summary: dict) -> str:
    learned = summary.get("learned_bits")
    if learned:  # per layer: used weight/act bits
        return ", ".join(
            f"{layer} {row['used'].get('weight', 32)}/{row['used'].get('act', 32)}"
            for layer, row in learned.items()
        )
    return f"{summary['avg_weight_bits']:g}/{summary['avg_act_bits']:g}"


def table(root: pathlib.Path, names: list[str], seeds: list[int]) -> str:
    """The markdown results table of the finished runs under ``root``."""
    fp = [s["test_accuracy"] for seed in seeds if (s := _summary(root, "fp", seed))]
    fp_mean = statistics.fmean(fp) if fp else float("nan")
    lines = [
        "| row | test accuracy % (mean ± std) | Δ vs float (points) | seeds | final bits "
        "(w/a; per layer for GDNSQ; lowest seed run) | all layers within target | wall s (mean) | "
        "command (seed 0) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        found = [(seed, s) for seed in seeds if (s := _summary(root, name, seed))]
        if not found:
            continue
        acc = [s["test_accuracy"] for _, s in found]
        delta = 100 * (statistics.fmean(acc) - fp_mean) if name != "fp" else 0.0
        first = found[0][1]
        within = [s.get("within_target") for _, s in found if "within_target" in s]
        within_text = f"{sum(within)}/{len(within)}" if within else "—"
        wall = statistics.fmean(s["wall_seconds"] for _, s in found)
        cmd = " ".join(command(name, 0, pathlib.Path("runs/mnist5k")))
        lines.append(
            f"| {ROWS[name][2]} | {_mean_std(acc)} | {delta:+.2f} | {len(found)} | "
            f"{_bits(first)} | {within_text} | {wall:.0f} | `{cmd}` |"
        )
    return "\n".join(lines)


def write_readme(text: str) -> None:
    """Replaces the table between the markers of ``README.md`` (appends it when missing)."""
    body = README.read_text() if README.is_file() else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in body and END in body:
        head, rest = body.split(BEGIN, 1)
        body = head + block + rest.split(END, 1)[1]
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    README.write_text(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--root", default="runs/mnist5k", help="where the workdirs go")
    parser.add_argument("--table-only", action="store_true", help="do not train")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    root = (
        (REPO / args.root).resolve()
        if not pathlib.Path(args.root).is_absolute()
        else (pathlib.Path(args.root))
    )
    if not args.table_only:
        for seed in args.seeds:
            if "fp" in args.rows or any(n != "fp" for n in args.rows):
                if _summary(root, "fp", seed) is None:
                    run("fp", seed, root)
            for name in args.rows:
                if name != "fp" and _summary(root, name, seed) is None:
                    run(name, seed, root)
    text = table(root, list(ROWS), [0, 1, 2] if args.table_only else sorted(set(args.seeds)))
    print(text)
    if not args.no_write:
        write_readme(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
