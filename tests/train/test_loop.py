"""train_and_evaluate end to end on tiny jobs: every model, quantized runs, resumption, the
workdir checks and lock, NaN stops, corrupt checkpoints, distillation and the summary contract."""

import json
import logging
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest

from qflax.runs import DirInUseError, config_to_dict, lock_dir
from qflax.train import (
    CheckpointError,
    NonFiniteLossError,
    default_config,
    evaluate,
    load_model,
    train_and_evaluate,
)
from qflax.train._loop import _read_metrics, _truncate_metrics, random_shift

# Tiny model knobs per registry name, sized for 8x8 digits (and 32-character text windows).
TINY = {
    "mlp": dict(hidden=(32, 32)),
    "cnn": dict(channels=(4, 8), hidden=16),
    "resnet20": dict(width=0.25, blocks_per_stage=1),
    "resnet18": dict(width=0.125),
    "vit": dict(patch=4, dim=16, depth=1, num_heads=2),
    "char_transformer": dict(dim=16, depth=1, num_heads=2),
}

# The summary.json fields DESIGN.md promises.
SUMMARY_FIELDS = (
    "test_accuracy",
    "avg_weight_bits",
    "avg_act_bits",
    "sparsity",
    "model_bytes",
    "bops",
    "layers",
    "wall_seconds",
)
LAYER_FIELDS = ("name", "weight_bits", "act_bits", "sparsity", "params")


def tiny_config(model="mlp", **overrides):
    config = default_config()
    config.dataset = "digits"
    config.model = model
    for key, value in TINY[model].items():
        config.model_kwargs[key] = value
    config.epochs = 1
    config.batch_size = 64
    config.eval_batch_size = 400
    config.log_every_steps = 10
    config.progress_bar = False
    if model == "char_transformer":
        config.dataset = "pydoc_text"
        config.dataset_kwargs.seq_len = 32
        config.batch_size = 256
        config.eval_batch_size = 512
    for key, value in overrides.items():
        group, _, leaf = key.rpartition("__")
        (config[group] if group else config)[leaf] = value
    return config


def read_metrics(workdir):
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").open()]


def param_leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


