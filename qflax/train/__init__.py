"""Training: the optimizer, the jitted steps and the loop behind ``qflax train``.

``train_and_evaluate(config, workdir)`` is the whole job (what ``qflax train`` runs);
``evaluate(workdir)`` re-evaluates its latest checkpoint; ``build_trainer(config, model)`` builds
the optimizer, the train state and the jitted steps the way the loop does; the pieces
(``make_optimizer``, ``make_train_step``, ``TrainState``, ...) are importable for notebooks and
tests. The config schema and reading runs from disk live in :mod:`qflax.runs`; its main names
(``default_config``, ``validate_config``, ``load_config``, ``load_model``, ``build_model``,
``config_diff``, ...) are importable from here too.
"""

from qflax.runs import (
    DIVERGENCES,
    OPTIMIZERS,
    RESUMABLE_KEYS,
    SCHEDULES,
    TEACHER_MODES,
    CheckpointError,
    build_model,
    config_diff,
    default_config,
    load_config,
    load_model,
    validate_config,
)
from qflax.train._loop import NonFiniteLossError, evaluate, train_and_evaluate
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
    aux_loss,
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
from qflax.train._tasks import TASKS, Task, accuracy, model_task, psnr
from qflax.train._trainer import Trainer, build_trainer

__all__ = [
    "TASKS",
    "Task",
    "accuracy",
    "model_task",
    "psnr",
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
    "aux_loss",
    "Trainer",
    "build_model",
    "build_trainer",
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
