"""Runs the quantized-embedding rows of ``experiments/pydoc_text/embed.py`` over seeds and
writes their table into ``experiments/README.md``: bits per character and the embedding's
packed bytes at 32, 8, 4 and 2 bits.

    python -m experiments.embed_sweep --jobs 2       # rows float emb8 emb4 emb2, seeds 0 1 2
    python -m experiments.embed_sweep --table-only   # rebuild from runs/embed

Each run is one ``qflax train`` in ``runs/embed/<row>-s<seed>``; finished runs are skipped.
"""

from __future__ import annotations

import math
import pathlib
import shlex
import statistics
import sys

from experiments import _sweeps
from experiments.pydoc_text import embed

HERE = pathlib.Path(__file__).resolve().parent
README = HERE / "README.md"
CONFIG = "experiments/pydoc_text/embed.py"
BEGIN, END = "<!-- embed table begin -->", "<!-- embed table end -->"


def _bpc(summary: dict) -> float:
    return summary["test_loss"] / math.log(2)


def _stem(summary: dict) -> dict:
    """The embedding's row of the summary's per-layer table."""
    return next(layer for layer in summary["layers"] if layer["name"] == "stem")


def table(root: pathlib.Path, seeds: list[int]) -> str:
    found = {
        row: [s for seed in seeds if (s := _sweeps.summary(root / f"{row}-s{seed}"))]
        for row in embed.ROWS
    }
    base = statistics.fmean(_bpc(s) for s in found["float"]) if found["float"] else None
    lines = [
        "| row | embedding bits | test bits per character (mean ± std) | vs float | embedding "
        "bytes (packed) | × smaller | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, runs in found.items():
        if not runs:
            continue
        values = [_bpc(s) for s in runs]
        stem = _stem(runs[0])
        delta = (
            "—"
            if row == "float" or base is None
            else f"{100 * (statistics.fmean(values) / base - 1):+.1f}%"
        )
        ratio = 4 * stem["params"] / stem["packed_bytes"]
        lines.append(
            f"| `{row}` | {stem['weight_bits']} | {_sweeps.mean_std(values, 3)} | {delta} | "
            f"{stem['packed_bytes']:,} | {ratio:.1f}× | {len(runs)} |"
        )
    example = shlex.join(
        _sweeps.train_command(CONFIG, "emb4", 0, pathlib.Path("runs/embed/emb4-s0"))
    )
    return "\n".join(lines) + f"\n\nCommand (row `emb4`, seed 0): `{example}`"


def main(argv: list[str] | None = None) -> int:
    args, root = _sweeps.parse(_sweeps.arguments(__doc__, "runs/embed", embed.ROWS), argv)
    if not args.table_only:
        todo = [
            (
                _sweeps.train_command(CONFIG, row, seed, root / f"{row}-s{seed}"),
                root / f"{row}-s{seed}",
            )
            for seed in args.seeds
            for row in embed.ROWS
            if not args.rows or row in args.rows
        ]
        _sweeps.run_all(todo, args.jobs)
    text = table(root, sorted(set(args.seeds)))
    print(text)
    if not args.no_write:
        _sweeps.write_block(README, BEGIN, END, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
