"""Pieces the experiment sweeps share: one ``qflax train`` per row and seed in its own workdir
(finished runs are skipped, so a sweep resumes), runs in parallel, mean ± std cells, and
tables written between markers of a README."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import pathlib
import shlex
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence

REPO = pathlib.Path(__file__).resolve().parent.parent


def arguments(doc: str, root: str, rows: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """A parser with the options every sweep takes: ``--rows`` (``rows``: the choices; None:
    any), ``--seeds`` (default 0 1 2), ``--jobs``, ``--root`` (default ``root``),
    ``--table-only`` and ``--no-write``; a sweep adds its own before :func:`parse`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    choices = None if rows is None else list(rows)
    parser.add_argument("--rows", nargs="+", choices=choices, help="default: every row")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once")
    parser.add_argument("--root", default=root, help="where the workdirs go")
    parser.add_argument("--table-only", action="store_true", help="do not train")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    return parser


def parse(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[argparse.Namespace, pathlib.Path]:
    """``(args, root)``: the parsed options (``--jobs`` checked) and ``--root`` made absolute
    (relative to the repository)."""
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs={args.jobs} is not allowed; allowed: integers >= 1")
    root = pathlib.Path(args.root)
    return args, (root if root.is_absolute() else (REPO / root).resolve())


def train_command(config: str, variant: str, seed: int, workdir: pathlib.Path) -> list[str]:
    """The ``qflax train`` command of one row (``config:variant``) and seed."""
    return [
        "qflax",
        "train",
        "--config",
        f"{config}:{variant}",
        f"--config.seed={seed}",
        "--config.progress_bar=false",
        "--workdir",
        str(workdir),
    ]


def row_command(
    config: str,
    overrides: Iterable[tuple[str, str]],
    seed: int,
    workdir: pathlib.Path,
    teacher: pathlib.Path | None = None,
) -> list[str]:
    """The ``qflax train`` command of ``config`` (a path, with ``:variant``) with ``--config.KEY=
    VALUE`` overrides and a seed, starting from the finished run ``teacher`` (its checkpoint:
    ``teacher.mode=checkpoint``) when given."""
    args = ["qflax", "train", "--config", config]
    args += [f"--config.{k}={v}" for k, v in overrides]
    args += [f"--config.seed={seed}", "--config.progress_bar=false"]
    if teacher is not None:
        args += ["--config.teacher.mode=checkpoint", f"--config.teacher.path={teacher}"]
    return args + ["--workdir", str(workdir)]


def train(args: list[str], workdir: pathlib.Path) -> None:
    """Runs a :func:`train_command`; its output goes to ``<workdir>.log``."""
    print("$", shlex.join(args), flush=True)
    workdir.parent.mkdir(parents=True, exist_ok=True)
    log = workdir.with_name(workdir.name + ".log")
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "qflax.cli", *args[1:]], cwd=REPO, stdout=out, stderr=out
        )
    if done.returncode:
        raise RuntimeError(f"{shlex.join(args)} failed (exit {done.returncode}); {log}")


def summary(workdir: pathlib.Path) -> dict | None:
    """A finished run's ``summary.json``, or None."""
    path = workdir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_all(todo: Iterable[tuple[list[str], pathlib.Path]], jobs: int) -> list[str]:
    """Trains every ``(command, workdir)`` not finished yet, ``jobs`` at once; returns the
    failures (the other runs still go on)."""
    todo = [(args, workdir) for args, workdir in todo if summary(workdir) is None]
    failures = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(train, args, workdir) for args, workdir in todo]:
            try:
                future.result()
            except RuntimeError as error:
                failures.append(str(error))
    for failure in failures:
        print("FAILED:", failure, file=sys.stderr)
    return failures


def bits_cell(summary: dict) -> str:
    """The bits a run ended with: per layer ``used weight/act`` for learned bit-widths
    (``learned_bits``), else the average ``weight/act`` bits of the quantized layers."""
    learned = summary.get("learned_bits")
    if learned:
        return ", ".join(
            f"{layer} {row['used'].get('weight', 32)}/{row['used'].get('act', 32)}"
            for layer, row in learned.items()
        )
    return f"{summary['avg_weight_bits']:g}/{summary['avg_act_bits']:g}"


def mean_std(values: list[float], digits: int) -> str:
    """``mean ± std`` (sample standard deviation; 0 for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def write_block(readme: pathlib.Path, begin: str, end: str, text: str) -> None:
    """Replaces the text between the markers ``begin`` and ``end`` of ``readme`` (appends the
    block when the markers are missing)."""
    body = readme.read_text()
    block = f"{begin}\n{text}\n{end}"
    if begin in body and end in body:
        head, rest = body.split(begin, 1)
        body = head + block + rest.split(end, 1)[1]
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    readme.write_text(body)
