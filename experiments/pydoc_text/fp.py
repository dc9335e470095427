"""Float character transformer on pydoc_text (CPython's help texts, 3,269 training windows of
128 characters, 103 symbols): the float baseline of the text tables.

A small ``char_transformer`` (width 64, 2 blocks, 4 heads, MLP 256; 113k parameters) so that a
run takes minutes on the 2-core CPU: Adam 3e-3, one epoch of warm-up and a cosine decay, batch
64 windows (8,192 characters), 4 epochs (204 steps). The metric is bits per character,
``test_loss / ln 2`` (``summary.json``'s ``test_loss`` is the mean cross-entropy in nats).

    qflax train --config experiments/pydoc_text/fp.py --workdir runs/pydoc-fp
    qflax train --config experiments/pydoc_text/fp.py:smoke --workdir /tmp/smoke   # seconds

Expected: see the FQT table in experiments/README.md.
"""

from qflax.train import default_config


def get_config(variant: str | None = None):
    """The float baseline; ``variant="smoke"``: 1 epoch of 32-character windows."""
    config = default_config()
    config.dataset = "pydoc_text"
    config.model = "char_transformer"
    config.model_kwargs.dim = 64
    config.model_kwargs.depth = 2
    config.model_kwargs.num_heads = 4
    config.model_kwargs.mlp_dim = 256
    config.epochs = 4
    config.batch_size = 64
    config.seed = 0
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 3e-3
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_epochs = 1.0
    config.log_every_steps = 10
    config.checkpoint.every_epochs = 2
    if variant == "smoke":
        config.dataset_kwargs.seq_len = 32
        config.epochs = 1
        config.optimizer.warmup_epochs = 0.0
    elif variant is not None:
        raise ValueError(f"variant={variant!r} is not known; allowed: 'smoke' or none")
    return config
