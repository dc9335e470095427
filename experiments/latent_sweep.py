"""Runs the latent-code experiments over seeds and writes their tables (and the rate–distortion
plot) into ``experiments/README.md``: the mnist5k autoencoder (``codec``: PSNR, utilisation and
bits per vector of every row of ``experiments/latent_rows.py``) and the split CNN (``split``:
accuracy and bytes per sample at 1–16 bits per transmitted value, and the K chosen from the
entropy of the codes).

    python -m experiments.latent_sweep --jobs 2                   # both sets, seeds 0 1 2
    python -m experiments.latent_sweep --sets codec --rows fsq4 hex4 --seeds 0
    python -m experiments.latent_sweep --table-only               # rebuild from runs/latent

Each run is one ``qflax train`` in ``runs/latent/<set>-<row>-s<seed>``; finished runs are not
repeated, so an interrupted sweep resumes. The entropy-chosen split row: after the float split
model of a seed has trained, :func:`qflax.quantizers.choose_levels` reads the codes of its cut
activations on the training images and the row ``k<K>`` is trained with that K.
"""

from __future__ import annotations

import json
import math
import pathlib
import shlex
import statistics
import sys

import numpy as np

from experiments import _sweeps, latent_rows

HERE = pathlib.Path(__file__).resolve().parent
README = HERE / "README.md"
PLOT = HERE / "latent_rate_distortion.png"
CONFIGS = {"codec": "experiments/mnist5k/codec.py", "split": "experiments/mnist5k/split.py"}
BEGIN, END = "<!-- latent tables begin -->", "<!-- latent tables end -->"
CHOICE = "choice.json"  # the entropy-chosen K of a seed, next to the split runs


def workdir(root: pathlib.Path, dataset: str, row: str, seed: int) -> pathlib.Path:
    return root / f"{dataset}-{row}-s{seed}"


def chosen_levels(root: pathlib.Path, seed: int) -> int | None:
    """The K chosen for ``seed`` from its float split model's cut (computed once, then read
    from ``<root>/split-choice-s<seed>.json``); None until the float model has trained."""
    path = root / f"split-choice-s{seed}.json"
    if path.is_file():
        return int(json.loads(path.read_text())["levels"])
    float_dir = workdir(root, "split", "float", seed)
    if _sweeps.summary(float_dir) is None:
        return None
    from flax import nnx

    from qflax import runs
    from qflax.quantizers import choose_levels

    model, config, _ = runs.load_model(float_dir)
    dataset = runs.load_dataset(config)
    cut = nnx.jit(lambda m, x: m.front(x, train=False))
    x = np.concatenate([np.asarray(cut(model, dataset.train_x[i : i + 500])) for i in (0, 500)])
    levels, table = choose_levels(x)
    path.write_text(json.dumps({"levels": levels, "table": table}, indent=2) + "\n")
    return levels


def todo(sets, rows, seeds, root) -> list[tuple[list[str], pathlib.Path]]:
    out = []
    for seed in seeds:
        for dataset in sets:
            names = latent_rows.CODEC_ROWS if dataset == "codec" else latent_rows.SPLIT_BITS
            for row in names:
                if rows and row not in rows:
                    continue
                wd = workdir(root, dataset, row, seed)
                out.append((_sweeps.train_command(CONFIGS[dataset], row, seed, wd), wd))
    return out


def _runs(root, dataset, row, seeds) -> list[dict]:
    return [s for seed in seeds if (s := _sweeps.summary(workdir(root, dataset, row, seed)))]


def codec_rows(root: pathlib.Path, seeds: list[int]) -> dict[str, dict]:
    """Per codec row: mean PSNR, its std, bits per vector, utilisation and seeds."""
    out = {}
    for row in latent_rows.CODEC_ROWS:
        found = _runs(root, "codec", row, seeds)
        if not found:
            continue
        psnr = [s["test_psnr"] for s in found]
        out[row] = {
            "psnr": statistics.fmean(psnr),
            "cell": _sweeps.mean_std(psnr, 2),
            "bits": found[0].get("bits_per_vector"),
            "utilisation": statistics.fmean(s.get("utilisation", math.nan) for s in found),
            "usage": statistics.fmean(s.get("usage", math.nan) for s in found),
            "perplexity": statistics.fmean(s.get("perplexity", math.nan) for s in found),
            "seeds": len(found),
            "quantizer": found[0]["latent"][0]["quantizer"] if "latent" in found[0] else "float",
        }
    return out


def _interpolate(points: list[tuple[float, float]], bits: float) -> float | None:
    """The PSNR of a curve at ``bits`` (linear between its points; None outside them)."""
    points = sorted(points)
    for (b0, p0), (b1, p1) in zip(points, points[1:], strict=False):
        if b0 <= bits <= b1:
            return p0 + (p1 - p0) * (bits - b0) / (b1 - b0) if b1 > b0 else p0
    return None


