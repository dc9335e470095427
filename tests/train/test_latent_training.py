"""The latent-code experiments in the training loop (their done-when commands, shortened): an
autoencoder trained on the squared error plus VQ's auxiliary losses reports PSNR, bits and
utilisation; a split CNN reports its bytes per sample; `qflax eval` scores the autoencoder by
PSNR."""

import math

import pytest

from qflax import runs
from qflax.train import evaluate, train_and_evaluate
from tests.train.test_loop import read_metrics


def _experiment(name, variant, *overrides):
    config = runs.load_config_file(f"experiments/mnist5k/{name}.py:{variant}")
    base = [("dataset", "digits"), ("epochs", "2"), ("progress_bar", "false")]
    return runs.apply_overrides(config, base + list(overrides))


def test_vq_codec_trains_with_its_aux_loss_and_reports_psnr_bits_and_utilisation(tmp_path):
    config = _experiment("codec", "vq64", ("model_kwargs.channels", "(4, 8)"))
    _, summary = train_and_evaluate(config, tmp_path)
    assert "test_accuracy" not in summary and summary["test_psnr"] > 8.0
    assert summary["test_psnr"] == pytest.approx(
        -10 * math.log10(summary["test_loss"]), abs=3.0
    )  # mean of per-image PSNRs vs PSNR of the mean error: within a few dB
    assert summary["bits_per_vector"] == 6.0 and summary["bits_per_sample"] == 4 * 6.0
    assert 0 < summary["utilisation"] <= 1 and summary["bytes_per_sample"] == 3
    (row,) = summary["latent"]
    assert (row["family"], row["codebook_size"], row["vector_dim"]) == ("vq", 64, 4)
    epochs = [r for r in read_metrics(tmp_path) if r["kind"] == "epoch"]
    assert epochs[-1]["train_aux_loss"] > 0 and "test_psnr" in epochs[-1]
    assert epochs[-1]["train_psnr"] > 0
    result = evaluate(tmp_path)
    assert result["test_psnr"] == pytest.approx(summary["test_psnr"], rel=1e-6)


def test_split_cnn_reports_the_bytes_it_sends(tmp_path):
    config = _experiment("split", "bits2", ("model_kwargs.channels", "(4, 8)"))
    _, summary = train_and_evaluate(config, tmp_path)
    # digits: a 2x2x16 cut per image, 2-bit codes (16 bytes) plus float16 μ and σ
    assert summary["bytes_per_sample"] == 2 * 2 * 16 * 2 // 8 + 4
    assert summary["bits_per_vector"] == 2.0 and summary["test_accuracy"] > 0.3
