"""A run sharded FSDP over 8 forced CPU devices, killed with SIGKILL inside an epoch and rerun
with the same command, ends at the parameters of an uninterrupted run (here on one device, in
this process: the float equivalence tolerance, 1e-5)."""

import signal
import subprocess
import sys
import time

import numpy as np

from qflax.runs import load_config_file
from qflax.train import train_and_evaluate
from tests.parallel.test_equivalence import REPO, forced_devices_env
from tests.train.test_recovery import CONFIG, STEPS_PER_EPOCH, latest_step, model_leaves

MESH = "\n    config.mesh.fsdp = 8\n    config.epochs = 3\n    return config\n"


def test_a_sharded_run_killed_inside_an_epoch_resumes_to_the_uninterrupted_parameters(tmp_path):
    config_path = tmp_path / "mesh.py"
    config_path.write_text(CONFIG.replace("\n    return config\n", MESH))
    command = [sys.executable, "-m", "qflax.cli", "train", "--config", str(config_path)]
    command += ["--workdir", str(tmp_path / "killed")]
    env = forced_devices_env(8, optimized=False)  # like the in-process run it is compared to
    env["PYTHONPATH"] = str(REPO)
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while (latest_step(tmp_path / "killed") or 0) < STEPS_PER_EPOCH and process.poll() is None:
        assert time.monotonic() < deadline, "epoch 1 not saved in 300 s"
        time.sleep(0.002)
    time.sleep(0.05)  # inside epoch 2
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert latest_step(tmp_path / "killed") < 3 * STEPS_PER_EPOCH
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-2000:]

    config = load_config_file(str(config_path))
    config.mesh.fsdp = 1  # the uninterrupted run: one device
    train_and_evaluate(config, tmp_path / "once")
    (killed, meta_killed), (once, meta_once) = (
        model_leaves(tmp_path / "killed"),
        model_leaves(tmp_path / "once"),
    )
    assert meta_killed["step"] == meta_once["step"] == 3 * STEPS_PER_EPOCH
    for x, y in zip(killed, once, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)