def codec_table(rows: dict[str, dict]) -> str:
    lines = [
        "| method | row | code | bits per vector | bits per image | test PSNR dB (mean ± std) "
        "| utilisation: perplexity / K (mean) | usage: codes used / K (mean) | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if "float" in rows:
        r = rows["float"]
        lines.append(
            f"| float latent | `float` | — | 32×4 | — | {r['cell']} | — | — | {r['seeds']} |"
        )
    for method, names in latent_rows.CODEC_METHODS.items():
        for row in names:
            if row not in rows:
                continue
            r = rows[row]
            lines.append(
                f"| {method} | `{row}` | {r['quantizer']} | {r['bits']:.2f} | "
                f"{49 * r['bits']:.0f} | {r['cell']} | {100 * r['utilisation']:.1f}% | "
                f"{100 * r['usage']:.1f}% | {r['seeds']} |"
            )
    # The goal: Q2D2 hexagonal ≥ FSQ at equal bits (FSQ's curve read at each hex point).
    fsq = [
        (rows[r]["bits"], rows[r]["psnr"]) for r in latent_rows.CODEC_METHODS["FSQ"] if r in rows
    ]
    checks = []
    for row in latent_rows.CODEC_METHODS["Q2D2 hexagonal"]:
        if row in rows:
            at = _interpolate(fsq, rows[row]["bits"])
            if at is not None:
                checks.append(
                    f"`{row}` ({rows[row]['bits']:.2f} bits): hexagonal {rows[row]['psnr']:.2f} "
                    f"dB vs FSQ {at:.2f} dB ({rows[row]['psnr'] - at:+.2f})"
                )
    if checks:
        lines.append("\nQ2D2 hexagonal against FSQ at equal bits (FSQ's curve interpolated): ")
        lines.append("; ".join(checks) + ".")
    return "\n".join(lines)


def plot(rows: dict[str, dict], path: pathlib.Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    for method, names in latent_rows.CODEC_METHODS.items():
        pts = sorted((rows[r]["bits"] * 49, rows[r]["psnr"]) for r in names if r in rows)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
    if "float" in rows:
        ax.axhline(rows["float"]["psnr"], color="gray", linestyle="--", label="float latent")
    ax.set(xlabel="bits per image (49 codes)", ylabel="test PSNR (dB)", title="mnist5k codec")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)


def split_table(root: pathlib.Path, seeds: list[int]) -> str:
    chosen = {s: chosen_levels(root, s) for s in seeds}
    names = list(latent_rows.SPLIT_BITS) + sorted(
        {f"k{k}" for k in chosen.values() if k is not None} - set(latent_rows.SPLIT_BITS)
    )
    found = {row: _runs(root, "split", row, seeds) for row in names}
    base = found.get("float") or []
    base_acc = statistics.fmean(100 * s["test_accuracy"] for s in base) if base else None
    values = 7 * 7 * 16  # per sample at the cut
    lines = [
        "| row | bits per value | K | test accuracy % (mean ± std) | vs uncompressed | bytes per "
        "sample | vs 16-bit | entropy bits per value | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row, runs in found.items():
        if not runs:
            continue
        acc = [100 * s["test_accuracy"] for s in runs]
        k = latent_rows.split_levels(row)
        if k is None:
            nbytes, entropy, k_cell = 2 * values, "—", "— (16-bit floats)"
        else:
            nbytes = runs[0]["bytes_per_sample"]
            entropy = f"{statistics.fmean(s['latent'][0]['entropy_bits'] for s in runs):.2f}"
            k_cell = str(k)
        delta = (
            "—"
            if row == "float" or base_acc is None
            else f"{statistics.fmean(acc) - base_acc:+.2f} pt"
        )
        label = row if not row.startswith("k") else f"{row} (entropy choice)"
        lines.append(
            f"| `{label}` | {latent_rows.bits_of(row):.0f} | {k_cell} | {_sweeps.mean_std(acc, 2)} "
            f"| {delta} | {nbytes} | {100 * nbytes / (2 * values):.1f}% | {entropy} | "
            f"{len(runs)} |"
        )
    picks = ", ".join(f"seed {s}: K = {k}" for s, k in chosen.items() if k is not None)
    if picks:
        lines.append(f"\nK chosen from the entropy of the float model's cut codes: {picks}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = _sweeps.arguments(__doc__, "runs/latent")
    parser.add_argument("--sets", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args, root = _sweeps.parse(parser, argv)
    if not args.table_only:
        _sweeps.run_all(todo(args.sets, args.rows, args.seeds, root), args.jobs)
        if "split" in args.sets and (not args.rows or "entropy" in args.rows):
            extra = []
            for seed in args.seeds:
                k = chosen_levels(root, seed)
                if k is not None:
                    wd = workdir(root, "split", f"k{k}", seed)
                    extra.append((_sweeps.train_command(CONFIGS["split"], f"k{k}", seed, wd), wd))
            _sweeps.run_all(extra, args.jobs)
    seeds = sorted(set(args.seeds))
    rows = codec_rows(root, seeds)
    example = shlex.join(
        _sweeps.train_command(
            CONFIGS["codec"], "hex4", 0, pathlib.Path("runs/latent/codec-hex4-s0")
        )
    )
    parts = [
        f"**Autoencoder on mnist5k: rate against distortion**\n\n{codec_table(rows)}\n\n"
        f"![rate–distortion](latent_rate_distortion.png)\n\nCommand (row `hex4`, seed 0): "
        f"`{example}`",
        f"**Split CNN on mnist5k: bits per transmitted value**\n\n{split_table(root, seeds)}",
    ]
    text = "\n\n".join(parts)
    print(text)
    if not args.no_write:
        if rows:
            plot(rows, PLOT)
        _sweeps.write_block(README, BEGIN, END, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
