"""Runs the fully quantized training (FQT) rows over seeds and writes their tables into
``experiments/README.md``: the mnist5k CNN (test accuracy) and the pydoc_text character
transformer (bits per character), each row of ``experiments/fqt_rows.py``.

    python -m experiments.fqt_sweep                           # both sets, every row, seeds 0 1 2
    python -m experiments.fqt_sweep --sets mnist5k --rows qat8 psq8 --seeds 0 --jobs 2
    python -m experiments.fqt_sweep --table-only              # rebuild the tables from runs/fqt

Each run is one ``qflax train`` command (the table gives the one of seed 0) in
``runs/fqt/<set>-<row>-s<seed>``; finished runs are not repeated, so an interrupted sweep
resumes where it stopped. ``--jobs N`` runs N trainings at once.
"""

from __future__ import annotations

import math
import pathlib
import shlex
import statistics
import sys

from experiments import _sweeps, fqt_rows

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
README = HERE / "README.md"
SETS = {"mnist5k": "experiments/mnist5k/fqt.py", "pydoc_text": "experiments/pydoc_text/fqt.py"}
# Rows run per set (the text table leaves out the unbiased INT4 variant to save CPU time).
SET_ROWS = {
    "mnist5k": tuple(fqt_rows.ROWS),
    "pydoc_text": tuple(r for r in fqt_rows.ROWS if r != "int4_unbiased"),
}
BEGIN, END = "<!-- fqt table begin -->", "<!-- fqt table end -->"


def command(dataset: str, row: str, seed: int, root: pathlib.Path) -> list[str]:
    """The ``qflax train`` command of one row and seed."""
    return _sweeps.train_command(SETS[dataset], row, seed, root / f"{dataset}-{row}-s{seed}")


def _summary(root: pathlib.Path, dataset: str, row: str, seed: int) -> dict | None:
    return _sweeps.summary(root / f"{dataset}-{row}-s{seed}")


def _metric(dataset: str, summary: dict) -> float:
    """Test accuracy in % (images) or bits per character (text)."""
    if dataset == "pydoc_text":
        return summary["test_loss"] / math.log(2)
    return 100 * summary["test_accuracy"]


def _grads(summary: dict) -> str:
    """The gradient quantizers of the layers, e.g. ``float ×2, bhq8 ×2``."""
    kinds = [layer.get("grad", "float") for layer in summary["layers"]]
    return ", ".join(f"{k} ×{kinds.count(k)}" for k in dict.fromkeys(kinds))


def table(dataset: str, root: pathlib.Path, seeds: list[int]) -> str:
    """The table of one set's finished runs."""
    text = dataset == "pydoc_text"
    found = {
        row: [s for seed in seeds if (s := _summary(root, dataset, row, seed))]
        for row in SET_ROWS[dataset]
    }
    means = {r: statistics.fmean(_metric(dataset, s) for s in v) for r, v in found.items() if v}
    metric = "test bits per character" if text else "test accuracy %"
    lines = [
        f"| row | {metric} (mean ± std) | vs QAT W8A8 | vs float | seeds | ∇Y quantizers "
        "(per layer) | wall s (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, runs in found.items():
        if not runs:
            continue
        values = [_metric(dataset, s) for s in runs]
        cells = []
        for ref in ("qat8", "float"):
            if ref not in means or row == ref:
                cells.append("—")
            elif text:  # relative bits per character
                cells.append(f"{100 * (means[row] / means[ref] - 1):+.1f}%")
            else:
                cells.append(f"{means[row] - means[ref]:+.2f} pt")
        wall = statistics.fmean(s["wall_seconds"] for s in runs)
        lines.append(
            f"| {fqt_rows.LABELS[row]} (`{row}`) | {_sweeps.mean_std(values, 3 if text else 2)} | "
            f"{cells[0]} | {cells[1]} | {len(runs)} | {_grads(runs[0])} | {wall:.0f} |"
        )
    example = shlex.join(command(dataset, "bhq8", 0, pathlib.Path("runs/fqt")))
    return "\n".join(lines) + f"\n\nCommand (row `bhq8`, seed 0; `:ROW` picks the row): `{example}`"


def main(argv: list[str] | None = None) -> int:
    parser = _sweeps.arguments(__doc__, "runs/fqt", fqt_rows.ROWS)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    args, root = _sweeps.parse(parser, argv)
    if not args.table_only:
        todo = [
            (command(d, r, s, root), root / f"{d}-{r}-s{s}")
            for s in args.seeds
            for d in args.sets
            for r in SET_ROWS[d]
            if not args.rows or r in args.rows
        ]
        _sweeps.run_all(todo, args.jobs)
    seeds = sorted(set(args.seeds))
    parts = []
    for dataset in SETS:
        title = "CNN on mnist5k" if dataset == "mnist5k" else "character transformer, pydoc_text"
        parts.append(f"**{title}**\n\n{table(dataset, root, seeds)}")
    text = "\n\n".join(parts)
    print(text)
    if not args.no_write:
        _sweeps.write_block(README, BEGIN, END, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
