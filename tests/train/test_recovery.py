"""Recovering a run: killed with SIGKILL at random points and restarted, it ends bit for bit where
an uninterrupted run ends; a checkpoint damaged on disk is refused by ``eval`` and skipped by
``train``, which resumes from the previous good one and ends at the same parameters.

The soak test is bounded (a tiny MLP on digits, 2 kills in 5 short epochs, the last restart in the
test's own process: ~20 s on 2 busy cores) so it runs with the normal suite;
``QFLAX_SOAK_KILLS=N`` kills it N times instead.
"""

import logging
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from qflax import cli
from qflax.runs import load_config_file
from qflax.train import CheckpointError, evaluate, load_model, train_and_evaluate
from tests.train.test_loop import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[2]
# QFLAX_SOAK_KILLS=20 soaks longer (outside the suite); the suite's default keeps it ~20 s.
KILLS = int(os.environ.get("QFLAX_SOAK_KILLS", "2"))
# Kill targets are drawn from epochs 1..EPOCHS-3: the suite's 2 kills land after epochs 1 and 2,
# and every run still has epochs left to resume after its last kill.
EPOCHS = KILLS + 3
STEPS_PER_EPOCH = 11  # 1,437 digits / batch 128

CONFIG = f"""
from qflax.train import default_config


def get_config():
    config = default_config()
    config.dataset = "digits"
    config.model = "mlp"
    config.model_kwargs.hidden = (32, 32)
    config.epochs = {EPOCHS}
    config.batch_size = 128
    config.eval_batch_size = 400
    config.log_every_steps = 10
    config.progress_bar = False
    config.checkpoint.every_epochs = 1
    config.checkpoint.max_to_keep = 2
    return config
"""


def model_leaves(workdir):
    """Every array of the model in the latest checkpoint of ``workdir`` (params and the rest)."""
    model, _, meta = load_model(workdir)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))], meta


def assert_same_model(a, b):
    (leaves_a, meta_a), (leaves_b, meta_b) = model_leaves(a), model_leaves(b)
    assert meta_a["step"] == meta_b["step"]
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(x, y)


def latest_step(workdir):
    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return None
    return max((int(p.name) for p in directory.iterdir() if p.name.isdigit()), default=None)


def xor_largest_model_file(checkpoint):
    """XORs 50 bytes in the middle of the largest file of the checkpoint's model item."""
    files = [p for p in (checkpoint / "model").rglob("*") if p.is_file()]
    path = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 50):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_run_killed_at_random_points_ends_bit_for_bit_like_an_uninterrupted_one(tmp_path, capsys):
    config_path = tmp_path / "tiny.py"
    config_path.write_text(CONFIG)
    train_and_evaluate(load_config_file(str(config_path)), tmp_path / "once")

    workdir = tmp_path / "killed"
    command = [sys.executable, "-m", "qflax.cli", "train", "--config", str(config_path)]
    command += ["--workdir", str(workdir)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    # Kill points: soon after the checkpoint of a random epoch (seeded), a random fraction of
    # an epoch later: inside an epoch, in an evaluation or while writing the next checkpoint.
    rng = random.Random(0)
    targets = sorted(rng.sample(range(1, EPOCHS - 2), KILLS))
    for target in targets:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 120
        while (latest_step(workdir) or 0) < target * STEPS_PER_EPOCH and process.poll() is None:
            assert time.monotonic() < deadline, f"epoch {target} not saved in 120 s"
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.05))
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
        print(f"killed after target epoch {target}: latest checkpoint step {latest_step(workdir)}")
        assert latest_step(workdir) < EPOCHS * STEPS_PER_EPOCH  # killed before the end
    # The last restart runs `qflax train` in this process (it only reads the workdir the killed
    # processes left), sparing a third process start.
    assert cli.main(command[3:]) == 0, capsys.readouterr().err[-2000:]
    assert_same_model(tmp_path / "once", workdir)


def test_a_damaged_checkpoint_is_refused_by_eval_and_skipped_by_train(tmp_path, caplog, capsys):
    config = tiny_config(epochs=3, checkpoint__every_epochs=1, checkpoint__max_to_keep=3)
    train_and_evaluate(config, tmp_path / "once")
    workdir = tmp_path / "damaged"
    shutil.copytree(tmp_path / "once", workdir)
    last, previous = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())[-2:][::-1]
    xor_largest_model_file(workdir / "checkpoints" / str(last))

    item_changed = rf"\(step {last}\) is corrupt: its 'model' item does not match the sha256"
    with pytest.raises(CheckpointError, match=item_changed):
        evaluate(workdir)
    assert cli.main(["eval", "--workdir", str(workdir)]) == 1
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "`qflax train` with this workdir" in stderr
    assert (workdir / "checkpoints" / str(last)).is_dir()  # read-only commands move nothing

    with caplog.at_level(logging.WARNING, logger="qflax.train"):
        train_and_evaluate(config, workdir)
    assert f"cannot resume from step {last}" in caplog.text
    assert f"resuming from step {previous}, the newest good checkpoint" in caplog.text
    assert (workdir / "checkpoints" / f"corrupt-{last}").is_dir()  # set aside, not deleted
    assert_same_model(tmp_path / "once", workdir)


def test_train_stops_when_no_checkpoint_restores(tmp_path):
    config = tiny_config(epochs=2, checkpoint__every_epochs=1)
    train_and_evaluate(config, tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    for step in steps:
        xor_largest_model_file(tmp_path / "checkpoints" / str(step))
    tried = ", ".join(str(step) for step in reversed(steps))
    with pytest.raises(CheckpointError, match=rf"tried steps {tried}; nothing was moved"):
        train_and_evaluate(config, tmp_path)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == steps
