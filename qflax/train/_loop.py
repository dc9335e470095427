"""``train_and_evaluate(config, workdir)``: the training loop behind ``qflax train``.

The loop loads the dataset, builds (and quantizes) the model, restores the latest checkpoint in
``workdir`` if there is one, trains epoch by epoch with one jitted step, evaluates, saves
checkpoints, and writes ``metrics.jsonl``, ``summary.json`` and ``curves.png``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from qflax import parallel, runs
from qflax.runs import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    CURVES_FILE,
    METRICS_FILE,
    QUANTIZATION_FILE,
    SUMMARY_FILE,
    TEACHER_DIR,
    build_model,
    load_model,
    quantize_for_config,
)
from qflax.train import _checkpoint, _summary
from qflax.train._optimizer import learning_rate_schedules
from qflax.train._steps import TrainState, make_eval_step, split_model
from qflax.train._tasks import model_task
from qflax.train._trainer import _learned_bits, build_trainer

__all__ = [
    "NonFiniteLossError",
    "evaluate",
    "train_and_evaluate",
]

logger = logging.getLogger("qflax.train")


class NonFiniteLossError(FloatingPointError):
    """The training loss (or the parameters) became NaN or infinite; names the step."""


def random_shift(
    images: np.ndarray, max_shift: int, rng: np.random.Generator, *, part: tuple[int, int] = (0, 1)
) -> np.ndarray:
    """Translates each image ``(N, H, W, C)`` by random ``(dy, dx)`` in ``[-max_shift,
    max_shift]`` pixels, filling with zeros (the shift is drawn per image from ``rng``).
    ``part=(index, count)``: ``images`` are part ``index`` of ``count`` of a global batch; the
    shifts of the whole batch are drawn and this part's used, as one process would shift it."""
    n, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    index, count = part
    offsets = rng.integers(0, 2 * max_shift + 1, size=(n * count, 2))[index * n : (index + 1) * n]
    out = np.empty_like(images)
    for i, (dy, dx) in enumerate(offsets):
        out[i] = padded[i, dy : dy + height, dx : dx + width]
    return out


