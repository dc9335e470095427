"""The main job's quantized run (``make run``: experiments/mnist5k/w4a4.py on the bundled
mnist5k) trains past the step where it once broke: with absolute Adam updates a dense channel's
learned step went negative at step ~95 and the run stopped (2026-12-05); the suite ran only
tiny configs and did not see it. Four epochs (124 steps) of the real config, evaluated once;
with ``quant.relative_steps=False`` this test fails with that error (checked 2026-12-06)."""

from qflax.runs import load_config_file
from qflax.train import train_and_evaluate


def test_the_main_w4a4_config_trains_past_step_100(tmp_path):
    config = load_config_file("experiments/mnist5k/w4a4.py")
    config.epochs = 4
    config.eval_every_epochs = 4
    config.checkpoint.every_epochs = 4
    config.progress_bar = False
    state, summary = train_and_evaluate(config, tmp_path)
    assert int(state.step) == 4 * (4000 // config.batch_size) > 100
    assert summary["test_accuracy"] > 0.9  # ~0.96 after 4 epochs
