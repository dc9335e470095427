"""The ``qflax`` command end to end: train (config file + overrides), eval, summary, errors."""

import json
import pathlib
import re
import subprocess
import sys

import pytest

from qflax import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
FP = str(REPO / "experiments" / "mnist5k" / "fp.py")
W4A4 = str(REPO / "experiments" / "mnist5k" / "w4a4.py")


def test_importing_the_cli_is_cheap():
    code = (
        "import sys, qflax.cli; heavy = [m for m in ('jax', 'flax', 'optax', 'orbax', "
        "'ml_collections', 'sklearn', 'matplotlib') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_parser_knows_every_subcommand():
    parser = cli.build_parser()
    args, extra = parser.parse_known_args(
        ["train", "--config", FP, "--config.epochs=2", "--workdir", "w"]
    )
    assert (args.command, args.config, args.workdir, extra) == (
        "train",
        FP,
        "w",
        ["--config.epochs=2"],
    )
    assert parser.parse_args(["eval", "--workdir", "w", "--integer"]).integer
    args, extra = parser.parse_known_args(
        ["ptq", "--workdir", "w", "--out", "o", "--config.calibration=mse"]
    )
    assert (args.command, args.workdir, args.out, extra) == (
        "ptq",
        "w",
        "o",
        ["--config.calibration=mse"],
    )
    assert parser.parse_args(["summary", "--workdir", "a", "--workdir", "b"]).workdir == ["a", "b"]
    assert parser.parse_args(["report"]).command == "report"


def test_split_config_overrides():
    assert cli.split_config_overrides(
        ["--config.epochs=2", "--config.dataset", "digits", "--config.optimizer.name=sgd"]
    ) == [("epochs", "2"), ("dataset", "digits"), ("optimizer.name", "sgd")]
    with pytest.raises(ValueError, match=r"unrecognised argument '--epochs=2'"):
        cli.split_config_overrides(["--epochs=2"])
    with pytest.raises(ValueError, match=r"--config.epochs has no value"):
        cli.split_config_overrides(["--config.epochs"])


def test_train_eval_summary_end_to_end(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    status = cli.main(
        [
            "train",
            "--config",
            FP,
            "--config.dataset=digits",
            "--config.epochs=2",
            "--config.progress_bar=false",
            "--workdir",
            workdir,
        ]
    )
    out = capsys.readouterr().out
    assert status == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert f"test_accuracy: {summary['test_accuracy']:.4f}" in out
    assert summary["test_accuracy"] > 0.5  # 8x8 digits, two epochs
    assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 2

    assert cli.main(["eval", "--workdir", workdir]) == 0
    out = capsys.readouterr().out
    evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert out.strip() == f"test_accuracy: {evaluation['test_accuracy']:.4f}"
    assert evaluation["test_accuracy"] == pytest.approx(summary["test_accuracy"])

    assert cli.main(["summary", "--workdir", workdir, "--workdir", workdir]) == 0
    out = capsys.readouterr().out
    for text in ("layer", "w bits", "a bits", "params", "packed KiB", "MBOPs", "sparsity"):
        assert text in out
    for layer in ("stem", "conv2", "dense", "head"):
        assert f"\n{layer} " in out
    assert "1.00x smaller" in out
    assert out.count("test_accuracy") >= 2 and "GBOPs" in out  # two tables, one comparison

    (tmp_path / "run" / "summary.json").unlink()  # as if interrupted: describe the checkpoint
    assert cli.main(["summary", "--workdir", workdir]) == 0
    out = capsys.readouterr().out
    assert "no summary.json yet; the checkpoint of step 22" in out and "\nconv2 " in out

    assert cli.main(["eval", "--workdir", workdir, "--integer"]) == 1
    err = capsys.readouterr().err
    assert "is a float run (quant.recipe='none')" in err and "qflax ptq --workdir" in err

    out_dir = tmp_path / "ptq"
    argv = ["ptq", "--workdir", workdir, "--out", str(out_dir), "--config.num_batches=2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads((out_dir / "summary.json").read_text())
    assert out.startswith(f"test_accuracy: {result['test_accuracy']:.4f}\n")
    assert f"integer_test_accuracy: {result['integer_test_accuracy']:.4f}" in out
    assert "W8A8 calibration: absmax" in out and "float32 (" in out
    assert result["differing_predictions"] == 0 and (out_dir / "packed").is_dir()


def test_eval_integer_of_a_w4a4_run(tmp_path, capsys):
    """The main job's recipe (learned_step W4A4, stem and head float) on digits, one epoch."""
    workdir = str(tmp_path / "w4a4")
    argv = ["train", "--config", f"{W4A4}:smoke", "--config.progress_bar=false"]
    assert cli.main([*argv, "--workdir", workdir]) == 0
    summary = json.loads((tmp_path / "w4a4" / "summary.json").read_text())
    capsys.readouterr()
    assert cli.main(["eval", "--workdir", workdir, "--integer"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads((tmp_path / "w4a4" / "eval.json").read_text())
    assert result["integer"] and result["test_examples"] == 359
    assert result["integer_layers"] >= 1 and result["float_layers"] == 2  # stem, head float
    assert lines[0] == f"test_accuracy: {result['test_accuracy']:.4f}"
    assert lines[1] == (
        f"fake_quant_test_accuracy: {result['fake_quant_test_accuracy']:.4f}  "
        f"differing_predictions: {result['differing_predictions']} of 359"
    )
    assert lines[2].startswith(f"model_bytes: {result['model_bytes']:,} packed vs ")
    # learned_step: the reference is the model itself, i.e. what `qflax eval` reports
    assert result["fake_quant_test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert result["differing_predictions"] == 0
    assert result["test_accuracy"] == result["fake_quant_test_accuracy"]
    assert result["float32_bytes"] > 2 * result["model_bytes"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.weight_bit=4", "unknown config key 'weight_bit'; did you mean 'weight_bits'"),
        ("--config.weight_bits=eight", "cannot be read as int"),
        ("--config.act_bits=16", "act_bits=16 is out of range; allowed: integers 2..8"),
        ("--config.calibration=kl", "calibration='kl' is not allowed; allowed: 'absmax'"),
    ],
)
def test_bad_ptq_input_is_one_clear_line(override, message, tmp_path, capsys):
    out = tmp_path / "out"
    status = cli.main(["ptq", "--workdir", str(tmp_path), "--out", str(out), override])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("qflax ptq: error: ") and message in err
    assert not out.exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.optimizer.learning_rat=0.1", "did you mean 'optimizer.learning_rate'"),
        ("--config.quant.weight_bits=0", "quant.weight_bits=0 is out of range"),
        ("--config.model=resnet21", "model='resnet21' is not allowed"),
        ("--config.dataset=mnist6k", "dataset='mnist6k' is not known"),
        ("--config.epochs=two", "cannot be read as int"),
    ],
)
def test_bad_train_input_is_one_clear_line(override, message, tmp_path, capsys):
    workdir = tmp_path / "run"
    status = cli.main(["train", "--config", FP, override, "--workdir", str(workdir)])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("qflax train: error: ") and message in err
    assert not workdir.exists()  # refused before any work


def test_eval_of_an_empty_workdir_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["eval", "--workdir", str(tmp_path)]) == 1
    assert "config.json does not exist" in capsys.readouterr().err


def test_eval_integer_refuses_a_run_that_keeps_every_layer_float(tmp_path, capsys):
    # absmax at 32 bits keeps every layer float: "integer": true would be a mislabel
    workdir = str(tmp_path / "w32a32")
    argv = ["train", "--config", f"{FP}:smoke", "--config.progress_bar=false"]
    bits = ["--config.quant.weight_bits=32", "--config.quant.act_bits=32"]
    assert cli.main([*argv, "--config.quant.recipe=absmax", *bits, "--workdir", workdir]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--workdir", workdir, "--integer"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "keeps every layer float" in err
    assert not (tmp_path / "w32a32" / "eval.json").exists()


@pytest.mark.parametrize(
    "source, message",
    [
        ("def get_config(:\n    pass\n", r"bad.py: SyntaxError at line 1: "),
        (
            "import not_a_module_qflax\n",
            r"bad.py: importing it raised ModuleNotFoundError: No module named "
            r"'not_a_module_qflax' \(line 1\)",
        ),
        (
            "def get_config():\n    raise KeyError('width')\n",
            r"bad.py: get_config\(\) raised KeyError: 'width' \(line 2\)",
        ),
    ],
)
def test_a_broken_config_file_is_one_line_naming_it(source, message, tmp_path, capsys):
    (tmp_path / "bad.py").write_text(source)
    argv = ["train", "--config", str(tmp_path / "bad.py"), "--workdir", str(tmp_path / "run")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qflax train: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("position", ["before", "after"])
def test_debug_also_prints_the_traceback(position, tmp_path, capsys):
    (tmp_path / "bad.py").write_text("def get_config():\n    raise KeyError('width')\n")
    argv = ["train", "--config", str(tmp_path / "bad.py"), "--workdir", str(tmp_path / "run")]
    argv = ["--debug", *argv] if position == "before" else [*argv, "--debug"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)") and "KeyError: 'width'" in err
    assert err.splitlines()[-1].startswith("qflax train: error: ")


def test_a_bad_workdir_or_out_is_one_line(tmp_path, capsys, monkeypatch):
    file = tmp_path / "file.txt"
    file.write_text("mine")
    cases = [
        (["train", "--config", f"{FP}:smoke", "--workdir", ""], "workdir='' is empty"),
        (
            ["train", "--config", f"{FP}:smoke", "--workdir", str(file)],
            "workdir='.*' is an existing",
        ),
        (["ptq", "--workdir", str(tmp_path), "--out", str(file)], "out='.*file.txt' is an exis"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(f"^qflax {argv[0]}: error: {message}", err), err
    assert file.read_text() == "mine"
    monkeypatch.setattr("os.access", lambda path, mode: False)
    argv = ["train", "--config", f"{FP}:smoke", "--workdir", str(tmp_path / "run")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run' is not writable (its parent" in err


def test_a_workdir_in_use_is_one_line_naming_the_holder(tmp_path, capsys):
    from qflax.runs import lock_dir

    argv = ["train", "--config", f"{FP}:smoke", "--workdir", str(tmp_path)]
    with lock_dir(tmp_path, command="qflax train --workdir elsewhere"):
        assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qflax train: error: workdir ")
    assert (
        "is in use by another qflax run: pid " in err and "(qflax train --workdir elsewhere)" in err
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"test_accuracy": ', r"summary.json is not valid JSON \(Expecting value"),
        ("[1, 2]", r"summary.json holds list; allowed: a JSON object"),
        (
            '{"test_accuracy": 0.5, "layers": []}',
            r"summary.json is incomplete: missing avg_weight_bits, avg_act_bits, params",
        ),
    ],
)
def test_summary_of_a_bad_summary_json_is_one_line(text, message, tmp_path, capsys):
    (tmp_path / "summary.json").write_text(text)
    assert cli.main(["summary", "--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err


@pytest.mark.parametrize(
    "error, message",
    [
        (PermissionError(13, "Permission denied", "runs/x"), "runs/x: permission denied$"),
        (
            RuntimeError("a bug"),
            r"unexpected RuntimeError: a bug \(rerun with --debug for the traceback\)$",
        ),
    ],
)
def test_other_errors_are_one_line_too(error, message, monkeypatch, capsys):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "_report", fail)
    assert cli.main(["report"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(f"^qflax report: error: {message}", err), err