@pytest.mark.parametrize("model", list(TINY))
def test_every_model_trains(model, tmp_path):
    state, summary = train_and_evaluate(tiny_config(model), tmp_path)
    for field in SUMMARY_FIELDS:
        assert field in summary, field
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["avg_weight_bits"] == summary["avg_act_bits"] == 32.0  # float model
    assert summary["model_bytes"] == 4 * summary["params"]
    assert summary["bops"] == summary["macs"] * 32 * 32 > 0
    for row in summary["layers"]:
        for field in LAYER_FIELDS:
            assert field in row, field
    steps = [r for r in read_metrics(tmp_path) if r["kind"] == "step"]
    assert steps[-1]["train_loss"] < steps[0]["train_loss"]  # it learns
    for name in ("config.json", "summary.json", "curves.png", "metrics.jsonl"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert int(state.step) == summary["steps"] > 0


@pytest.mark.parametrize("recipe", ["absmax", "learned_step"])
def test_quantized_training_reports_bits_and_size(recipe, tmp_path):
    config = tiny_config("mlp", quant__recipe=recipe, epochs=2)
    _, summary = train_and_evaluate(config, tmp_path)
    bits = {row["name"]: (row["weight_bits"], row["act_bits"]) for row in summary["layers"]}
    assert bits == {"stem": (32, 32), "blocks.0": (4, 4), "head": (32, 32)}
    assert summary["avg_weight_bits"] == 4.0  # over the quantized layers
    assert 4 < summary["avg_weight_bits_all"] < 32  # stem and head stay float
    assert summary["model_bytes"] < 4 * summary["params"]
    rows = {row["name"]: row for row in summary["layers"]}
    quantized = rows["blocks.0"]
    assert quantized["packed_bytes"] < quantized["params"]  # 4-bit: about half a byte each
    assert (
        summary["model_bytes"]
        == 4 * (summary["params"] - quantized["params"]) + quantized["packed_bytes"]
    )
    assert summary["compression"] == pytest.approx(4 * summary["params"] / summary["model_bytes"])
    assert summary["bops"] < summary["macs"] * 32 * 32
    assert summary["test_accuracy"] > 0.2  # well above chance (0.1) after two epochs
    assert "blocks.0" in (tmp_path / "quantization.txt").read_text()
    assert evaluate(tmp_path)["test_accuracy"] == pytest.approx(summary["test_accuracy"])


GDNSQ = dict(quant__recipe="gdnsq", quant__weight_bits=2, quant__act_bits=2)


@pytest.mark.parametrize("recipe", [{}, GDNSQ], ids=["float", "gdnsq"])
def test_resuming_after_an_interruption_matches_an_uninterrupted_run(tmp_path, recipe):
    """Bit for bit, also a GDNSQ run: its penalty state, learning-rate scale and converged flag
    are saved with the optimizer state (they restarted from their initial values before)."""
    overrides = dict(epochs=2, optimizer__warmup_epochs=0.5, **recipe)  # cosine with warm-up
    reference, _ = train_and_evaluate(tiny_config(**overrides), tmp_path / "once")
    # Interrupted after epoch 1: the epoch-2 checkpoint and the summary never got written.
    shutil.copytree(tmp_path / "once", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / str(int(reference.step)))
    (tmp_path / "resumed" / "summary.json").unlink()
    resumed, _ = train_and_evaluate(tiny_config(**overrides), tmp_path / "resumed")
    for a, b in zip(param_leaves(reference), param_leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    loop = [(s.penalty, s.lr_scale, s.converged) for s in (reference, resumed)]
    for a, b in zip(*map(jax.tree.leaves, loop), strict=True):
        np.testing.assert_array_equal(a, b)
    if recipe:
        assert float(reference.penalty.t) > 0  # the penalty weight had grown
    # metrics.jsonl was cut back to the checkpoint, then continued: no duplicated steps
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed") if r["kind"] == "step"]
    assert steps == sorted(set(steps))
    assert steps == [r["step"] for r in read_metrics(tmp_path / "once") if r["kind"] == "step"]


def test_extending_a_finished_run_matches_training_longer(tmp_path):
    overrides = dict(optimizer__schedule="constant")
    reference, _ = train_and_evaluate(tiny_config(epochs=2, **overrides), tmp_path / "once")
    train_and_evaluate(tiny_config(epochs=1, **overrides), tmp_path / "twice")
    extended, summary = train_and_evaluate(tiny_config(epochs=2, **overrides), tmp_path / "twice")
    for a, b in zip(param_leaves(reference), param_leaves(extended), strict=True):
        np.testing.assert_array_equal(a, b)
    assert summary["epochs"] == 2
    # rerunning a finished run trains nothing and reports the same result
    again, summary_again = train_and_evaluate(
        tiny_config(epochs=2, **overrides), tmp_path / "twice"
    )
    assert int(again.step) == int(extended.step)
    assert summary_again["test_accuracy"] == summary["test_accuracy"]


def test_a_different_config_in_the_same_workdir_is_refused(tmp_path):
    train_and_evaluate(tiny_config(), tmp_path)
    lines = len(read_metrics(tmp_path))
    with pytest.raises(ValueError, match=r"differing keys: optimizer.learning_rate: 0.001"):
        train_and_evaluate(tiny_config(optimizer__learning_rate=0.01), tmp_path)
    with pytest.raises(ValueError, match=r"model_kwargs"):
        train_and_evaluate(tiny_config(model_kwargs__hidden=(16, 16)), tmp_path)
    assert len(read_metrics(tmp_path)) == lines  # nothing ran


def test_a_run_saved_before_a_key_existed_resumes_when_the_key_is_at_its_default(tmp_path):
    """config.json of a run from before `mesh` and `quant.relative_steps` existed: those keys
    ran as their defaults, so the run resumes; set otherwise, they are a different config."""
    train_and_evaluate(tiny_config(), tmp_path)
    path = tmp_path / "config.json"
    recorded = json.loads(path.read_text())
    del recorded["mesh"], recorded["quant"]["relative_steps"]
    path.write_text(json.dumps(recorded))
    with pytest.raises(ValueError, match=r"quant.relative_steps: '<missing>' \(saved\) != True"):
        train_and_evaluate(tiny_config(quant__relative_steps=True), tmp_path)
    state, _ = train_and_evaluate(tiny_config(epochs=2), tmp_path)
    assert int(state.step) == 2 * (1437 // 64)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    good = tiny_config(optimizer__name="sgd", optimizer__schedule="constant")
    state, _ = train_and_evaluate(good, tmp_path)
    good_step = int(state.step)
    # Blow up from the next step on: same workdir, the recorded config says lr=1e30 too.
    bad = tiny_config(
        optimizer__name="sgd", optimizer__schedule="constant", optimizer__learning_rate=1e30
    )
    bad.epochs = 2
    config_path = tmp_path / "config.json"
    recorded = json.loads(config_path.read_text())
    recorded["optimizer"]["learning_rate"] = 1e30
    config_path.write_text(json.dumps(recorded))
    kept = rf"the last good checkpoint \(step {good_step}\) is kept"
    with pytest.raises(NonFiniteLossError, match=rf"became (nan|inf) at step \d+.*{kept}") as info:
        train_and_evaluate(bad, tmp_path)
    step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    assert good_step < step <= good_step + 3
    model, _, meta = load_model(tmp_path)  # the last good checkpoint is intact
    assert meta["step"] == good_step
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(model))


def test_nan_from_the_first_steps_names_the_step(tmp_path):
    config = tiny_config(optimizer__name="sgd", optimizer__learning_rate=1e30)
    with pytest.raises(
        NonFiniteLossError, match=r"at step [1-9]\d* \(epoch 1\).* no checkpoint was saved yet$"
    ):
        train_and_evaluate(config, tmp_path)
    assert not list((tmp_path / "checkpoints").glob("[0-9]*"))


def test_a_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    state, _ = train_and_evaluate(tiny_config(), tmp_path)
    checkpoint = tmp_path / "checkpoints" / str(int(state.step))
    for path in (checkpoint / "model").rglob("*"):
        if path.is_file():
            path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"is corrupt or does not match this model"):
        train_and_evaluate(tiny_config(), tmp_path)
    with pytest.raises(ValueError, match=r"corrupt"):
        evaluate(tmp_path)


def test_teacher_is_trained_first_and_distilled(tmp_path):
    config = tiny_config(
        quant__recipe="absmax",
        teacher__mode="train",
        teacher__divergence="jeffreys",
        teacher__weight=0.5,
    )
    _, summary = train_and_evaluate(config, tmp_path)
    # each run locked its own workdir (no deadlock) and released it
    assert (tmp_path / ".lock").read_text() == (tmp_path / "teacher" / ".lock").read_text() == ""
    teacher_summary = json.loads((tmp_path / "teacher" / "summary.json").read_text())
    assert summary["fp_test_accuracy"] == teacher_summary["test_accuracy"]
    assert teacher_summary["avg_weight_bits"] == 32.0
    steps = [r for r in read_metrics(tmp_path) if r["kind"] == "step"]
    assert "train_divergence" in steps[0] and "train_cross_entropy" in steps[0]
    # A later run can distill from that float run's workdir.
    student = tiny_config(quant__recipe="absmax", teacher__mode="checkpoint")
    student.teacher.path = str(tmp_path / "teacher")
    _, summary2 = train_and_evaluate(student, tmp_path / "student")
    assert summary2["fp_test_accuracy"] == teacher_summary["test_accuracy"]


def test_epochs_below_those_done_are_refused_before_anything_is_written(tmp_path):
    train_and_evaluate(tiny_config(epochs=2), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    message = r"epochs=1 is below the 2 epochs the checkpoint in .* already completed"
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(tiny_config(epochs=1), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    # without metrics.jsonl the restored checkpoint still tells
    (tmp_path / "metrics.jsonl").unlink()
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(tiny_config(epochs=1), tmp_path)


def test_a_workdir_in_use_is_refused_before_any_work(tmp_path):
    with lock_dir(tmp_path, command="qflax train --workdir other"):
        with pytest.raises(DirInUseError, match=r"in use by .*\(qflax train --workdir other\)"):
            train_and_evaluate(tiny_config(), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]


def test_the_teacher_run_takes_its_own_lock(tmp_path):
    config = tiny_config(quant__recipe="absmax", teacher__mode="train")
    # as a start of this run left it: its config recorded, the teacher's run in use elsewhere
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(config)))
    (tmp_path / "teacher").mkdir()
    with lock_dir(tmp_path / "teacher"):
        with pytest.raises(DirInUseError, match=r"workdir '.*teacher' is in use"):
            train_and_evaluate(config, tmp_path)
    assert (tmp_path / ".lock").read_text() == ""  # the outer lock was released too


@pytest.mark.parametrize(
    "files",
    [{"config.json": '{"mine": 1}'}, {"notes.txt": "mine", "data.csv": "1,2"}],
)
def test_a_folder_holding_no_run_is_refused_and_left_alone(files, tmp_path):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=r"is not empty and holds no qflax run"):
        train_and_evaluate(tiny_config(), tmp_path)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == files


