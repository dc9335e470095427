"""Runs the Fashion-MNIST rows over seeds and writes their table into
``experiments/fashion_mnist/README.md``: every quantized row next to the float reference
fine-tuned like it, with the difference and whether it exceeds two standard errors.

    python -m experiments.fashion_mnist.sweep --jobs 2          # every row, seeds 0 1 2 (~4 h)
    python -m experiments.fashion_mnist.sweep --rows gdnsq-w2a2 lsq-w2a2 --seeds 0
    python -m experiments.fashion_mnist.sweep --table-only      # rebuild from the records
    python -m experiments.fashion_mnist.sweep --table-only --root /elsewhere/runs  # record them
    python -m experiments.fashion_mnist.sweep --groups bnnpp --jobs 2   # the BNN++ study only

Each run is one ``qflax train`` in ``runs/fashion_mnist/<row>-s<seed>`` (its output in
``<row>-s<seed>.log``). A finished run's summary is kept as its record,
``experiments/fashion_mnist/results/<row>-s<seed>.json`` (in git), and the tables are built
from the records only; rows with a record are skipped, so the command resumes where it stopped,
also in a later session whose ``runs/`` is empty (a killed run restarts from its last
checkpoint). The float teachers of a seed run first, and only when a row of that seed still
needs them; every other row starts from (and, where its config says so, distils from) its
teacher of the same seed. A teacher rerun in a later session must reproduce its record's test
accuracy (training on this CPU is deterministic), or that seed's students stop with an error
rather than mix two teachers in one table. Rows run group by group (``main``, then the
``bnnpp`` study) and seed by seed, so a partial sweep has whole seeds of the main table first.

The BNN++ study (METHODS.md 4; issue 17): BNN and BNN++ fine-tuned at W1A1 and weights-only
(W1A32), on the CNN and on a small ViT, with BNN++'s SignSwish acting on the latent weights as
they are (the recipe default, μ annealed 5 → 50) or normalised per channel by ``mean|w|``
(``recipe_kwargs.normalize``, so μ is relative to the weights' scale). Its table gives the
exact (sign) and relaxed (training-time forward) accuracies and the fraction of latent weights
inside SignSwish's non-saturated band ``|μ·z| < 2.40`` at the final μ (``z`` the pair's input),
where the forward is not yet ±1.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import shlex
import statistics
import sys

import numpy as np

from experiments import _sweeps

HERE = pathlib.Path(__file__).resolve().parent
README = HERE / "README.md"
RECORDS = HERE / "results"
CONFIGS = "experiments/fashion_mnist"
BEGIN, END = "<!-- fashion table begin -->", "<!-- fashion table end -->"
STUDY_BEGIN, STUDY_END = "<!-- bnnpp table begin -->", "<!-- bnnpp table end -->"
PAIRS = {
    "bc": "BinaryConnect",
    "pc": "ProxConnect",
    "proxquant": "reverse PC / ProxQuant",
    "bnn": "BNN",
    "bnn+": "BNN+",
    "bnn++": "BNN++",
}
# Dead-zone decays: 2 and 4 (the two), and 0.5 and 1, added after seed 0 gave 95.0%
# sparsity at -1.64 points (decay 2): the goal (>= 80% within 1 point) needs less sparsity.
CODEQ_DECAYS = ("0.5", "1", "2", "4")


@dataclasses.dataclass(frozen=True)
class Row:
    """One configuration, run once per seed in ``<root>/<name>-s<seed>``."""

    config: str  # file (and :variant) under experiments/fashion_mnist/
    overrides: tuple[tuple[str, str], ...]  # --config.KEY=VALUE pairs
    label: str
    teacher: str | None = "fp"  # the float row of the same seed it starts from
    ref: str | None = None  # the row its accuracy is compared with (None: the teacher)
    group: str = "main"  # "main" (the table) or "bnnpp" (the BNN++ study)


def _rows() -> dict[str, Row]:
    rows = {
        "fp": Row("fp.py", (), "float CNN (teacher, 20 epochs)", None),
        "fp-ht": Row("fp.py:ht", (), "float CNN, hardtanh (teacher of the W1A1 pairs)", None),
        "fp-ft-kd": Row("fp_ft.py:kd", (), "float fine-tuned: distilled, batch 32", ref="fp"),
        "fp-ft-ce": Row("fp_ft.py:ce", (), "float fine-tuned: cross-entropy, batch 128", ref="fp"),
        "fp-ft-ce-ht": Row(
            "fp_ft.py:ce-ht", (), "float hardtanh fine-tuned: cross-entropy", "fp-ht", "fp-ht"
        ),
        "fp-ft-sgd": Row("fp_ft.py:sgd", (), "float fine-tuned: SGD (as DBSSQ)", ref="fp"),
    }
    for b in (4, 2, 1):
        rows[f"gdnsq-w{b}a{b}"] = Row(
            "gdnsq.py", (("target_bits", str(b)),), f"GDNSQ target W{b}A{b}", ref="fp-ft-kd"
        )
    rows["gdnsq-w1a32"] = Row("gdnsq.py:w1a32", (), "GDNSQ target W1A32", ref="fp-ft-kd")
    for m, name in (("lsq", "LSQ"), ("pact", "PACT"), ("dorefa", "DoReFa")):
        for b in (4, 2):
            rows[f"{m}-w{b}a{b}"] = Row(
                f"{m}.py", (("target_bits", str(b)),), f"{name} W{b}A{b}", ref="fp-ft-kd"
            )
    for pair, name in PAIRS.items():
        rows[f"pairs-{pair}"] = Row(
            "pairs.py", (("pair", pair),), f"{name} W1A1 (`{pair}`)", "fp-ht", "fp-ft-ce-ht"
        )
    rows["bc-w1a32"] = Row(
        "pairs.py:w1a32", (("pair", "bc"),), "BinaryConnect W1A32 (weights only)", ref="fp-ft-ce"
    )
    rows["dbssq-w"] = Row(
        "dbssq.py", (), "DBSSQ weights shift-2, activations float", ref="fp-ft-sgd"
    )
    rows["dbssq-w1a1"] = Row("dbssq.py:w1a1", (), "DBSSQ W1A1", ref="fp-ft-sgd")
    for d in CODEQ_DECAYS:
        rows[f"codeq-dz{d}"] = Row(
            "codeq.py", (("quant.deadzone_decay", d),), f"CoDeQ dead-zone decay {d}", ref="fp-ft-ce"
        )
    rows["fp-vit"] = Row("fp.py:vit", (), "float ViT (teacher)", None, group="bnnpp")
    rows["fp-ft-vit"] = Row(
        "fp_ft.py:vit-ce", (), "float ViT fine-tuned", "fp-vit", "fp-vit", group="bnnpp"
    )
    for key, (model, mode) in STUDY.items():
        for pair in ("bnn", "bnn++", "bnn++-norm"):
            name = f"bnnpp-{key}-{pair}"
            if key == "cnn-w1a1" and pair != "bnn++-norm":
                continue  # the main table's pairs-bnn / pairs-bnn++
            variant = {"cnn-w1a1": "", "cnn-w1a32": ":w1a32", "vit-w1a1": ":vit"}.get(key)
            variant = ":vit-w1a32" if key == "vit-w1a32" else variant
            overrides = (("pair", pair.removesuffix("-norm")),)
            if pair.endswith("-norm"):
                overrides += (("recipe_kwargs.normalize", "True"),)
            rows[name] = Row(
                f"pairs.py{variant}",
                overrides,
                f"{PAIRS[pair.removesuffix('-norm')]} {mode}, {model}"
                + (", normalised" if pair.endswith("-norm") else ""),
                STUDY_TEACHERS[key],
                STUDY_REFS[key],
                group="bnnpp",
            )
    return rows


# The BNN++ study's settings: (model, mode), their teachers and fine-tuned float references.
STUDY = {
    "cnn-w1a1": ("CNN", "W1A1"),
    "cnn-w1a32": ("CNN", "W1A32"),
    "vit-w1a1": ("ViT", "W1A1"),
    "vit-w1a32": ("ViT", "W1A32"),
}
STUDY_TEACHERS = {
    "cnn-w1a1": "fp-ht",
    "cnn-w1a32": "fp",
    "vit-w1a1": "fp-vit",
    "vit-w1a32": "fp-vit",
}
STUDY_REFS = {
    "cnn-w1a1": "fp-ft-ce-ht",
    "cnn-w1a32": "fp-ft-ce",
    "vit-w1a1": "fp-ft-vit",
    "vit-w1a32": "fp-ft-vit",
}
GROUPS = ("main", "bnnpp")


ROWS = _rows()


def command(name: str, seed: int, root: pathlib.Path) -> list[str]:
    """The ``qflax train`` command of one row and seed."""
    row = ROWS[name]
    teacher = None if row.teacher is None else root / f"{row.teacher}-s{seed}"
    return _sweeps.row_command(
        f"{CONFIGS}/{row.config}", row.overrides, seed, root / f"{name}-s{seed}", teacher
    )


def records(results: pathlib.Path, name: str, seeds: list[int]) -> list[dict]:
    """The records of the finished runs of ``name`` (in seed order)."""
    return [r for seed in seeds if (r := _sweeps.load_record(results, name, seed))]


def accuracies(results: pathlib.Path, name: str, seeds: list[int]) -> list[float]:
    """Test accuracies (%) of the finished runs of ``name``."""
    return [100 * r["test_accuracy"] for r in records(results, name, seeds)]


def compare(a: list[float], b: list[float]) -> tuple[float, float]:
    """``(mean(a) − mean(b), its standard error)`` (unpaired; NaN with fewer than 2 runs)."""
    if len(a) < 2 or len(b) < 2:
        return statistics.fmean(a) - statistics.fmean(b), math.nan
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return statistics.fmean(a) - statistics.fmean(b), se


def _difference(a: list[float], b: list[float]) -> str:
    if not a or not b:
        return "—"
    delta, se = compare(a, b)
    if math.isnan(se):
        return f"{delta:+.2f} (n < 2) | —"
    verdict = "yes" if abs(delta) > 2 * se else "no"
    return f"{delta:+.2f} ± {2 * se:.2f} | {verdict}"


def _notes(runs: list[dict]) -> str:
    notes = []
    within = [s["within_target"] for s in runs if "within_target" in s]
    if within:
        notes.append(f"within target {sum(within)}/{len(within)}")
    if "sparsity" in runs[0] and runs[0].get("sparsity"):
        notes.append(f"sparsity {100 * statistics.fmean(s['sparsity'] for s in runs):.1f}%")
    if "blended_test_accuracy" in runs[0]:
        blended = statistics.fmean(100 * s["blended_test_accuracy"] for s in runs)
        notes.append(f"relaxed {blended:.2f}")
    return "; ".join(notes) or "—"


def table(results: pathlib.Path, seeds: list[int]) -> str:
    """The table of every row with at least one record in ``results``."""
    lines = [
        "| row | test accuracy % (mean ± std) | vs reference: Δ ± 2 SE (points) | beyond 2 SE | "
        "reference | vs float teacher | bits w/a (GDNSQ: per layer, first seed) | notes | "
        "seeds | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in ROWS.items():
        runs = records(results, name, seeds)
        if not runs or row.group != "main":
            continue
        acc = [100 * s["test_accuracy"] for s in runs]
        ref = row.ref
        vs_ref = _difference(acc, accuracies(results, ref, seeds)) if ref else "— | —"
        teacher = row.teacher or name
        vs_teacher = "—"
        if row.teacher:
            found = accuracies(results, teacher, seeds)
            if found:
                vs_teacher = f"{statistics.fmean(acc) - statistics.fmean(found):+.2f}"
        wall = statistics.fmean(s["wall_seconds"] for s in runs)
        lines.append(
            f"| {row.label} | {_sweeps.mean_std(acc, 2)} | {vs_ref} | "
            f"{f'`{ref}`' if ref else '—'} | {vs_teacher} | {_sweeps.bits_cell(runs[0])} | "
            f"{_notes(runs)} | "
            f"{len(runs)} | {wall:.0f} |"
        )
    gdnsq = accuracies(results, "gdnsq-w2a2", seeds)
    lsq = accuracies(results, "lsq-w2a2", seeds)
    extra = ""
    if gdnsq and lsq:
        delta, se = compare(gdnsq, lsq)
        verdict = (
            "n < 2"
            if math.isnan(se)
            else ("beyond" if abs(delta) > 2 * se else "within") + f" 2 SE (± {2 * se:.2f})"
        )
        extra = f"\n\nGDNSQ − LSQ at W2A2: {delta:+.2f} points, {verdict}."
    example = shlex.join(command("gdnsq-w2a2", 0, pathlib.Path("runs/fashion_mnist")))
    return "\n".join(lines) + extra + f"\n\nCommand (row `gdnsq-w2a2`, seed 0): `{example}`"


# SignSwish's derivative β[2 − βx·tanh(βx/2)]/(1 + cosh βx) is 0 at βx = ±U: beyond it the
# forward has reached (and overshoots) ±1; inside, a latent weight is in the relaxed band.
U = 2.3994


def _study_name(key: str, pair: str) -> str:
    if key == "cnn-w1a1" and pair != "bnn++-norm":
        return f"pairs-{pair}"
    return f"bnnpp-{key}-{pair}"


def band_fraction(workdir: pathlib.Path) -> float:
    """The fraction of binarized latent weights with ``|μ·z| < U`` at the run's final μ (``z``:
    the pair's input, the latent weight or, normalised, the weight over its channel's
    ``mean|w|``); NaN when no layer has a μ."""
    from flax import nnx

    from qflax.layers import QuantConv, QuantEinsum, QuantLinear
    from qflax.train import load_model

    model, _, _ = load_model(workdir)
    inside = total = 0
    for _, layer in nnx.iter_graph(model):
        if not isinstance(layer, (QuantConv, QuantEinsum, QuantLinear)):
            continue
        if not hasattr(layer, "weight_mu"):
            continue
        mu = float(np.asarray(layer.weight_mu[...]))
        w = np.asarray(layer.inner.kernel[...], np.float64)
        if layer.recipe.weight.config.normalize:
            w = w / np.maximum(np.mean(np.abs(w), axis=tuple(range(w.ndim - 1))), 1e-30)
        inside += int(np.sum(np.abs(mu * w) < U))
        total += w.size
    return inside / total if total else math.nan


def study_table(results: pathlib.Path, seeds: list[int]) -> str:
    """BNN against BNN++ (latent and normalised) per model and mode: exact and relaxed
    accuracy, the reference, and the band fraction."""
    lines = [
        "| setting | reference (fine-tuned float) | BNN | BNN++ exact / relaxed | BNN++ − BNN: "
        "Δ ± 2 SE | BNN++ in band | BNN++ normalised exact / relaxed | normalised − BNN: "
        "Δ ± 2 SE | normalised in band | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(name):
        runs = records(results, name, seeds)
        acc = [100 * s["test_accuracy"] for s in runs]
        relaxed = [100 * s.get("blended_test_accuracy", s["test_accuracy"]) for s in runs]
        return runs, acc, relaxed

    def band(name):
        found = [r["band_fraction"] for r in records(results, name, seeds)]
        found = [f for f in found if f is not None and not math.isnan(f)]
        return f"{100 * statistics.fmean(found):.1f}%" if found else "—"

    for key, (model, mode) in STUDY.items():
        _, bnn, _ = cell(_study_name(key, "bnn"))
        ref = accuracies(results, STUDY_REFS[key], seeds)
        parts = [f"{model} {mode}", _sweeps.mean_std(ref, 2) if ref else "—"]
        parts.append(_sweeps.mean_std(bnn, 2) if bnn else "—")
        counts = [len(bnn)]
        for pair in ("bnn++", "bnn++-norm"):
            runs, acc, relaxed = cell(_study_name(key, pair))
            counts.append(len(runs))
            if not acc:
                parts += ["—", "—", "—"]
                continue
            parts.append(f"{_sweeps.mean_std(acc, 2)} / {statistics.fmean(relaxed):.2f}")
            parts.append(_difference(acc, bnn).replace(" | ", " ") if bnn else "—")
            parts.append(band(_study_name(key, pair)))
        parts.append("/".join(map(str, counts)))
        lines.append("| " + " | ".join(parts) + " |")
    example = shlex.join(command("bnnpp-vit-w1a1-bnn++", 0, pathlib.Path("runs/fashion_mnist")))
    return "\n".join(lines) + f"\n\nCommand (ViT W1A1 BNN++, seed 0): `{example}`"


def _record(results: pathlib.Path, name: str, seed: int, workdir: pathlib.Path) -> dict:
    """Keeps a finished run as its record; a BNN/BNN++ pair row's record also holds its
    :func:`band_fraction` (None without a μ)."""
    extra = None
    if ROWS[name].config.startswith("pairs.py"):
        band = band_fraction(workdir)
        extra = {"band_fraction": None if math.isnan(band) else band}
    return _sweeps.save_record(results, name, seed, workdir, extra)


def run_seed(
    names: list[str], seed: int, root: pathlib.Path, results: pathlib.Path, jobs: int
) -> list[str]:
    """Runs the rows ``names`` (and the references they are judged against) of one seed that
    have no record yet: first the teachers they need, then the rest; returns the failures."""
    rows = list(dict.fromkeys(names + [ROWS[n].ref for n in names if ROWS[n].ref]))
    missing = [n for n in rows if _sweeps.load_record(results, n, seed) is None]
    teachers = {ROWS[n].teacher for n in missing} - {None}
    teachers |= {n for n in missing if ROWS[n].teacher is None}
    students = [n for n in missing if ROWS[n].teacher is not None]

    names_of = {root / f"{n}-s{seed}": n for n in ROWS}
    kept = set()

    def todo(stage):
        return [(command(n, seed, root), root / f"{n}-s{seed}") for n in stage]

    def keep(workdir):
        _record(results, names_of[workdir], seed, workdir)  # raises on a mismatch
        kept.add(names_of[workdir])

    failures = _sweeps.run_all(todo(sorted(teachers)), jobs, keep)
    # a teacher that failed, or did not reproduce its record, is not kept: skip its students
    students = [n for n in students if ROWS[n].teacher in kept]
    return failures + _sweeps.run_all(todo(students), jobs, keep)


def harvest(root: pathlib.Path, results: pathlib.Path, seeds: list[int]) -> None:
    """Records every finished run under ``root`` that has no record yet (a sweep stopped
    before it could, or one run elsewhere with ``--root``)."""
    for name in ROWS:
        for seed in seeds:
            workdir = root / f"{name}-s{seed}"
            if _sweeps.summary(workdir) and not _sweeps.load_record(results, name, seed):
                _record(results, name, seed, workdir)


def main(argv: list[str] | None = None) -> int:
    parser = _sweeps.arguments(__doc__, "runs/fashion_mnist", ROWS)
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=GROUPS)
    parser.add_argument(
        "--results", default=str(RECORDS), help="the records' folder (default: results/ here)"
    )
    args, root = _sweeps.parse(parser, argv)
    results = pathlib.Path(args.results).resolve()
    harvest(root, results, [0, 1, 2] if args.table_only else sorted(set(args.seeds)))
    failures = []
    if not args.table_only:
        for group in args.groups:
            names = [n for n in args.rows or ROWS if ROWS[n].group == group]
            if group == "bnnpp" and not args.rows:  # the main rows the study reads
                names += [_study_name("cnn-w1a1", p) for p in ("bnn", "bnn++")]
            for seed in args.seeds:
                failures += run_seed(names, seed, root, results, args.jobs)
    seeds = [0, 1, 2] if args.table_only else sorted(set(args.seeds))
    for group, (begin, end), build in (
        ("main", (BEGIN, END), table),
        ("bnnpp", (STUDY_BEGIN, STUDY_END), study_table),
    ):
        if group not in args.groups:
            continue
        text = build(results, seeds)
        print(text, end="\n\n")
        if not args.no_write:
            _sweeps.write_block(README, begin, end, text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
