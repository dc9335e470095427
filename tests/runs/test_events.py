"""TensorBoard event files written without TensorFlow: the framing and checksums TensorBoard's
reader expects, and a run's scalars equal to its metrics.jsonl."""

import json

import numpy as np
import pytest

from qflax import cli
from qflax.runs import EventWriter, read_scalars
from qflax.runs._events import crc32c
from qflax.train import train_and_evaluate
from tests.train.test_loop import tiny_config


def test_crc32c_and_a_round_trip_with_checked_framing(tmp_path):
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0
    writer = EventWriter(tmp_path)
    writer.scalars(3, {"a/loss": 0.25, "b": 2, "skipped": "text", "flag": True})
    writer.scalars(4, {"a/loss": -1e30})
    writer.histogram(4, "h", np.arange(10.0))
    writer.histogram(5, "empty", np.zeros(0))  # nothing written
    writer.close()
    assert read_scalars(tmp_path) == {
        "a/loss": [(3, 0.25), (4, np.float32(-1e30))],
        "b": [(3, 2.0)],
    }
    path = next(tmp_path.glob("events.out.tfevents.*"))
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # inside the last record
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bad data checksum"):
        read_scalars(tmp_path)


def test_a_run_writes_its_metrics_as_tensorboard_scalars(tmp_path):
    config = tiny_config("cnn", quant__recipe="lsq", epochs=2, log_every_steps=5)
    train_and_evaluate(config, tmp_path)
    scalars = read_scalars(tmp_path / "tensorboard")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert scalars["step/train/loss"] == [
        (r["step"], pytest.approx(r["train_loss"], rel=1e-6)) for r in steps
    ]
    assert scalars["step/learning_rate"][-1][1] == pytest.approx(steps[-1]["learning_rate"])
    assert [s for s, _ in scalars["epoch/test/accuracy"]] == [r["step"] for r in epochs]
    assert scalars["epoch/test/accuracy"][-1][1] == pytest.approx(epochs[-1]["test_accuracy"])
    layer, (w, a) = next(iter(epochs[-1]["layer_bits"].items()))
    assert scalars[f"bits/{layer}/weight"][-1][1] == w and scalars[f"bits/{layer}/act"][-1][1] == a
    raw = b"".join(p.read_bytes() for p in (tmp_path / "tensorboard").iterdir())
    assert b"quant/" in raw  # histograms of the quantizer parameters


def test_tensorboard_false_writes_no_event_files(tmp_path, capsys):
    config_path = tmp_path / "c.py"
    config_path.write_text(
        "from tests.train.test_loop import tiny_config\n\n\n"
        "def get_config():\n    return tiny_config()\n"
    )
    args = ["train", "--config", str(config_path), "--workdir", str(tmp_path / "run")]
    assert cli.main([*args, "--tensorboard=false"]) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "summary.json").is_file()
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["tensorboard"] is False