@pytest.mark.parametrize("workdir", ["", " "])
def test_an_empty_workdir_is_refused(workdir):
    with pytest.raises(ValueError, match=r"workdir='\s*' is empty"):
        train_and_evaluate(tiny_config(), workdir)


def test_damaged_metrics_lines_are_dropped_and_later_ones_kept(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    records = [{"kind": "step", "step": s} for s in (1, 2, 3, 4)]
    lines = [json.dumps(r) for r in records]
    path.write_text(f"{lines[0]}\n{{not json\n{lines[1]}\n7\n{lines[2]}\n{lines[3]}\n")
    with caplog.at_level(logging.INFO, logger="qflax.train"):
        assert _truncate_metrics(path, step=3) == records[:3]
    assert "dropped 2 damaged line(s): 2, 4 (the other records are kept)" in caplog.text
    assert path.read_text() == "".join(line + "\n" for line in lines[:3])
    # a last line cut short by a kill: dropped, logged at info level only
    caplog.clear()
    path.write_text(f"{lines[0]}\n{lines[1][:9]}")
    with caplog.at_level(logging.INFO, logger="qflax.train"):
        assert _read_metrics(path) == records[:1]
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "dropped its last line 2, cut short" in caplog.text


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(batch_size=5000), r"batch_size=5000 is larger than the training split"),
        (dict(model_kwargs__nonsense=3), r"model_kwargs=.* are not accepted by model 'mlp'"),
        (dict(quant__weight_bits=0), r"quant.weight_bits=0 is out of range"),
        (dict(dataset="mnist6k"), r"dataset='mnist6k' is not known"),
    ],
)
def test_bad_input_fails_before_training(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(tiny_config(**overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not list(
        (tmp_path / "checkpoints").glob("[0-9]*")
    )


def test_random_shift_translates_with_zero_fill():
    images = np.arange(2 * 5 * 5, dtype=np.float32).reshape(2, 5, 5, 1) + 1.0
    shifted = random_shift(images, 2, np.random.default_rng(0))
    again = random_shift(images, 2, np.random.default_rng(0))
    np.testing.assert_array_equal(shifted, again)  # determined by the generator
    for original, moved in zip(images, shifted, strict=True):
        found = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if np.array_equal(
                moved,
                np.roll(np.pad(original, ((2, 2), (2, 2), (0, 0))), (dy, dx), (0, 1))[2:-2, 2:-2],
            )
        ]
        assert len(found) == 1  # exactly one translation, zeros shifted in
    assert random_shift(images, 0, np.random.default_rng(0)).tolist() == images.tolist()


def test_augment_shift_needs_images(tmp_path):
    with pytest.raises(ValueError, match=r"augment_shift=1 needs an image dataset"):
        train_and_evaluate(tiny_config("char_transformer", augment_shift=1), tmp_path)


def test_augment_shift_must_leave_part_of_the_image(tmp_path):
    # digits are 8x8: a shift of 8 or more can move every pixel out of the frame
    with pytest.raises(ValueError, match=r"augment_shift=8 .* 8x8 images .* allowed: 0\.\.7"):
        train_and_evaluate(tiny_config("mlp", augment_shift=8), tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()  # refused before any file is written


def test_random_shift_of_a_part_is_that_part_of_the_whole_batch_shifted():
    """Each process shifts its rows of a global batch as one process shifts the whole."""
    from qflax.train._loop import random_shift

    images = np.random.default_rng(0).random((8, 6, 6, 1), dtype=np.float32)
    whole = random_shift(images, 2, np.random.default_rng(5))
    for i in range(4):
        part = random_shift(images[2 * i : 2 * i + 2], 2, np.random.default_rng(5), part=(i, 4))
        np.testing.assert_array_equal(part, whole[2 * i : 2 * i + 2])
