"""Done-when of the family registry: a quantizer family, a pair and a recipe defined entirely
outside the qflax package (tests/fixtures/) train through ``qflax train`` from a config file
that registers them, summarise, export, and meet ``qflax eval --integer`` with a refusal that
names the family and why — with no edit to qflax/."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from qflax import cli
from qflax.export import export_model, packed_model_bytes
from qflax.train import load_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "tests" / "fixtures" / "user_config.py")


def test_a_user_family_and_pair_train_summarise_export_and_evaluate(tmp_path, capsys):
    workdir = tmp_path / "user"
    assert cli.main(["train", "--config", CONFIG, "--workdir", str(workdir)]) == 0
    capsys.readouterr()
    summary = json.loads((workdir / "summary.json").read_text())
    config = json.loads((workdir / "config.json").read_text())
    # the run records the user's module, so later commands import it before building
    assert str(ROOT / "tests" / "fixtures" / "user_quantizers.py") in config["imports"]
    rows = {row["name"]: row for row in summary["layers"]}
    assert rows["conv2"]["recipe"] == "w:pair:tanh_sign1/channel a:pair:tanh_sign1"
    assert rows["dense"]["recipe"] == "w:clip_uniform3 a:clip_uniform4"
    assert rows["dense"]["weight_bits"] == 3 and rows["conv2"]["weight_bits"] == 1
    assert summary["test_accuracy"] > 0.3  # digits, one epoch: it learns
    # the pair run carries the ProxConnect++ criterion of the pair it trained, and its plot
    criterion = summary["pair_criterion"]["tanh_sign"]
    assert criterion["holds"] and criterion["backward"] == "tanh3"
    assert (workdir / criterion["plot"]).read_bytes()[:4] == b"\x89PNG"

    assert cli.main(["summary", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "\ndense " in out and "\nconv2 " in out and "x smaller" in out

    model, _, _ = load_model(workdir)
    tree = export_model(model)  # the family's own codes (a uniform QArray) and the pair's bits
    assert tree["dense"]["inner"]["kernel"].bits == 3
    assert tree["conv2"]["inner"]["kernel"].bits == 1
    assert packed_model_bytes(tree) < 4 * summary["params"]

    # a fresh process that never imported the user's module: eval imports it from config.json
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    run = [sys.executable, "-m", "qflax.cli", "eval", "--workdir", str(workdir)]
    out = subprocess.run(run, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert f"test_accuracy: {summary['test_accuracy']:.4f}" in out.stdout
    # the refusal of `eval --integer` (here, in this process: the fresh-process import is above)
    capsys.readouterr()
    assert cli.main(["eval", "--workdir", str(workdir), "--integer"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "family 'clip_uniform'" in err and "defines no integer lowering" in err
