"""Training: the config schema, the optimizer, the jitted steps and the loop behind ``qflax train``.

``train_and_evaluate(config, workdir)`` is the whole job (what ``qflax train`` runs);
``evaluate(workdir)`` re-evaluates its latest checkpoint; the pieces (``make_optimizer``,
``make_train_step``, ``TrainState``, ...) are importable for notebooks and tests.
"""

from qflax.train._checkpoint import CheckpointError
from qflax.train._config import (
    DIVERGENCES,
    OPTIMIZERS,
    RESUMABLE_KEYS,
    SCHEDULES,
    TEACHER_MODES,
    config_diff,
    default_config,
    validate_config,
)
from qflax.train._loop import (
    NonFiniteLossError,
    build_model,
    evaluate,
    load_config,
    load_model,
    train_and_evaluate,
)
from qflax.train._optimizer import learning_rate_schedules, make_optimizer, param_labels
from qflax.train._penalty import (
    PENALTY_MARGIN,
    PenaltyState,
    bit_penalty,
    penalty_init,
    penalty_loss,
    violated_count,
    violated_share,
)
from qflax.train._steps import (
    TrainState,
    create_train_state,
    cross_entropy,
    distillation_divergence,
    jeffreys_divergence,
    kl_divergence,
    make_eval_step,
    make_train_step,
    split_model,
)
from qflax.train._summary import format_table, summarize_model

__all__ = [
    "PENALTY_MARGIN",
    "PenaltyState",
    "penalty_init",
    "bit_penalty",
    "violated_count",
    "violated_share",
    "penalty_loss",
    "DIVERGENCES",
    "OPTIMIZERS",
    "RESUMABLE_KEYS",
    "SCHEDULES",
    "TEACHER_MODES",
    "CheckpointError",
    "NonFiniteLossError",
    "TrainState",
    "build_model",
    "config_diff",
    "create_train_state",
    "cross_entropy",
    "default_config",
    "distillation_divergence",
    "evaluate",
    "format_table",
    "jeffreys_divergence",
    "kl_divergence",
    "learning_rate_schedules",
    "load_config",
    "load_model",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "param_labels",
    "split_model",
    "summarize_model",
    "train_and_evaluate",
    "validate_config",
]
