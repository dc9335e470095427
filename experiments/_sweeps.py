"""Pieces the experiment sweeps share: one ``qflax train`` per row and seed in its own workdir
(finished runs are skipped, so a sweep resumes), runs in parallel, mean ± std cells, tables
written between markers of a README, and records: a finished run's summary kept in a folder
under git, so a sweep that spans sessions (whose ``runs/`` does not survive) resumes from the
records and its tables are rebuilt from them."""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import pathlib
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence

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


def run_all(
    todo: Iterable[tuple[list[str], pathlib.Path]],
    jobs: int,
    on_done: Callable[[pathlib.Path], None] | None = None,
) -> list[str]:
    """Trains every ``(command, workdir)`` not finished yet, ``jobs`` at once; returns the
    failures (the other runs still go on). ``on_done(workdir)`` is called for every finished
    run (also one finished before) as soon as it is; a ``RuntimeError`` it raises is a
    failure of that run."""
    todo = list(todo)
    failures = []

    def finished(workdir):
        if on_done is not None:
            try:
                on_done(workdir)
            except RuntimeError as error:
                failures.append(str(error))

    for _, workdir in todo:
        if summary(workdir) is not None:
            finished(workdir)
    todo = [(args, workdir) for args, workdir in todo if summary(workdir) is None]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(train, args, workdir): workdir for args, workdir in todo}
        for future in concurrent.futures.as_completed(futures):
            try:
                future.result()
            except RuntimeError as error:
                failures.append(str(error))
            else:
                finished(futures[future])
    for failure in failures:
        print("FAILED:", failure, file=sys.stderr)
    return failures


def record_path(records: pathlib.Path, name: str, seed: int) -> pathlib.Path:
    """Where the record of row ``name`` and ``seed`` lives."""
    return records / f"{name}-s{seed}.json"


def load_record(records: pathlib.Path, name: str, seed: int) -> dict | None:
    """The record of a finished run (its ``summary.json`` and what the sweep added), or None."""
    path = record_path(records, name, seed)
    return json.loads(path.read_text()) if path.is_file() else None


def save_record(
    records: pathlib.Path, name: str, seed: int, workdir: pathlib.Path, extra: dict | None = None
) -> dict:
    """Keeps the summary of the finished run in ``workdir`` (with ``extra``) as the record of
    ``name`` and ``seed``. A record that exists is kept: when the run's test accuracy differs
    from it (a rerun teacher that did not reproduce its first run) a ``RuntimeError`` says so,
    since runs fine-tuned from the two would be mixed in one table."""
    found = summary(workdir)
    if found is None:
        raise RuntimeError(f"{workdir} has no summary.json: the run did not finish")
    old = load_record(records, name, seed)
    if old is not None:
        if old["test_accuracy"] != found["test_accuracy"]:
            raise RuntimeError(
                f"{workdir} ended at test accuracy {found['test_accuracy']}, but the record "
                f"{record_path(records, name, seed)} says {old['test_accuracy']}: the runs "
                "that start from it would mix two different models; remove that seed's "
                "records to rerun it"
            )
        return old
    record = dict(found, row=name, seed=seed, **(extra or {}))
    record["recorded"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    records.mkdir(parents=True, exist_ok=True)
    path = record_path(records, name, seed)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    partial.replace(path)
    return record


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
