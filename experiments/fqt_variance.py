"""Bias and variance of the FQT gradient quantizers on real gradients (Chen et al. 2020).

Loads a trained run (default: the QAT W8A8 CNN of the FQT sweep, ``runs/fqt/mnist5k-qat8-s0``)
and, on ``--batches`` training batches of 128 images, measures with
:func:`qflax.studies.gradient_variance` for each gradient quantizer (PTQ, PSQ, BHQ, DoReFa's; at
8, 5 and 4 bits): per layer, the bias of the FQT kernel gradient against the QAT gradient (with
its z-score: about 1 when unbiased) and its variance over ``--keys`` draws, and the quantizer's
own variance on the layer's real ∇Y next to the paper's bound. Writes
``experiments/fqt_variance.{md,json,png}`` and the summary table into ``experiments/README.md``.

    python -m experiments.fqt_sweep --sets mnist5k --rows qat8 --seeds 0   # the model (~2 min)
    python -m experiments.fqt_variance                                    # ~2 min
    python -m experiments.fqt_variance --workdir runs/fqt/mnist5k-qat8-s0 --bits 8 --keys 16
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
README = HERE / "README.md"
BEGIN, END = "<!-- fqt variance begin -->", "<!-- fqt variance end -->"
KINDS = ("ptq", "psq", "bhq", "dorefa_grad")


def measure(workdir: pathlib.Path, kinds, bits_list, keys: int, batches: int) -> list[dict]:
    """One row per (batch, quantizer, bits, layer)."""
    import jax.numpy as jnp

    from qflax import data, runs, studies
    from qflax import layers as ql

    model, config, _ = runs.load_model(workdir)
    dataset = runs.load_dataset(config)
    rows = []
    it = data.batches(dataset.train_x, dataset.train_y, 128, seed=0, epoch=0)
    for b in range(batches):
        x, y = next(it)
        for kind in kinds:
            for bits in bits_list:
                spec = ql.with_grad(ql.Recipe(), kind, bits).grad
                for r in studies.gradient_variance(
                    model, jnp.asarray(x), jnp.asarray(y), grad=spec, keys=keys, seed=b
                ):
                    rows.append({**r, "label": f"{kind}{bits}", "batch": b})
    return rows


def summary_table(rows: list[dict]) -> str:
    """Per quantizer: ∇Y variance / bound and ∇W relative variance per layer (mean over
    batches), and the largest bias z-score."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    layers = list(dict.fromkeys(r["path"] for r in rows))
    head = " | ".join(f"{p}: Var ∇W / ‖∇W‖² · E‖Q(∇Y)−∇Y‖² / bound" for p in layers)
    lines = [f"| ∇Y quantizer | {head} | max bias z |", "|---|" + "---|" * (len(layers) + 1)]
    for label in labels:
        cells = []
        for p in layers:
            sel = [r for r in rows if r["label"] == label and r["path"] == p]
            rel = statistics.fmean(r["rel_variance"] for r in sel)
            ratio = [r["dy_variance"] / r["dy_bound"] for r in sel if r["dy_bound"]]
            ratio_text = f"{statistics.fmean(ratio):.3f}" if ratio else "–"
            cells.append(f"{rel:.3g} · {ratio_text}")
        z = max(r["bias_z"] for r in rows if r["label"] == label)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {z:.2f} |")
    return "\n".join(lines)


def write_readme(text: str) -> None:
    body = README.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in body and END in body:
        head, rest = body.split(BEGIN, 1)
        body = head + block + rest.split(END, 1)[1]
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    README.write_text(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/fqt/mnist5k-qat8-s0")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 5, 4])
    parser.add_argument("--keys", type=int, default=16)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    workdir = pathlib.Path(args.workdir)
    workdir = workdir if workdir.is_absolute() else REPO / workdir
    from qflax import studies

    rows = measure(workdir, args.kinds, args.bits, args.keys, args.batches)
    text = summary_table(rows)
    print(text)
    if not args.no_write:
        studies.write_gradient_report(rows, HERE, name="fqt_variance")
        write_readme(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
