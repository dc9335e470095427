"""``build_trainer(config, model)``: the optimizer, the train state and the jitted steps of a
config, built the one way ``qflax train`` builds them (benchmarks and notebooks use it too)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx

from qflax import parallel, runs
from qflax.layers import is_quant_layer
from qflax.train._optimizer import learning_rate_schedules, make_optimizer
from qflax.train._steps import (
    PenaltySettings,
    TrainState,
    create_train_state,
    make_eval_step,
    make_train_step,
)

__all__ = ["Trainer", "build_trainer"]


@dataclasses.dataclass(frozen=True)
class Trainer:
    """What one training run steps: the model, the optimizer, the initial state and the steps."""

    # The model trained (quantized and calibrated; its graph is `graphdef`).
    model: nnx.Module
    # The student's graph (`split_model(model)[0]`) the steps merge the state into.
    graphdef: nnx.GraphDef
    # The optimizer of the config (`make_optimizer`).
    tx: optax.GradientTransformation
    # The initial train state (step 0, the optimizer initialised, the teacher's state if any).
    state: TrainState
    # `train_step(state, batch) -> (state, metrics)`, jitted with the state donated.
    train_step: Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]
    # `eval_step(params, rest, batch, weights) -> sums`, jitted.
    eval_step: Callable[..., dict[str, jax.Array]]
    # The bit-width penalty's settings when the model learns bit-widths, else None.
    penalty: PenaltySettings | None
    # True for the latent kernels of 1-bit layers when `quant.latent_clip > 0`, else None.
    latent_clip_mask: Any
    # Optimizer steps per epoch behind the schedules.
    steps_per_epoch: int
    # The distillation teacher (inference only), or None.
    teacher: nnx.Module | None = None
    # The device mesh of `config.mesh` (None: one device) and the train state's shardings on it.
    mesh: Any = None
    state_sharding: Any = None
    batch_sharding: Any = None

    def place(self, state: TrainState) -> TrainState:
        """``state`` on the trainer's devices: sharded as the steps expect on a mesh, else
        committed to the device its arrays are on (so the steps compile once)."""
        if self.state_sharding is not None:
            return jax.device_put(state, self.state_sharding)
        leaves = jax.tree.leaves(state)
        if not leaves:
            return state
        return jax.device_put(state, next(iter(leaves[0].devices())))

    def put_batch(self, batch: Any) -> Any:
        """A batch of host arrays on the trainer's devices: on a mesh, each device gets its rows
        of it; unchanged on one device. With several processes ``batch`` is this process's
        part of the global batch (``qflax.data.batches(shard=parallel.process_shard())``: the
        rows its devices hold), assembled into one global array."""
        if self.batch_sharding is None:
            return batch
        if jax.process_count() > 1:
            return jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), batch
            )
        return jax.device_put(batch, self.batch_sharding)


def build_trainer(
    config: ml_collections.ConfigDict,
    model: nnx.Module | None = None,
    *,
    dataset: Any = None,
    teacher: nnx.Module | None = None,
    steps_per_epoch: int | None = None,
) -> Trainer:
    """Builds the optimizer, the initial train state and the jitted steps of ``config``.

    This is how :func:`train_and_evaluate` builds them: ``make_optimizer`` (with the latent-clip
    mask of 1-bit layers when ``quant.latent_clip > 0``), ``create_train_state``, the penalty
    settings when the model learns bit-widths (GDNSQ), ``make_train_step`` with the teacher's
    distillation settings, and ``make_eval_step``. With a mesh (``config.mesh`` over more than
    one device: :mod:`qflax.parallel`) the state is sharded FSDP-style, batches over ``data ×
    fsdp``, and both steps are jitted with those shardings.

    Args:
      config: a training config; validated unless it was validated already
        (:func:`qflax.runs.ensure_valid`).
      model: the model to train (quantized and calibrated); None builds the config's model with
        :func:`qflax.runs.build_model` on ``dataset``.
      dataset: the dataset (:func:`qflax.runs.load_dataset` of the config when needed and None).
      teacher: a float model to distil from (``teacher.*`` settings of the config), or None.
      steps_per_epoch: optimizer steps per epoch; None: the training split's full batches.

    Returns:
      A :class:`Trainer`.
    """
    runs.ensure_valid(config)
    if model is None or steps_per_epoch is None:
        if dataset is None:
            dataset = runs.load_dataset(config)
        if model is None:
            model, _ = runs.build_model(config, dataset)
        if steps_per_epoch is None:
            steps_per_epoch = len(dataset.train_x) // config.batch_size
    params = nnx.state(model, nnx.Param)
    mask = _latent_clip_mask(model) if config.quant.latent_clip else None
    tx = make_optimizer(config, params, steps_per_epoch=steps_per_epoch, latent_clip_mask=mask)
    graphdef, state, teacher_graphdef = create_train_state(
        model, tx, seed=config.seed, teacher=teacher
    )
    penalty = _penalty_settings(config, model, steps_per_epoch)
    parallel.check_spans_processes(config.mesh)
    mesh = parallel.make_mesh(config.mesh)
    shardings = state_sharding = None
    if mesh is not None:
        pieces = parallel.shard_count(mesh)
        if config.batch_size % pieces:
            raise ValueError(
                f"batch_size={config.batch_size} does not split over mesh data × fsdp = "
                f"{pieces}; allowed: a multiple of {pieces}"
            )
        state_sharding = parallel.state_sharding(mesh, state)
        state = jax.device_put(state, state_sharding)
        shardings = (state_sharding, parallel.batch_sharding(mesh), parallel.replicated(mesh))
    train_step = make_train_step(
        graphdef,
        tx,
        teacher_graphdef=teacher_graphdef,
        divergence=config.teacher.divergence,
        distill_weight=float(config.teacher.weight),
        temperature=float(config.teacher.temperature),
        penalty=penalty,
        shardings=shardings,
    )
    return Trainer(
        model=model,
        graphdef=graphdef,
        tx=tx,
        state=state,
        train_step=train_step,
        eval_step=make_eval_step(graphdef, shardings),
        penalty=penalty,
        latent_clip_mask=mask,
        steps_per_epoch=steps_per_epoch,
        teacher=teacher,
        mesh=mesh,
        state_sharding=state_sharding,
        batch_sharding=None if mesh is None else parallel.batch_sharding(mesh),
    )


def _latent_clip_mask(model: nnx.Module) -> Any:
    """True for the kernels (``inner.kernel``) of quant layers with 1-bit weights."""
    binary = {
        path
        for path, node in nnx.iter_graph(model)
        if is_quant_layer(node) and node.recipe.weight is not None and node.recipe.weight.bits == 1
    }

    def is_latent(path, x) -> bool:
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        return len(keys) > 2 and keys[-2:] == ("inner", "kernel") and keys[:-2] in binary

    params = nnx.state(model, nnx.Param)
    return jax.tree_util.tree_map_with_path(
        is_latent, params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def _learned_bits(model: nnx.Module) -> dict[str, dict[str, Any]]:
    """Per layer with learned bit-widths: the integer bits used and the targets (eager)."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if is_quant_layer(node) and node.bit_widths():
            targets = {role: t for role, (_, t) in node.bit_widths().items()}
            out[".".join(map(str, path))] = {"used": node.used_bits(), "target": targets}
    return out


def _penalty_settings(config, model: nnx.Module, steps_per_epoch: int) -> PenaltySettings | None:
    """The train step's penalty settings when ``model`` learns bit-widths, else None."""
    if not _learned_bits(model):
        return None
    _, quant_schedule = learning_rate_schedules(config, steps_per_epoch)
    return PenaltySettings(
        lr_schedule=quant_schedule,
        warmup_steps=int(round(float(config.penalty.warmup_epochs) * steps_per_epoch)),
        power=float(config.penalty.power),
        lr_decay=float(config.penalty.lr_decay),
    )
