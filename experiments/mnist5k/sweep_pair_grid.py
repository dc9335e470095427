"""A forward × backward grid of ProxConnect++ pairs on one dataset, written as one table.

Every (F, B) of ``--forwards`` × ``--backwards`` (names in ``qflax.quantizers.FORWARDS`` /
``BACKWARDS``, or registered by the user's code through ``--import FILE``) trains the pairs
study (``experiments/mnist5k/pairs.py``: W1A1 conv2/dense, float stem and head, hardtanh model)
with ``--config.pair.forward=F --config.pair.backward=B``; each run's workdir is
``ROOT/F--B-s<seed>``. Finished runs (a ``summary.json``) are not repeated, so an interrupted
grid resumes. The table gives, per pair, the ProxConnect++ criterion (which condition fails)
and the exact and blended test accuracies (mean ± std over seeds), and is written to
``ROOT/table.md``.

    python -m experiments.mnist5k.sweep_pair_grid --dataset digits --epochs 2 --root runs/pair-grid
    python -m experiments.mnist5k.sweep_pair_grid --forwards sign staircase --backwards identity \\
        hardtanh sign_swish soft_staircase --set recipe_kwargs.bits=1 --seeds 0 1 2 \\
        --dataset mnist5k --root runs/pair-grid-mnist5k
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
FORWARDS = ("sign", "prox", "sign_swish", "identity")
BACKWARDS = ("identity", "hardtanh", "sign_swish", "poly_sign")


def run_one(forward: str, backward: str, seed: int, args: argparse.Namespace) -> dict:
    """Trains (or reads the finished run of) one pair; returns its summary."""
    from qflax.runs import apply_overrides, load_config_file
    from qflax.train import train_and_evaluate

    workdir = pathlib.Path(args.root) / f"{forward}--{backward}-s{seed}"
    summary_file = workdir / "summary.json"
    if summary_file.is_file():
        return json.loads(summary_file.read_text())
    config = load_config_file(str(HERE / f"pairs.py:{args.variant}"))
    overrides = [
        ("pair.name", ""),
        ("pair.forward", forward),
        ("pair.backward", backward),
        ("dataset", args.dataset),
        ("seed", str(seed)),
        ("progress_bar", "false"),
    ]
    if args.epochs:
        overrides.append(("epochs", str(args.epochs)))
    for item in args.set:
        key, _, value = item.partition("=")
        overrides.append((key, value))
    if args.imports:
        overrides.append(
            ("imports", repr(tuple(str(pathlib.Path(f).resolve()) for f in args.imports)))
        )
    apply_overrides(config, overrides)
    print(f"== {forward} / {backward} seed {seed} -> {workdir}", flush=True)
    _, summary = train_and_evaluate(config, workdir)
    return summary


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def table(results: dict[tuple[str, str], list[dict]]) -> str:
    """The markdown table of a grid's results."""
    lines = [
        "| forward F | backward B | criterion F = P∘B | exact test acc % | blended test acc % |",
        "|---|---|---|---|---|",
    ]
    for (forward, backward), summaries in results.items():
        criteria = [c for s in summaries for c in s.get("pair_criterion", {}).values()]
        failed = sorted({name for c in criteria for name in c["failed"]})
        verdict = "holds" if criteria and not failed else "fails: " + ", ".join(failed)
        exact = [s["test_accuracy"] for s in summaries]
        blended = [s["blended_test_accuracy"] for s in summaries if "blended_test_accuracy" in s]
        lines.append(f"| {forward} | {backward} | {verdict} | {_cell(exact)} | {_cell(blended)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forwards", nargs="+", default=list(FORWARDS))
    parser.add_argument("--backwards", nargs="+", default=list(BACKWARDS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--epochs", type=int, default=0, help="0: the config's")
    parser.add_argument("--variant", default="scratch", choices=("scratch", "smoke"))
    parser.add_argument("--root", default="runs/pair-grid")
    parser.add_argument("--set", nargs="*", default=[], help="more KEY=VALUE config overrides")
    parser.add_argument(
        "--import", dest="imports", nargs="*", default=[], help="files registering user pairs"
    )
    args = parser.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if args.imports:  # the user's forwards/backwards must be known before names are checked
        from qflax.runs import import_extension

        for file in args.imports:
            import_extension(str(pathlib.Path(file).resolve()))
    from qflax import quantizers as qz

    for field, names, registry in (
        ("--forwards", args.forwards, qz.FORWARDS),
        ("--backwards", args.backwards, qz.BACKWARDS),
    ):
        unknown = [n for n in names if n not in registry]
        if unknown:
            parser.error(f"{field} {unknown} are not known; allowed: {', '.join(registry)}")
    results = {
        (f, b): [run_one(f, b, seed, args) for seed in args.seeds]
        for f in args.forwards
        for b in args.backwards
    }
    text = table(results)
    root = pathlib.Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    command = "python -m experiments.mnist5k.sweep_pair_grid " + " ".join(argv or sys.argv[1:])
    (root / "table.md").write_text(f"`{command}`\n\n{text}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
