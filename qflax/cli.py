"""The ``qflax`` command. Thin: every subcommand calls an importable function.

    qflax train --config experiments/mnist5k/fp.py [--config.KEY=VALUE ...] --workdir DIR
    qflax eval --workdir DIR [--integer]
    qflax ptq --workdir FLOAT_RUN --out DIR [--config.weight_bits=8 --config.act_bits=8
              --config.calibration=absmax|minmax|percentile|mse --config.num_batches=8]
    qflax summary --workdir DIR [--workdir DIR2 ...]
    qflax report [--seed N]

Importing this module is cheap: jax, the datasets and the models are imported by the
subcommands that need them.

Every error is one line ``qflax CMD: error: ...`` on stderr and exit status 1; ``--debug``
(before or after the subcommand) also prints the traceback.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import traceback

CONFIG_PREFIX = "--config."


def _report(args: argparse.Namespace) -> int:
    from qflax import report

    start = time.perf_counter()
    rows, context = report.quantizer_report(seed=args.seed)
    print(report.format_table(rows, context))
    print(f"\nwall time: {time.perf_counter() - start:.1f} s")
    return 0


def split_config_overrides(extra: list[str]) -> list[tuple[str, str]]:
    """``["--config.a.b=1", "--config.c", "x"]`` -> ``[("a.b", "1"), ("c", "x")]``.

    Raises:
      ValueError: an argument that is not a ``--config.KEY=VALUE`` (or ``--config.KEY VALUE``)
        override.
    """
    overrides = []
    i = 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith(CONFIG_PREFIX) or len(arg) == len(CONFIG_PREFIX):
            raise ValueError(
                f"unrecognised argument {arg!r}; allowed: --config.KEY=VALUE overrides"
            )
        body = arg[len(CONFIG_PREFIX) :]
        if "=" in body:
            key, value = body.split("=", 1)
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            key, value = body, extra[i + 1]
            i += 1
        else:
            raise ValueError(f"{arg} has no value; allowed: {arg}=VALUE")
        overrides.append((key, value))
        i += 1
    return overrides


def _headline(result: dict) -> str:
    """``test_accuracy: …`` (classifiers) or ``test_psnr: … dB`` (autoencoders)."""
    if "test_accuracy" not in result and "test_psnr" in result:
        return f"test_psnr: {result['test_psnr']:.2f} dB"
    return f"test_accuracy: {result['test_accuracy']:.4f}"


def _train(args: argparse.Namespace) -> int:
    from qflax.runs import apply_overrides, load_config_file, validate_config
    from qflax.train import train_and_evaluate

    config = load_config_file(args.config)
    config = apply_overrides(config, args.overrides)
    if args.tensorboard is not None:
        config.tensorboard = args.tensorboard == "true"
    validate_config(config)  # train_and_evaluate does not check it again
    _, summary = train_and_evaluate(config, args.workdir)
    text = _headline(summary)
    if "fp_test_accuracy" in summary:
        text += f"  (float teacher: {summary['fp_test_accuracy']:.4f})"
    print(f"{text}  wall: {summary['wall_seconds']:.1f} s  workdir: {args.workdir}")
    return 0


def _bytes_text(result: dict) -> str:
    return (
        f"model_bytes: {result['model_bytes']:,} packed vs {result['float32_bytes']:,} float32 "
        f"({result['compression']:.2f}x smaller)"
    )


def _eval(args: argparse.Namespace) -> int:
    if args.integer:
        from qflax.export import evaluate_integer

        result = evaluate_integer(args.workdir)
    else:
        from qflax.train import evaluate

        result = evaluate(args.workdir)
    path = pathlib.Path(args.workdir) / "eval.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(_headline(result))
    if args.integer:
        print(
            f"fake_quant_test_accuracy: {result['fake_quant_test_accuracy']:.4f}  "
            f"differing_predictions: {result['differing_predictions']} of "
            f"{result['test_examples']}"
        )
        print(_bytes_text(result))
    return 0


def _ptq(args: argparse.Namespace) -> int:
    from qflax.export import ptq, ptq_config
    from qflax.runs import apply_overrides

    options = apply_overrides(ptq_config(), args.overrides)
    result = ptq(args.workdir, args.out, **options.to_dict())
    print(f"test_accuracy: {result['test_accuracy']:.4f}")
    print(
        f"integer_test_accuracy: {result['integer_test_accuracy']:.4f}  "
        f"fp_test_accuracy: {result['fp_test_accuracy']:.4f}  "
        f"differing_predictions: {result['differing_predictions']} of {result['test_examples']}"
    )
    print(
        f"{_bytes_text(result)}  W{result['weight_bits']}A{result['act_bits']} "
        f"calibration: {result['calibration']}  out: {args.out}"
    )
    return 0


# What `qflax summary` reads of a summary.json (and of each of its layers).
SUMMARY_KEYS = (
    "layers",
    "avg_weight_bits",
    "avg_act_bits",
    "params",
    "model_bytes",
    "bops",
    "sparsity",
)
LAYER_KEYS = ("name", "weight_bits", "act_bits", "params", "sparsity")


def _read_summary(path: pathlib.Path) -> dict:
    """``summary.json`` checked for what the tables need (ValueError naming what is missing)."""
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); rerun `qflax train`") from error
    if not isinstance(summary, dict):
        raise ValueError(f"{path} holds {type(summary).__name__}; allowed: a JSON object")
    missing = [key for key in SUMMARY_KEYS if key not in summary]
    layers = summary.get("layers")
    if not missing and (
        not isinstance(layers, list)
        or not all(isinstance(row, dict) and set(LAYER_KEYS) <= set(row) for row in layers)
    ):
        missing = [f"layers[*].{key}" for key in LAYER_KEYS]
    if missing:
        raise ValueError(
            f"{path} is incomplete: missing {', '.join(missing)} (not a summary written by "
            "`qflax train`?)"
        )
    return summary


def _load_summary(workdir: str) -> dict:
    path = pathlib.Path(workdir) / "summary.json"
    if path.is_file():
        return _read_summary(path)
    # No summary yet (an interrupted run): describe the latest checkpoint.
    from qflax.runs import load_dataset, load_model
    from qflax.train import summarize_model

    model, config, meta = load_model(workdir)
    dataset = load_dataset(config)
    summary = summarize_model(model, dataset.test_x[:1])
    print(f"{workdir}: no summary.json yet; the checkpoint of step {meta.get('step')}:")
    return summary


def _summary(args: argparse.Namespace) -> int:
    from qflax.train import format_table

    summaries = []
    for workdir in args.workdir:
        summary = _load_summary(workdir)
        summaries.append((workdir, summary))
        print(f"== {workdir}")
        print(format_table(summary))
        if "test_accuracy" in summary or "test_psnr" in summary:
            line = _headline(summary)
            if "fp_test_accuracy" in summary:
                line += f"  fp_test_accuracy: {summary['fp_test_accuracy']:.4f}"
            print(line)
        print()
    if len(summaries) > 1:
        header = (
            f"{'workdir':<28} {'test acc':>8} {'w bits':>6} {'a bits':>6} {'KiB':>9} "
            f"{'x smaller':>9} {'GBOPs':>8} {'wall s':>7}"
        )
        print(header)
        print("-" * len(header))
        for workdir, s in summaries:
            acc = s.get("test_accuracy", float("nan"))
            print(
                f"{workdir:<28} {acc:>8.4f} {s['avg_weight_bits']:>6.2f} "
                f"{s['avg_act_bits']:>6.2f} {s['model_bytes'] / 1024:>9.1f} "
                f"{s.get('compression', 1.0):>9.2f} {s['bops'] / 1e9:>8.3f} "
                f"{s.get('wall_seconds', float('nan')):>7.1f}"
            )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qflax", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train a model from a config file; resumes from the latest checkpoint in --workdir",
        description="Train from a get_config() file. Override any key with --config.KEY=VALUE "
        "(the value is read with the type of the key's default), e.g. --config.epochs=2 "
        "--config.optimizer.learning_rate=3e-4 --config.model_kwargs.width=0.5.",
        allow_abbrev=False,
    )
    train.add_argument(
        "--config", required=True, help="config file defining get_config(); PATH:ARG passes ARG"
    )
    train.add_argument("--workdir", required=True, help="directory of the run")
    train.add_argument(
        "--tensorboard",
        choices=("true", "false"),
        default=None,
        help="write TensorBoard event files in WORKDIR/tensorboard (config.tensorboard; "
        "default true)",
    )
    train.set_defaults(func=_train)

    evaluate = sub.add_parser(
        "eval",
        help="evaluate the latest checkpoint of a run; prints test_accuracy, writes eval.json",
        allow_abbrev=False,
    )
    evaluate.add_argument("--workdir", required=True, help="directory of the run")
    evaluate.add_argument(
        "--integer",
        action="store_true",
        help="through integer inference (uniform layers on int8 codes with int32 accumulation, "
        "power-of-two weights as shifts, binary layers as XNOR/popcount, float layers in "
        "float32); also prints the fake-quant accuracy, the number of differing predictions "
        "and the packed vs float32 bytes",
    )
    evaluate.set_defaults(func=_eval)

    post = sub.add_parser(
        "ptq",
        help="post-training quantization of a float run: fold BN, calibrate static scales, "
        "evaluate fake-quant and integer inference, save a packed checkpoint",
        description="Quantize a finished float run (MLP or CNN) without training. Options as "
        "--config.KEY=VALUE: weight_bits (2..8, default 8), act_bits (2..8, default 8), "
        "calibration (absmax, minmax, percentile, mse; default absmax), num_batches (training "
        "batches to calibrate on, default 8), first_last_float (default false). Writes "
        "OUT/packed/ (orbax) and OUT/summary.json.",
        allow_abbrev=False,
    )
    post.add_argument("--workdir", required=True, help="directory of a finished float run")
    post.add_argument("--out", required=True, help="directory to write the quantized model to")
    post.set_defaults(func=_ptq)

    summary = sub.add_parser(
        "summary",
        help="per-layer table of a run: bits, parameters, packed bytes, BOPs, sparsity",
        allow_abbrev=False,
    )
    summary.add_argument(
        "--workdir",
        required=True,
        action="append",
        help="directory of the run (repeat to compare runs)",
    )
    summary.set_defaults(func=_summary)

    rep = sub.add_parser(
        "report",
        help="quantize bundled MNIST images and fitted MLP weights with every quantizer; "
        "print SQNR and the fraction of levels used",
    )
    rep.add_argument("--seed", type=int, default=0, help="seed of the data split and the MLP fit")
    rep.set_defaults(func=_report)
    for command in (train, evaluate, post, summary, rep):  # --debug after the subcommand too
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP
        )
    return parser


DEBUG_HELP = "on an error, also print the traceback"


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns the exit status.

    Every error is one line ``qflax CMD: error: ...`` on stderr and status 1: bad input
    (ValueError, e.g. a bad config file or workdir), a NaN loss (FloatingPointError), a file
    system error (OSError); anything else is unexpected (a bug) and its line says so and
    names its type. ``--debug`` prints the traceback first. Usage errors are argparse's
    (usage line, status 2).
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command in ("train", "ptq"):
            args.overrides = split_config_overrides(extra)
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args.func(args)
    except Exception as error:  # noqa: BLE001 - one line each; --debug shows the traceback
        if args.debug:
            traceback.print_exc()
        if isinstance(error, (ValueError, FloatingPointError)):
            message = str(error)
        elif isinstance(error, OSError):
            message = _os_error_text(error)
        else:
            message = f"unexpected {type(error).__name__}: {error}"
            if not args.debug:
                message += " (rerun with --debug for the traceback)"
        print(f"qflax {args.command}: error: {message}", file=sys.stderr)
        return 1


def _os_error_text(error: OSError) -> str:
    """``PermissionError(13, ..., 'runs/x')`` -> ``"runs/x: permission denied"``."""
    if error.filename is None or not error.strerror:
        return str(error)
    text = f"{error.filename}: {error.strerror[0].lower()}{error.strerror[1:]}"
    return text + (f" (-> {error.filename2})" if error.filename2 is not None else "")


if __name__ == "__main__":
    sys.exit(main())
