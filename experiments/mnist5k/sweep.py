"""Runs the mnist5k sweeps over seeds and writes their tables into
``experiments/mnist5k/README.md``: ``learned`` (GDNSQ targets, LSQ/PACT/DoReFa baselines),
``pairs`` (ProxConnect++ pairs at W1A1, CNN and MLP, fine-tuned and from scratch), ``dbssq``
(bit-shifting variants) and ``codeq`` (the dead-zone decay sweep, with its plot).

    python -m experiments.mnist5k.sweep                      # every table, seeds 0 1 2
    python -m experiments.mnist5k.sweep --tables pairs --jobs 2
    python -m experiments.mnist5k.sweep --rows gdnsq-w2a2 lsq-w2a2 --seeds 0
    python -m experiments.mnist5k.sweep --table-only         # rebuild the tables from runs/

Each run is one ``qflax train`` command (printed, and given per row in the tables) in
``runs/mnist5k/<row>-s<seed>``; finished runs are not repeated (``qflax train`` on a finished
workdir only re-summarises it). Quantized rows fine-tuned from a float model start from (and,
where their config says so, distil from) the float run of the same seed and architecture;
float runs go first. ``--jobs N`` runs N trainings at once (the 2-core CPU gets through small
models faster with 2). One float CNN run takes ~2 min, one quantized CNN run ~1.5-3 min.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import pathlib
import shlex
import statistics
import subprocess
import sys

from experiments import _sweeps

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
README = HERE / "README.md"
TABLES = ("learned", "pairs", "dbssq", "codeq")
PAIRS = ("bc", "pc", "proxquant", "bnn", "bnn+", "bnn++")
PAIR_LABELS = {
    "bc": "BinaryConnect's pair",
    "pc": "ProxConnect",
    "proxquant": "reverse PC / ProxQuant",
    "bnn": "BNN",
    "bnn+": "BNN+",
    "bnn++": "BNN++",
}
# The pair sweep's MLP: two binarized hidden layers between the float stem and head.
MLP_HIDDEN = "(256, 256, 256)"
CODEQ_DECAYS = ("1", "2", "4", "8", "16")


@dataclasses.dataclass(frozen=True)
class Row:
    """One configuration, run once per seed in ``runs/mnist5k/<name>-s<seed>``."""

    spec: str  # config file (and variant) under experiments/mnist5k/
    overrides: tuple[tuple[str, str], ...]  # --config.KEY=VALUE pairs
    label: str  # the table's description
    table: str  # which README table it belongs to (one of TABLES)
    teacher: str | None = "fp"  # float row of the same seed it starts from; None: no teacher


_HT = (("model_kwargs.activation", "hardtanh"),)
_MLP = (("model", "mlp"), ("model_kwargs.hidden", MLP_HIDDEN))
ROWS: dict[str, Row] = {
    "fp": Row("fp.py", (), "float CNN (teacher)", "learned", None),
    **{
        f"gdnsq-w{b}a{b}": Row(
            "gdnsq.py",
            (("target_bits", str(b)), ("quant.learning_rate", "0.05")),
            f"GDNSQ target W{b}A{b} (STE rule)",
            "learned",
        )
        for b in (8, 4, 3, 2, 1)
    },
    "gdnsq-w1a32": Row(
        "gdnsq.py:w1a32",
        (("quant.learning_rate", "0.05"),),
        "GDNSQ target W1A32 (STE rule)",
        "learned",
    ),
    **{
        f"{m}-w{b}a{b}": Row(f"{m}.py", (("target_bits", str(b)),), f"{label} W{b}A{b}", "learned")
        for m, label in (("lsq", "LSQ"), ("pact", "PACT"), ("dorefa", "DoReFa"))
        for b in (4, 2)
    },
    "lsq-w2a2-channel": Row(
        "lsq.py",
        (("target_bits", "2"), ("recipe_kwargs.weight_granularity", "channel")),
        "LSQ W2A2, weight steps per channel (as GDNSQ's)",
        "learned",
    ),
    # Binary-activation networks use hardtanh where the CNN/MLP have ReLU (sign of a ReLU
    # output is always +1), so their float teachers do too.
    "fp-ht": Row("fp.py", _HT, "float CNN, hardtanh (pair teacher)", "pairs", None),
    "fp-mlp-ht": Row("fp.py", _MLP + _HT, "float MLP, hardtanh (pair teacher)", "pairs", None),
    **{
        f"pairs-{model}-{start}-{pair}": Row(
            "pairs.py" if start == "ft" else "pairs.py:scratch",
            (("pair", pair),) + (_MLP if model == "mlp" else ()),
            f"{PAIR_LABELS[pair]} W1A1, {model.upper()}, "
            + ("fine-tuned" if start == "ft" else "from scratch"),
            "pairs",
            ("fp-ht" if model == "cnn" else "fp-mlp-ht") if start == "ft" else None,
        )
        for model in ("cnn", "mlp")
        for start in ("ft", "scratch")
        for pair in PAIRS
    },
    "dbssq-w": Row("dbssq.py", (), "DBSSQ weights shift-2 (3 bits), activations float", "dbssq"),
    "dbssq-wa": Row("dbssq.py:wa", (), "DBSSQ weights and activations shift-2", "dbssq"),
    "dbssq-w1": Row("dbssq.py:w1", (), "DBSSQ weights 1 bit, activations float", "dbssq"),
    "dbssq-w1a1": Row("dbssq.py:w1a1", (), "DBSSQ weights and activations 1 bit", "dbssq"),
    **{
        f"codeq-dz{d}": Row(
            "codeq.py", (("quant.deadzone_decay", d),), f"CoDeQ dead-zone decay {d}", "codeq"
        )
        for d in CODEQ_DECAYS
    },
}


def command(name: str, seed: int, root: pathlib.Path) -> list[str]:
    """The ``qflax train`` command of one row and seed."""
    row = ROWS[name]
    teacher = None if row.teacher is None else root / f"{row.teacher}-s{seed}"
    return _sweeps.row_command(
        f"experiments/mnist5k/{row.spec}", row.overrides, seed, root / f"{name}-s{seed}", teacher
    )


def run(name: str, seed: int, root: pathlib.Path) -> None:
    """Trains one row and seed; its output goes to ``<root>/<name>-s<seed>.log``."""
    args = command(name, seed, root)
    print("$", shlex.join(args), flush=True)
    root.mkdir(parents=True, exist_ok=True)
    log = root / f"{name}-s{seed}.log"
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "qflax.cli", *args[1:]], cwd=REPO, stdout=out, stderr=out
        )
    if done.returncode:
        raise RuntimeError(f"{name} seed {seed} failed (exit {done.returncode}); see {log}")


def _summary(root: pathlib.Path, name: str, seed: int) -> dict | None:
    path = root / f"{name}-s{seed}" / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def learned_table(root: pathlib.Path, seeds: list[int]) -> str:
    """The GDNSQ/LSQ/PACT/DoReFa table of the finished runs under ``root``."""
    names = [n for n, row in ROWS.items() if row.table == "learned"]
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
            f"| {ROWS[name].label} | {_mean_std(acc)} | {delta:+.2f} | {len(found)} | "
            f"{_sweeps.bits_cell(first)} | {within_text} | {wall:.0f} | `{cmd}` |"
        )
    return "\n".join(lines)


def _cell(root: pathlib.Path, name: str, seeds: list[int]) -> str:
    acc = [s["test_accuracy"] for seed in seeds if (s := _summary(root, name, seed))]
    return f"{_mean_std(acc)} ({len(acc)})" if acc else "—"


def _float_mean(root: pathlib.Path, name: str, seeds: list[int]) -> float:
    acc = [s["test_accuracy"] for seed in seeds if (s := _summary(root, name, seed))]
    return statistics.fmean(acc) if acc else float("nan")


def pairs_table(root: pathlib.Path, seeds: list[int]) -> str:
    """Pairs (rows) by model and start (columns): test accuracy % mean ± std (seeds)."""
    columns = [(m, st) for m in ("cnn", "mlp") for st in ("ft", "scratch")]
    title = {"ft": "fine-tuned", "scratch": "from scratch"}
    lines = [
        "| W1A1 pair (forward / backward) | "
        + " | ".join(f"{m.upper()} {title[st]}" for m, st in columns)
        + " |",
        "|---|" + "---|" * len(columns),
        "| float teacher (hardtanh) | "
        + " | ".join(_cell(root, "fp-ht" if m == "cnn" else "fp-mlp-ht", seeds) for m, _ in columns)
        + " |",
    ]
    for pair in PAIRS:
        cells = [_cell(root, f"pairs-{m}-{st}-{pair}", seeds) for m, st in columns]
        lines.append(f"| {PAIR_LABELS[pair]} (`{pair}`) | " + " | ".join(cells) + " |")
    example = " ".join(command("pairs-cnn-ft-bnn++", 0, pathlib.Path("runs/mnist5k")))
    return "\n".join(lines) + f"\n\nCommand (CNN, fine-tuned, BNN++, seed 0): `{example}`"


def dbssq_table(root: pathlib.Path, seeds: list[int]) -> str:
    """DBSSQ variants: exact (ε = 0) and blended (last ε) accuracy, bits, bytes."""
    fp = _float_mean(root, "fp", seeds)
    lines = [
        "| row | test accuracy % at ε = 0 (mean ± std) | Δ vs float (points) | blended, last ε | "
        "bits w/a (conv2, dense) | model bytes | seeds | command (seed 0) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in (n for n, row in ROWS.items() if row.table == "dbssq"):
        found = [s for seed in seeds if (s := _summary(root, name, seed))]
        if not found:
            continue
        acc = [s["test_accuracy"] for s in found]
        blended = [s.get("blended_test_accuracy", s["test_accuracy"]) for s in found]
        cmd = " ".join(command(name, 0, pathlib.Path("runs/mnist5k")))
        lines.append(
            f"| {ROWS[name].label} | {_mean_std(acc)} | {100 * (statistics.fmean(acc) - fp):+.2f} "
            f"| {_mean_std(blended)} | {found[0]['avg_weight_bits']:g}/"
            f"{found[0]['avg_act_bits']:g} | {found[0]['model_bytes']:,} | {len(found)} | `{cmd}` |"
        )
    return "\n".join(lines)


def _codeq_points(root: pathlib.Path, seeds: list[int]) -> list[dict]:
    """Per decay: means over seeds of accuracy, sparsity, bits and BOPs (share of float)."""
    fp = [s for seed in seeds if (s := _summary(root, "fp", seed))]
    fp_bops = statistics.fmean(s["bops"] for s in fp) if fp else float("nan")
    points = []
    for name in (n for n, row in ROWS.items() if row.table == "codeq"):
        found = [s for seed in seeds if (s := _summary(root, name, seed))]
        if not found:
            continue
        points.append(
            dict(
                name=name,
                decay=float(dict(ROWS[name].overrides)["quant.deadzone_decay"]),
                acc=[s["test_accuracy"] for s in found],
                sparsity=statistics.fmean(s["sparsity"] for s in found),
                bits=statistics.fmean(s["avg_weight_bits"] for s in found),
                max_bits=max(
                    layer["weight_bits"] for s in found for layer in s["layers"] if layer["weights"]
                ),
                bops=statistics.fmean(s.get("bops_sparse", s["bops"]) for s in found) / fp_bops,
                seeds=len(found),
            )
        )
    return points


def codeq_table(root: pathlib.Path, seeds: list[int]) -> str:
    """The dead-zone decay sweep: accuracy, sparsity, bits and bit-operations per decay."""
    fp = _float_mean(root, "fp", seeds)
    lines = [
        "| dead-zone decay | test accuracy % (mean ± std) | Δ vs float (points) | sparsity % | "
        "weight bits (mean / widest layer) | BOPs, nonzero weights, % of float | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in _codeq_points(root, seeds):
        lines.append(
            f"| {p['decay']:g} | {_mean_std(p['acc'])} | "
            f"{100 * (statistics.fmean(p['acc']) - fp):+.2f} | {100 * p['sparsity']:.1f} | "
            f"{p['bits']:.2f} / {p['max_bits']} | {100 * p['bops']:.2f} | {p['seeds']} |"
        )
    example = " ".join(command(f"codeq-dz{CODEQ_DECAYS[0]}", 0, pathlib.Path("runs/mnist5k")))
    return "\n".join(lines) + f"\n\nCommand (first row, seed 0): `{example}`"


def codeq_plot(root: pathlib.Path, seeds: list[int], path: pathlib.Path) -> None:
    """Accuracy against sparsity, one point per decay, coloured by bit-operations (% of float)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = _codeq_points(root, seeds)
    if not points:
        return
    fp = _float_mean(root, "fp", seeds)
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [100 * p["sparsity"] for p in points]
    ys = [100 * statistics.fmean(p["acc"]) for p in points]
    errs = [100 * statistics.stdev(p["acc"]) if len(p["acc"]) > 1 else 0.0 for p in points]
    ax.errorbar(xs, ys, yerr=errs, fmt="none", ecolor="gray", capsize=3)
    dots = ax.scatter(xs, ys, c=[100 * p["bops"] for p in points], cmap="viridis", zorder=3)
    for p, x, y in zip(points, xs, ys, strict=True):
        ax.annotate(
            f"decay {p['decay']:g}, {p['bits']:.1f} b",
            (x, y),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.axhline(100 * fp, color="k", lw=0.8, ls="--", label="float CNN")
    ax.axhline(100 * fp - 1, color="r", lw=0.8, ls=":", label="float − 1 point")
    fig.colorbar(dots, ax=ax, label="BOPs of nonzero weights, % of float")
    ax.set_xlabel("weight sparsity %")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"CoDeQ on mnist5k (CNN, mean of {len(seeds)} seeds)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


TABLE_FUNCS = {
    "learned": learned_table,
    "pairs": pairs_table,
    "dbssq": dbssq_table,
    "codeq": codeq_table,
}


def _markers(table: str) -> tuple[str, str]:
    name = "sweep" if table == "learned" else table  # (the first table's markers predate the rest)
    return f"<!-- {name} table begin -->", f"<!-- {name} table end -->"


def write_readme(table: str, text: str) -> None:
    """Replaces ``table``'s text between its markers in ``README.md`` (appends when missing)."""
    begin, end = _markers(table)
    body = README.read_text() if README.is_file() else ""
    block = f"{begin}\n{text}\n{end}"
    if begin in body and end in body:
        head, rest = body.split(begin, 1)
        body = head + block + rest.split(end, 1)[1]
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    README.write_text(body)


def _train(names: list[str], seeds: list[int], root: pathlib.Path, jobs: int) -> None:
    """Runs every missing (row, seed), the float rows they start from first."""
    teachers = {ROWS[n].teacher for n in names} - {None}
    stages = [sorted(teachers | {n for n in names if ROWS[n].teacher is None})]
    stages.append([n for n in names if n not in stages[0]])
    for stage in stages:
        todo = [(n, s) for s in seeds for n in stage if _summary(root, n, s) is None]
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            for future in [pool.submit(run, n, s, root) for n, s in todo]:
                future.result()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), help="instead of --tables")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once")
    parser.add_argument("--root", default="runs/mnist5k", help="where the workdirs go")
    parser.add_argument("--table-only", action="store_true", help="do not train")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs={args.jobs} is not allowed; allowed: integers >= 1")
    root = pathlib.Path(args.root)
    root = root if root.is_absolute() else (REPO / root).resolve()
    names = args.rows or [n for n, row in ROWS.items() if row.table in args.tables]
    if not args.table_only:
        _train(names, args.seeds, root, args.jobs)
    seeds = [0, 1, 2] if args.table_only else sorted(set(args.seeds))
    for table in dict.fromkeys(ROWS[n].table for n in names):
        text = TABLE_FUNCS[table](root, seeds)
        print(text, end="\n\n")
        if not args.no_write:
            write_readme(table, text)
            if table == "codeq":
                codeq_plot(root, seeds, HERE / "codeq_sweep.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