def _evaluate_arrays(
    eval_step,
    params,
    rest,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    metric: str = "accuracy",
    multiple: int = 1,
    put=None,
    shard: tuple[int, int] = (0, 1),
) -> dict[str, float]:
    """Mean loss and task score (named ``metric``) over ``(x, y)``, the last batch padded to
    ``batch_size`` (rounded up to a multiple of ``multiple``: the pieces a sharded step splits
    a batch into); ``put`` places each batch as the step expects (:meth:`Trainer.put_batch`).
    ``shard=(index, count)``: this process reads and pads only part ``index`` of ``count`` of
    every batch (``put`` assembles the global batch)."""
    put = put or (lambda batch: batch)
    part, count = shard
    batch_size = -(-min(batch_size, len(x)) // multiple) * multiple
    size = batch_size // count
    totals = {"loss_sum": 0.0, "score_sum": 0.0, "count": 0.0}
    sums = []
    for start in range(0, len(x), batch_size):
        lo = min(start + part * size, len(x))
        xb, yb = x[lo : min(lo + size, start + batch_size, len(x))], y[lo : lo + size]
        yb = yb[: len(xb)]
        n = len(xb)
        weights = np.zeros(size, np.float32)
        weights[:n] = 1.0
        if n < size:
            xb = np.concatenate([xb, np.zeros((size - n, *x.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros((size - n, *y.shape[1:]), yb.dtype)])
        sums.append(eval_step(params, rest, put((xb, yb)), put(weights)))
    for s in jax.device_get(sums):
        for key in totals:
            totals[key] += float(s[key])
    count = max(totals["count"], 1.0)
    return {"loss": totals["loss_sum"] / count, metric: totals["score_sum"] / count}


def evaluate(workdir: str | os.PathLike) -> dict[str, Any]:
    """Re-evaluates the latest checkpoint in ``workdir`` on the test split.

    Returns:
      ``{"test_accuracy", "test_loss", "step", "epoch", "dataset", "model"}`` (an autoencoder:
      ``test_psnr`` instead of ``test_accuracy``).
    """
    model, config, meta = load_model(workdir)
    dataset = runs.load_dataset(config)
    graphdef, params, rest = split_model(model)
    metric = model_task(model).metric
    result = _evaluate_arrays(
        make_eval_step(graphdef),
        params,
        rest,
        dataset.test_x,
        dataset.test_y,
        config.eval_batch_size,
        metric,
    )
    return {
        f"test_{metric}": result[metric],
        "test_loss": result["loss"],
        "step": int(meta.get("step", -1)),
        "epoch": int(meta.get("epoch", -1)),
        "dataset": config.dataset,
        "model": config.model,
    }


# --------------------------------------------------------------------------- workdir files


def _check_workdir(
    config: ml_collections.ConfigDict, workdir: pathlib.Path, *, write: bool = True
) -> None:
    """Refuses a workdir holding checkpoints of another config, or of more epochs than
    ``config.epochs``; records this config (with ``write``: the process that writes). A key
    missing from the saved config (the run predates it) matches the key's default."""
    path = workdir / CONFIG_FILE
    if path.is_file() and runs.has_checkpoint(workdir / CHECKPOINT_DIR):
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); use a fresh workdir") from error
        # A key the saved config predates (added to the schema since) ran as its default.
        defaults = runs.flatten_config(runs.config_to_dict(runs.default_config()))
        diff = {
            key: (a, b)
            for key, (a, b) in runs.config_diff(old, config).items()
            if key not in runs.RESUMABLE_KEYS
            and not (a == "<missing>" and key in defaults and b == defaults[key])
        }
        if diff:
            lines = "; ".join(f"{k}: {a!r} (saved) != {b!r} (now)" for k, (a, b) in diff.items())
            raise ValueError(
                f"workdir {workdir} holds checkpoints of a different config; differing keys: "
                f"{lines}. Use another workdir, or delete {workdir} to start over "
                f"(keys that may change on resume: {', '.join(runs.RESUMABLE_KEYS)})"
            )
        _check_epochs(config, workdir, _epochs_done(workdir))
    if write:
        path.write_text(json.dumps(runs.config_to_dict(config), indent=2, sort_keys=True) + "\n")


def _epochs_done(workdir: pathlib.Path) -> int | None:
    """The epochs the latest checkpoint completed, read from ``metrics.jsonl`` (no checkpoint
    is opened): the last epoch record at or before the latest checkpoint's step."""
    steps = [int(p.name) for p in (workdir / CHECKPOINT_DIR).glob("[0-9]*") if p.name.isdigit()]
    if not steps:
        return None
    epochs = [
        r["epoch"]
        for r in _read_metrics(workdir / METRICS_FILE, quiet=True)
        if r.get("kind") == "epoch" and r.get("step", math.inf) <= max(steps)
    ]
    return max(epochs, default=None)


def _check_epochs(config, workdir: pathlib.Path, done: int | None) -> None:
    if done is not None and config.epochs < done:
        raise ValueError(
            f"epochs={config.epochs} is below the {done} epochs the checkpoint in {workdir} "
            f"already completed; allowed: epochs >= {done} ({done} only re-summarises), or "
            "another workdir"
        )


def _read_metrics(path: pathlib.Path, *, quiet: bool = False) -> list[dict[str, Any]]:
    """Every valid record of ``metrics.jsonl``. A damaged line is dropped with a warning naming
    it (later lines are kept); a last line cut short (a run killed while writing it, no final
    newline) is dropped with an info message only."""
    if not path.is_file():
        return []
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    records, damaged = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif number == len(lines) and not text.endswith("\n"):
            if not quiet:
                logger.info("%s: dropped its last line %d, cut short", path, number)
        else:
            damaged.append(number)
    if damaged and not quiet:
        logger.warning(
            "%s: dropped %d damaged line(s): %s (the other records are kept)",
            path,
            len(damaged),
            ", ".join(map(str, damaged)),
        )
    return records


def _truncate_metrics(path: pathlib.Path, step: int) -> list[dict[str, Any]]:
    """Drops records logged after ``step`` (the checkpoint a resumed run restarts from) and
    damaged lines; rewrites the file in one replace."""
    records = [r for r in _read_metrics(path) if r.get("step", 0) <= step]
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(temporary, path)
    return records


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if isinstance(value, np.ndarray | jax.Array):
        return _json_ready(np.asarray(value).tolist())
    return value


def _write_curves(
    records: list[dict[str, Any]], path: pathlib.Path, title: str, metric: str = "accuracy"
) -> None:
    """Loss and the task score (``metric``) per epoch, and learned per-layer bits when they
    changed."""
    from matplotlib.figure import Figure

    epochs = [r for r in records if r.get("kind") == "epoch"]
    if not epochs:
        return
    bits = [r["layer_bits"] for r in epochs if r.get("layer_bits")]
    learned = len(bits) > 1 and any(b != bits[0] for b in bits)
    fig = Figure(figsize=(12 if learned else 8, 3.5), layout="constrained")
    axes = fig.subplots(1, 3 if learned else 2)
    x = [r["epoch"] for r in epochs]
    axes[0].plot(x, [r["train_loss"] for r in epochs], label="train")
    test = [r for r in epochs if "test_loss" in r]
    axes[0].plot([r["epoch"] for r in test], [r["test_loss"] for r in test], label="test")
    axes[0].set(xlabel="epoch", ylabel="loss", yscale="log", title=title)
    axes[1].plot(x, [r[f"train_{metric}"] for r in epochs], label="train")
    axes[1].plot([r["epoch"] for r in test], [r[f"test_{metric}"] for r in test], label="test")
    axes[1].set(xlabel="epoch", ylabel=metric)
    for ax in axes[:2]:
        ax.legend()
        ax.grid(alpha=0.3)
    if learned:
        with_bits = [r for r in epochs if r.get("layer_bits")]
        for name in with_bits[-1]["layer_bits"]:
            axes[2].plot(
                [r["epoch"] for r in with_bits],
                [r["layer_bits"].get(name, [math.nan])[0] for r in with_bits],
                label=name,
            )
        axes[2].set(xlabel="epoch", ylabel="weight bits")
        axes[2].legend(fontsize="x-small")
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------- the loop


class _Logger:
    """Collects per-step metrics on device; checks, averages and writes them in windows."""

    def __init__(
        self,
        path: pathlib.Path | None,
        every: int,
        schedule,
        last_saved: int | None,
        metric: str = "accuracy",
        events=None,
    ):
        self.path = path  # None: another process writes metrics.jsonl
        self.events = events  # a TensorBoard EventWriter, or None
        self.metric = metric  # the task's score ("accuracy", "psnr")
        self.last_saved = last_saved  # the step of the latest checkpoint, None before one
        self.every = every
        self.schedule = schedule
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []
        self.window: list[dict[str, float]] = []
        self.epoch_rows: list[dict[str, float]] = []
        self.latest: dict[str, float] = {}

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self.pending.append((step, metrics))

    def flush(self, epoch: int) -> None:
        """Fetches pending metrics; raises NonFiniteLossError naming the first bad step."""
        if not self.pending:
            return
        steps = [s for s, _ in self.pending]
        values = jax.device_get([m for _, m in self.pending])
        self.pending = []
        with self.path.open("a") if self.path else contextlib.nullcontext() as f:
            for step, row in zip(steps, values, strict=True):
                row = {k: float(v) for k, v in row.items()}
                if not math.isfinite(row["loss"]):
                    raise NonFiniteLossError(
                        f"the training loss became {row['loss']} at step {step} (epoch "
                        f"{epoch + 1}); training stopped and {_kept(self.last_saved)}"
                    )
                self.window.append(row)
                self.epoch_rows.append(row)
                self.latest = row
                if step % self.every == 0:
                    if f is not None:
                        record = self._record(step, epoch, self.window)
                        f.write(json.dumps(record) + "\n")
                        _write_events(self.events, record)
                    self.window = []

    def _record(self, step: int, epoch: int, rows: list[dict[str, float]]) -> dict[str, Any]:
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        return {
            "kind": "step",
            "step": step,
            "epoch": epoch + 1,
            "train_loss": mean.pop("loss"),
            f"train_{self.metric}": mean.pop(self.metric),
            **{f"train_{k}": v for k, v in mean.items()},
            "learning_rate": float(self.schedule(step - 1)),
        }

    def end_epoch(self) -> dict[str, float]:
        rows, self.epoch_rows, self.window = self.epoch_rows, [], []
        return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


PROFILE_DIR = "profile"
EVENTS_DIR = "tensorboard"


def _write_events(events, record: dict[str, Any], model: nnx.Module | None = None) -> None:
    """A metrics.jsonl record as TensorBoard scalars (``train/…``, ``test/…`` and, per layer,
    ``bits/<layer>/{weight,act}``), and histograms of ``model``'s quantizer parameters."""
    if events is None:
        return
    step, kind = int(record["step"]), record["kind"]
    scalars = {}
    for key, value in record.items():
        if key in ("kind", "step", "epoch") or not isinstance(value, (int, float)):
            continue
        group, _, name = key.partition("_")
        if group in ("train", "test", "blended") and name:
            scalars[f"{kind}/{group}/{name}"] = value
        else:
            scalars[f"{kind}/{key}"] = value
    for layer, bits in (record.get("layer_bits") or {}).items():
        scalars[f"bits/{layer}/weight"], scalars[f"bits/{layer}/act"] = bits
    events.scalars(step, scalars)
    if model is not None:
        from qflax import layers as ql

        for path, value in nnx.to_flat_state(nnx.state(model, ql.QuantParam)):
            events.histogram(step, "quant/" + "/".join(map(str, path)), np.asarray(value[...]))
    events.flush()


class _Profile:
    """A ``jax.profiler`` trace of the steps after ``settings.start_step`` (``num_steps`` of
    them; nothing with 0) into ``directory``."""

    def __init__(self, settings, directory: pathlib.Path):
        self.start = int(settings.start_step)
        self.stop_at = self.start + int(settings.num_steps)
        self.directory = directory
        self.running = False

    def before(self, step: int) -> None:
        if step == self.start and self.stop_at > self.start and not self.running:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.running = True
            logger.info("profiling steps %d..%d into %s", step + 1, self.stop_at, self.directory)

    def after(self, step: int, state: Any) -> None:
        if self.running and step >= self.stop_at:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        if self.running:
            jax.profiler.stop_trace()
            self.running = False


def _kept(last_saved: int | None) -> str:
    if last_saved is None:
        return "no checkpoint was saved yet"
    return f"the last good checkpoint (step {last_saved}) is kept"


def _all_finite(tree: Any) -> bool:
    tree = parallel.addressable(tree)  # every process calls this (a collective on several)
    leaves = [x for x in jax.tree.leaves(tree) if np.issubdtype(x.dtype, np.floating)]
    return bool(all(np.isfinite(np.asarray(x)).all() for x in leaves))


def _layer_bits(model: nnx.Module) -> dict[str, list[float]] | None:
    """Per-layer ``[weight_bits, act_bits]`` of a model with learnable quantizer parameters."""
    from qflax import layers as ql

    if not jax.tree.leaves(nnx.state(model, ql.QuantParam)):
        return None
    return {
        r["path"]: [float(r["weight_bits"]), float(r["act_bits"])]
        for r in ql.layer_summaries(model)
    }


def _quant_layers(model: nnx.Module) -> list:
    from qflax.layers import is_quant_layer

    return [node for _, node in nnx.iter_graph(model) if is_quant_layer(node)]


def _set_schedules(graphdef, state: TrainState, config, epoch: int, place) -> TrainState:
    """``state`` with every quant layer's annealed quantizer state set for ``epoch`` (0-based)
    by its family's schedule (DBSSQ's ε, an annealed pair μ, a relaxed pair's ``hard`` flag).
    ``epoch = config.epochs`` is the exact model training ends with (ε = 0; sign forward).
    ``place``: puts the new state where the steps expect it (:meth:`Trainer.place`: the
    jitted steps compile once per placement of their arguments; eager values set between steps
    would otherwise be uncommitted, or unsharded on a mesh)."""
    model = nnx.merge(graphdef, state.params, state.rest)
    done = {}
    for layer in _quant_layers(model):
        done.update(
            layer.apply_schedule(epoch=epoch, epochs=int(config.epochs), anneal=config.anneal)
        )
    if not done:
        return state
    _, _, rest = split_model(model)
    return place(state.replace(rest=rest))


def _ends_exact(model: nnx.Module) -> bool:
    """Whether training ends by switching to an exact quantizer (DBSSQ ε = 0, a relaxed pair's
    sign forward), evaluated after the relaxed one."""
    return any(layer.ends_exact() for layer in _quant_layers(model))


class EarlyStopping:
    """Stop after ``patience`` updates in a row without a value below the best so far.

    ``patience=0`` never stops.

    >>> stopper = EarlyStopping(2)
    >>> [stopper.update(v) for v in (3.0, 2.0, 2.5, 2.0, 1.0, 1.5, 1.2)]
    [False, False, False, True, False, False, True]
    """

    def __init__(self, patience: int):
        self.patience = int(patience)
        self.best = math.inf
        self.stale = 0

    def update(self, value: float) -> bool:
        """Records ``value``; True when training should stop."""
        if value < self.best:
            self.best, self.stale = value, 0
        else:
            self.stale += 1
        return bool(self.patience) and self.stale >= self.patience


def _within_target(learned: dict[str, dict[str, Any]]) -> bool:
    """Whether every learned integer bit-width is at or below its target."""
    return bool(learned) and all(
        used <= row["target"][role]
        for row in learned.values()
        for role, used in row["used"].items()
    )


def _progress_bar(config, total: int, initial: int, name: str):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=name,
        unit="step",
        dynamic_ncols=True,
        disable=not config.progress_bar or not parallel.is_main(),
        leave=True,
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike
) -> tuple[TrainState, dict[str, Any]]:
    """Trains and evaluates the model of ``config``, writing everything under ``workdir``.

    Rerun with the same ``workdir`` it resumes from the latest checkpoint (the same config is
    required, except the keys in ``RESUMABLE_KEYS`` such as ``epochs``); a run that already
    finished is only re-summarised. With ``teacher.mode="train"`` the float model is trained
    first in ``workdir/teacher`` and then distilled into this one.

    Files: ``config.json``, ``metrics.jsonl`` (``kind`` "step": window means every
    ``log_every_steps``; ``kind`` "epoch": epoch means and test metrics), ``checkpoints/``,
    ``summary.json`` (see :func:`_summary.summarize_model` for the size fields, plus
    ``test_accuracy`` — ``test_psnr`` for autoencoders —, ``test_loss``, ``fp_test_accuracy``
    with a teacher, ``wall_seconds``, and for models with quantized latent codes ``latent`` and
    its headline fields: see :func:`_latent_report`),
    ``curves.png``, and ``quantization.txt`` (which rule matched which layer).

    Models with learned bit-widths (recipe ``gdnsq``) train with the exterior-point penalty
    (config group ``penalty``). After each evaluation the integer bit-width each layer actually
    uses is compared with its target; once all are within target the run is *converged*: the
    learning rates decay by ``penalty.lr_decay`` per step and, with ``penalty.patience > 0``,
    training stops after that many epochs without a lower training loss. ``summary.json`` then
    also holds ``converged``, ``converged_epoch``, ``stopped_epoch`` and ``learned_bits``.

    Args:
      config: a training config (see :func:`default_config`); validated first, unless it
        passed :func:`validate_config` already and has not changed since.
      workdir: the run's directory (created when missing).

    Returns:
      ``(state, summary)``: the final :class:`TrainState` and the ``summary.json`` dict.

    Raises:
      ValueError: a bad config; a workdir that is empty (``""``), a file, not writable, a
        non-empty folder holding no qflax run, or holding checkpoints of a different config or
        of more epochs than ``config.epochs`` (all before anything is written); a corrupt
        checkpoint (before any training step).
      DirInUseError: (a ValueError) another run holds the workdir's lock (``workdir/.lock``;
        one writer per workdir, the teacher's run in ``workdir/teacher`` takes its own); names
        its pid, host and start time.
      NonFiniteLossError: the loss became NaN or infinite (names the step); the last good
        checkpoint stays in place.
    """
    start_time = time.perf_counter()
    runs.ensure_valid(config)
    parallel.initialize(config.distributed)  # several processes: before any device is used
    parallel.check_spans_processes(config.mesh)  # before anything is written
    workdir = runs.check_output_dir(workdir)
    runs.check_run_dir(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # Several processes share the workdir: process 0 holds its lock and writes its files.
    with runs.lock_dir(workdir) if parallel.is_main() else contextlib.nullcontext():
        return _train_and_evaluate(config, workdir, start_time)


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: pathlib.Path, start_time: float
) -> tuple[TrainState, dict[str, Any]]:
    """:func:`train_and_evaluate` once the workdir is checked and locked."""
    dataset = runs.load_dataset(config)
    if config.augment_shift and dataset.kind != "image":
        raise ValueError(
            f"augment_shift={config.augment_shift} needs an image dataset; {config.dataset!r} is "
            f"{dataset.kind}; allowed: augment_shift=0"
        )
    if config.augment_shift and config.augment_shift >= min(dataset.train_x.shape[1:3]):
        height, width = dataset.train_x.shape[1:3]
        raise ValueError(
            f"augment_shift={config.augment_shift} would shift {config.dataset!r}'s {height}x"
            f"{width} images out of the frame; allowed: 0..{min(height, width) - 1}"
        )
    steps_per_epoch = len(dataset.train_x) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size={config.batch_size} is larger than the training split of "
            f"{config.dataset!r} ({len(dataset.train_x)} examples); "
            f"allowed: 1..{len(dataset.train_x)}"
        )
    if config.teacher.init_student and config.teacher.mode == "none":
        raise ValueError(
            "teacher.init_student=True needs a teacher; allowed: teacher.mode 'train' or "
            "'checkpoint', or init_student=False"
        )
    model, report = build_model(config, dataset)
    task = model_task(model)
    metric = task.metric
    if task.name != "classify" and config.teacher.mode != "none":
        raise ValueError(
            f"teacher.mode={config.teacher.mode!r} distils logits; model {config.model!r} is "
            f"trained to {task.name}; allowed: teacher.mode='none'"
        )
    main = parallel.is_main()  # the process that writes the workdir's files
    _check_workdir(config, workdir, write=main)  # every check above passed: now files are written
    parallel.sync("qflax-workdir-checked")

    teacher_model, fp_test_accuracy, teacher_wall = None, None, 0.0
    if config.teacher.mode == "train":
        _, teacher_summary = train_and_evaluate(runs.teacher_config(config), workdir / TEACHER_DIR)
        teacher_model, _, _ = load_model(workdir / TEACHER_DIR)
        fp_test_accuracy = teacher_summary["test_accuracy"]
        teacher_wall = teacher_summary["wall_seconds"]
    elif config.teacher.mode == "checkpoint":
        teacher_model, _, _ = load_model(config.teacher.path)
        teacher_summary_path = pathlib.Path(config.teacher.path) / SUMMARY_FILE
        if teacher_summary_path.is_file():
            fp_test_accuracy = json.loads(teacher_summary_path.read_text())["test_accuracy"]
    if config.teacher.init_student:
        # Fine-tuning: the student starts from the teacher's weights (then is quantized), in
        # arrays of its own: the train step donates the student and the teacher state, and a
        # float student would otherwise hand it the same buffers twice.
        student = nnx.clone(teacher_model)
        nnx.update(student, jax.tree.map(lambda a: a.copy(), nnx.state(student)))
        model, report = quantize_for_config(config, student, dataset)
    if report is not None and main:
        (workdir / QUANTIZATION_FILE).write_text(report + "\n")

    trainer = build_trainer(
        config, model, dataset=dataset, teacher=teacher_model, steps_per_epoch=steps_per_epoch
    )
    graphdef, state, penalty = trainer.graphdef, trainer.state, trainer.penalty
    train_step, eval_step = trainer.train_step, trainer.eval_step
    if teacher_model is not None and fp_test_accuracy is None:
        tgraphdef, tparams, trest = split_model(teacher_model)
        fp_test_accuracy = _evaluate_arrays(
            make_eval_step(tgraphdef),
            tparams,
            trest,
            dataset.test_x,
            dataset.test_y,
            config.eval_batch_size,
        )["accuracy"]

    manager = runs.checkpoint_manager(
        workdir / CHECKPOINT_DIR, max_to_keep=config.checkpoint.max_to_keep
    )
    metrics_path = workdir / METRICS_FILE
    start_epoch, previous_wall = 0, 0.0
    state, meta, latest = _checkpoint.restore_latest_good(manager, state)
    state = trainer.place(state)
    if latest is not None:
        start_epoch, previous_wall = int(meta["epoch"]), float(meta.get("wall_seconds", 0.0))
        if start_epoch > config.epochs:  # metrics.jsonl did not tell (_check_workdir)
            manager.close()
            _check_epochs(config, workdir, start_epoch)
        if main:
            records = _truncate_metrics(metrics_path, latest)
        else:  # the records process 0 keeps (it truncates the file in one replace)
            records = [r for r in _read_metrics(metrics_path, quiet=True) if r["step"] <= latest]
        logger.info("resuming %s from step %d (epoch %d)", workdir, latest, start_epoch)
    else:
        if main:
            metrics_path.write_text("")
        records = []

    schedule, _ = learning_rate_schedules(config, steps_per_epoch)
    events = runs.EventWriter(workdir / EVENTS_DIR) if main and config.tensorboard else None
    log = _Logger(
        metrics_path if main else None, config.log_every_steps, schedule, latest, metric, events
    )
    total_steps = config.epochs * steps_per_epoch
    step = int(jax.device_get(state.step))

    def test_metrics(state: TrainState) -> dict[str, float]:
        return _evaluate_arrays(
            eval_step,
            state.params,
            state.rest,
            dataset.test_x,
            dataset.test_y,
            config.eval_batch_size,
            metric,
            multiple=parallel.shard_count(trainer.mesh),
            put=trainer.put_batch,
            shard=parallel.process_shard(),
        )

    def elapsed() -> float:
        return previous_wall + time.perf_counter() - start_time

    def save(epoch: int) -> None:
        if not _all_finite(state.params):
            raise NonFiniteLossError(
                f"the parameters became NaN or infinite by step {step} (epoch {epoch}); "
                f"training stopped and {_kept(log.last_saved)}"
            )
        log.last_saved = _checkpoint.save_checkpoint(
            manager, state, {"epoch": epoch, "step": step, "wall_seconds": elapsed()}
        )

    from qflax import data

    bar = _progress_bar(config, total_steps, min(step, total_steps), workdir.name or "train")
    test = None
    converged_epoch = next(
        (r["epoch"] for r in records if r.get("kind") == "epoch" and r.get("converged")), None
    )
    stopped_epoch = None
    blended_accuracy = None
    profile = _Profile(config.profile, workdir / PROFILE_DIR)
    # Early stopping restarts counting when a run is resumed.
    early_stop = EarlyStopping(config.penalty.patience)
    try:
        for epoch in range(start_epoch, config.epochs):
            bar.set_description(f"{workdir.name} epoch {epoch + 1}/{config.epochs}")
            state = _set_schedules(graphdef, state, config, epoch, trainer.place)
            shift_rng = np.random.default_rng((config.seed, epoch, 1))
            for x, y in data.batches(
                dataset.train_x,
                dataset.train_y,
                config.batch_size,
                seed=config.seed,
                epoch=epoch,
                shard=parallel.process_shard(),  # several processes: this one's rows
            ):
                if config.augment_shift:
                    x = random_shift(
                        x, config.augment_shift, shift_rng, part=parallel.process_shard()
                    )
                profile.before(step)
                state, metrics = train_step(state, trainer.put_batch((x, y)))
                step += 1
                profile.after(step, state)
                log.add(step, metrics)
                bar.update(1)
                if step % config.log_every_steps == 0:
                    log.flush(epoch)
                    bar.set_postfix(_postfix(log.latest, test, metric))
            log.flush(epoch)
            train = log.end_epoch()
            record = {
                "kind": "epoch",
                "step": step,
                "epoch": epoch + 1,
                "train_loss": train.pop("loss"),
                f"train_{metric}": train.pop(metric),
                **{f"train_{k}": v for k, v in train.items()},
                "learning_rate": float(schedule(step - 1)),
                "wall_seconds": elapsed(),
            }
            last_epoch = epoch + 1 == config.epochs
            if (epoch + 1) % config.eval_every_epochs == 0 or last_epoch:
                test = test_metrics(state)
                record.update({"test_loss": test["loss"], f"test_{metric}": test[metric]})
            if last_epoch and _ends_exact(model):
                # DBSSQ / relaxed pairs: report the training-time (blended, relaxed) model, then
                # keep and evaluate the exact one (ε = 0; sign forward).
                record[f"blended_test_{metric}"] = test[metric]
                blended_accuracy = test[metric]
                state = _set_schedules(graphdef, state, config, config.epochs, trainer.place)
                test = test_metrics(state)
                record.update({"test_loss": test["loss"], f"test_{metric}": test[metric]})
            stop = False
            if report is not None:
                current = nnx.merge(graphdef, *parallel.addressable((state.params, state.rest)))
                bits = _layer_bits(current)
                if bits:
                    record["layer_bits"] = bits
                if penalty is not None:
                    within = _within_target(_learned_bits(current))
                    record["within_target"] = within
                    if within and converged_epoch is None:
                        converged_epoch = epoch + 1
                        state = trainer.place(state.replace(converged=jax.numpy.ones((), bool)))
                        logger.info("bit-widths within target at epoch %d", epoch + 1)
                    record["converged"] = converged_epoch is not None
                    if converged_epoch is not None:
                        stop = early_stop.update(record["train_loss"]) and not last_epoch
            if main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(_json_ready(record)) + "\n")
                _write_events(events, _json_ready(record), current if report else None)
            records.append(record)
            bar.set_postfix(_postfix(log.latest, test, metric))
            if (epoch + 1) % config.checkpoint.every_epochs == 0 or last_epoch or stop:
                save(epoch + 1)
            if stop:
                stopped_epoch = epoch + 1
                logger.info("early stop at epoch %d", stopped_epoch)
                break
    finally:
        if events is not None:
            events.close()
        profile.stop()
        bar.close()
        manager.close()

    final_model = nnx.merge(graphdef, *parallel.addressable((state.params, state.rest)))
    if test is None or stopped_epoch is not None:  # resumed a finished run, or stopped early
        test = test_metrics(state)
    summary = {
        f"test_{metric}": test[metric],
        "test_loss": test["loss"],
        **({"fp_test_accuracy": fp_test_accuracy} if fp_test_accuracy is not None else {}),
        **({f"blended_test_{metric}": blended_accuracy} if blended_accuracy is not None else {}),
        "dataset": config.dataset,
        "model": config.model,
        "recipe": config.quant.recipe,
        "epochs": config.epochs,
        "steps": step,
        **_summary.summarize_model(final_model, dataset.test_x[:1]),
        **(_bits_summary(final_model, converged_epoch, stopped_epoch) if penalty else {}),
        **_latent_report(final_model, dataset.test_x, config.eval_batch_size),
        **_quantizer_reports(final_model, workdir),
        "teacher_wall_seconds": teacher_wall,
        "wall_seconds": elapsed(),  # includes training the teacher in this job
    }
    summary = _json_ready(summary)
    if main:
        (workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        _write_curves(records, workdir / CURVES_FILE, f"{config.model} on {config.dataset}", metric)
    parallel.sync("qflax-run-written")  # no process returns before the files are there
    return state, summary


def _quantizer_reports(model: nnx.Module, workdir: pathlib.Path) -> dict[str, Any]:
    """What the families' reporters say about the quantizers in use (e.g. each pair's
    ProxConnect++ criterion under ``pair_criterion``, with its plot in ``workdir``)."""
    from qflax.studies import run_reports

    specs = [tq for layer in _quant_layers(model) for tq in (layer.recipe.weight, layer.recipe.act)]
    return run_reports(specs, workdir)


def _latent_report(model: nnx.Module, test_x: np.ndarray, batch_size: int) -> dict[str, Any]:
    """The latent codes of the test split (:func:`qflax.layers.latent_summaries`): ``latent``
    (one row per quantized latent) and, from the first, ``bits_per_vector``, ``utilisation``,
    ``usage``, ``perplexity``, ``bits_per_sample`` and ``bytes_per_sample`` at the top level."""
    from qflax.layers import latent_summaries

    rows = latent_summaries(model, test_x, batch_size=batch_size)
    if not rows:
        return {}
    keys = (
        "bits_per_vector",
        "utilisation",
        "usage",
        "perplexity",
        "bits_per_sample",
        "bytes_per_sample",
    )
    return {"latent": rows, **{k: rows[0][k] for k in keys if k in rows[0]}}


def _bits_summary(model: nnx.Module, converged_epoch, stopped_epoch) -> dict[str, Any]:
    learned = _learned_bits(model)
    return {
        "converged": converged_epoch is not None,
        "converged_epoch": converged_epoch,
        "stopped_epoch": stopped_epoch,
        "within_target": _within_target(learned),
        "learned_bits": learned,
    }


def _postfix(
    latest: dict[str, float], test: dict[str, float] | None, metric: str = "accuracy"
) -> dict[str, str]:
    short = "acc" if metric == "accuracy" else metric
    postfix = {}
    if latest:
        postfix = {"loss": f"{latest['loss']:.3f}", short: f"{latest[metric]:.3f}"}
        bits = [
            f"{k[0]} {latest[f'{k}_bits']:.2f}" for k in ("weight", "act") if f"{k}_bits" in latest
        ]
        if bits:  # learned bit-widths (means of the continuous widths)
            postfix["bits"] = " ".join(bits)
    if test is not None:
        postfix[f"test_{short}"] = f"{test[metric]:.3f}"
    return postfix
