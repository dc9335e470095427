"""The ``qflax`` command. Thin: every subcommand calls an importable function."""

from __future__ import annotations

import argparse
import sys
import time


def _report(args: argparse.Namespace) -> int:
    from qflax import report

    start = time.perf_counter()
    rows, context = report.quantizer_report(seed=args.seed)
    print(report.format_table(rows, context))
    print(f"\nwall time: {time.perf_counter() - start:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qflax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser(
        "report",
        help="quantize bundled MNIST images and fitted MLP weights with every quantizer; "
        "print SQNR and the fraction of levels used",
    )
    rep.add_argument("--seed", type=int, default=0, help="seed of the data split and the MLP fit")
    rep.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
