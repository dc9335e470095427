"""Integer inference on every finished run under a folder: does it predict what the model does?

Runs ``qflax.export.evaluate_integer`` (``qflax eval --integer``) on each run directory below
``--root`` (a folder of workdirs, e.g. the mnist5k sweeps of ``experiments/mnist5k/sweep.py``) and
prints one row per method (runs grouped by name without their ``-sN`` seed suffix): integer and
fake-quant test accuracy (means over seeds), ``qflax eval``'s accuracy from ``summary.json``, the
test predictions that differ between integer and fake-quant, and the packed bytes. Runs that
integer inference refuses are listed with the reason (float runs, DBSSQ, weight-only layers).

    python benchmarks/integer_runs.py --root runs/mnist5k
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re
import time

from qflax.export import evaluate_integer


def evaluate_runs(root: pathlib.Path) -> list[dict]:
    rows = []
    for workdir in sorted(p for p in root.iterdir() if (p / "config.json").is_file()):
        start = time.perf_counter()
        try:
            result = evaluate_integer(workdir)
        except ValueError as error:
            rows.append({"run": workdir.name, "error": str(error)})
            continue
        summary_path = workdir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        rows.append(
            {
                "run": workdir.name,
                **result,
                "summary_test_accuracy": summary.get("test_accuracy"),
                "seconds": time.perf_counter() - start,
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    for row in rows:
        groups[re.sub(r"-s\d+$", "", row["run"])].append(row)
    lines = [
        "| runs | seeds | integer acc % | fake-quant acc % | `qflax eval` acc % | differing "
        "predictions | packed bytes (×smaller) |",
        "|---|---|---|---|---|---|---|",
    ]
    refused = []
    total = differ = 0
    for name, group in groups.items():
        ok = [r for r in group if "error" not in r]
        if not ok:
            refused.append(f"- {name} ({len(group)}): {group[0]['error'][:160]}")
            continue

        def mean(key, ok=ok):
            values = [r[key] for r in ok if r.get(key) is not None]
            return 100 * sum(values) / len(values) if values else float("nan")

        d = sum(r["differing_predictions"] for r in ok)
        n = sum(r["test_examples"] for r in ok)
        total, differ = total + n, differ + d
        packed, floats = ok[0]["model_bytes"], ok[0]["float32_bytes"]
        lines.append(
            f"| {name} | {len(ok)} | {mean('test_accuracy'):.2f} | "
            f"{mean('fake_quant_test_accuracy'):.2f} | {mean('summary_test_accuracy'):.2f} | "
            f"{d} of {n} | {packed:,} ({floats / packed:.2f}) |"
        )
    lines.append(f"\nIn all: {differ} of {total} test predictions differ.")
    if refused:
        lines.append("\nRefused (with the reason integer inference gives):")
        lines.extend(refused)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/mnist5k", help="a folder of run workdirs")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = evaluate_runs(pathlib.Path(args.root))
    print(f"{len(rows)} runs under {args.root}; {time.perf_counter() - start:.0f} s\n")
    print(table(rows))


if __name__ == "__main__":
    main()
