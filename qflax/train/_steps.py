"""The train state, the losses, and the jitted train and eval steps.

The model's graph is split once (``nnx.split``) when the steps are made; the steps are pure
functions of a :class:`TrainState` (arrays only) that merge the graph back inside the trace.
Distillation follows Hinton et al. 2015 ("Distilling the Knowledge in a Neural Network", Sec. 2):
soften both distributions by a temperature ``T`` and scale the divergence by ``T^2``; the
Jeffreys variant ``KL(p_s || p_t) + KL(p_t || p_s)`` is the GDNSQ task loss (METHODS.md 3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qflax.layers import AuxLoss
from qflax.train._penalty import PenaltyState, penalty_init, penalty_loss, violated_share
from qflax.train._tasks import cross_entropy, model_task

__all__ = [
    "Batch",
    "PenaltySettings",
    "learned_bit_widths",
    "TrainState",
    "create_train_state",
    "cross_entropy",
    "distillation_divergence",
    "jeffreys_divergence",
    "kl_divergence",
    "make_eval_step",
    "make_train_step",
    "split_model",
]

Batch = tuple[jax.Array, jax.Array]  # (inputs, integer labels or next-token targets)


@flax.struct.dataclass
class TrainState:
    """Everything a training step changes, as a pytree of arrays (no graph, no Python state).

    Attributes:
      step: int32 scalar, optimizer steps taken.
      params: ``nnx.State`` of the model's ``nnx.Param`` s (weights and ``QuantParam`` s).
      rest: ``nnx.State`` of every other model variable (BatchNorm statistics, ``QuantStat`` s).
      opt_state: the optimizer state.
      rng: uint32 ``(2,)`` key data, split once per step (``jax.random.wrap_key_data``).
      teacher: the frozen teacher's whole ``nnx.State`` (None without distillation); it is
        donated and returned unchanged by every step.
      penalty: the bit-width penalty's :class:`~qflax.train.PenaltyState`.
      lr_scale: float32 scalar multiplying every update (1 until the bit-widths converge, then
        decaying by ``PenaltySettings.lr_decay`` per step).
      converged: bool scalar, set by the loop once every learned bit-width is within target.
    """

    step: jax.Array
    params: Any
    rest: Any
    opt_state: Any
    rng: jax.Array
    teacher: Any = None
    penalty: PenaltyState | None = None
    lr_scale: jax.Array | None = None
    converged: jax.Array | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PenaltySettings:
    """How the train step adds the exterior-point bit-width penalty (METHODS.md 3).

    Attributes:
      lr_schedule: the quantizer parameters' learning-rate schedule (the penalty weight grows by
        ``2·lr`` per step, ``lr`` this schedule times the state's ``lr_scale``).
      warmup_steps: steps with penalty weight 0.
      power: the penalty's exponent ``p``.
      lr_decay: the per-step factor of ``lr_scale`` once ``converged`` is set.
    """

    lr_schedule: Callable[[jax.Array], jax.Array]
    warmup_steps: int = 0
    power: float = 1.0
    lr_decay: float = 0.9985


def learned_bit_widths(model: nnx.Module) -> tuple[list, list, list, list]:
    """``(weight_bits, weight_targets, act_bits, act_targets)`` of every quant layer that learns
    its bit-width (lists with one entry per layer, bits differentiable); empty lists if none."""
    from qflax.layers import is_quant_layer

    w_bits, w_targets, a_bits, a_targets = [], [], [], []
    for _, node in nnx.iter_graph(model):
        if not is_quant_layer(node):
            continue
        widths = node.bit_widths()
        if "weight" in widths:
            w_bits.append(widths["weight"][0])
            w_targets.append(widths["weight"][1])
        if "act" in widths:
            a_bits.append(widths["act"][0])
            a_targets.append(widths["act"][1])
    return w_bits, w_targets, a_bits, a_targets


def aux_loss(model: nnx.Module) -> jax.Array | None:
    """The sum of the model's :class:`~qflax.layers.AuxLoss` values as its last forward left
    them (e.g. vector quantizers' codebook and commitment losses), or None when it has none."""
    values = [v[...] for _, v in nnx.iter_graph(model) if isinstance(v, AuxLoss)]
    if not values:
        return None
    return sum(jnp.sum(v).astype(jnp.float32) for v in values)


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Any, Any]:
    """``(graphdef, params, rest)``: the one split the steps are built on."""
    return nnx.split(model, nnx.Param, ...)


def create_train_state(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    *,
    seed: int,
    teacher: nnx.Module | None = None,
) -> tuple[nnx.GraphDef, TrainState, nnx.GraphDef | None]:
    """Splits ``model`` (and the teacher) and initialises the optimizer.

    Returns:
      ``(graphdef, state, teacher_graphdef)``; pass both graphdefs to :func:`make_train_step`.
    """
    graphdef, params, rest = split_model(model)
    teacher_graphdef, teacher_state = None, None
    if teacher is not None:
        teacher_graphdef, teacher_state = nnx.split(teacher)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        rest=rest,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        teacher=teacher_state,
        penalty=penalty_init(),
        lr_scale=jnp.ones((), jnp.float32),
        converged=jnp.zeros((), jnp.bool_),
    )
    return graphdef, state, teacher_graphdef


def _log_softmax(logits: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def kl_divergence(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """``KL(p || q) = sum p (log p - log q)`` over the last axis, from log-probabilities."""
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def jeffreys_divergence(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """``KL(p || q) + KL(q || p) = sum (p - q)(log p - log q)`` over the last axis."""
    return jnp.sum((jnp.exp(log_p) - jnp.exp(log_q)) * (log_p - log_q), axis=-1)


def distillation_divergence(
    student_logits: jax.Array, teacher_logits: jax.Array, *, kind: str, temperature: float
) -> jax.Array:
    """Per-example ``T^2 * D(softmax(s/T), softmax(t/T))``; the teacher gets no gradient.

    ``kind="kl"`` is ``KL(p_t || p_s)`` (Hinton et al.), ``"jeffreys"`` the symmetric
    ``KL(p_s || p_t) + KL(p_t || p_s)``.
    """
    log_ps = _log_softmax(student_logits / temperature)
    log_pt = jax.lax.stop_gradient(_log_softmax(teacher_logits / temperature))
    if kind == "kl":
        divergence = kl_divergence(log_pt, log_ps)
    elif kind == "jeffreys":
        divergence = jeffreys_divergence(log_ps, log_pt)
    else:
        raise ValueError(f"divergence={kind!r} is not allowed; allowed: 'kl', 'jeffreys'")
    return (temperature**2) * divergence


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    teacher_graphdef: nnx.GraphDef | None = None,
    divergence: str = "kl",
    distill_weight: float = 1.0,
    temperature: float = 1.0,
    penalty: PenaltySettings | None = None,
    shardings: tuple[Any, Any, Any] | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Makes ``train_step(state, batch) -> (state, metrics)``, jitted with the state donated.

    The loss is the mean of the model's task loss (:func:`qflax.train.model_task`: the
    cross-entropy of classifiers and language models, the squared error of autoencoders); with
    a teacher (classifiers) it is
    ``(1 - distill_weight) * CE + distill_weight * T^2 * D`` (see
    :func:`distillation_divergence`), the teacher run in inference mode, plus the model's
    auxiliary losses (:func:`aux_loss`; metric ``aux_loss``). BatchNorm statistics
    (and any other non-``Param`` variable the forward pass updates) are carried in
    ``state.rest``. For sequence models every position is one example.

    With ``penalty`` set and a model with learned bit-widths, the loss becomes
    ``penalty_loss(task loss, ...)`` (:func:`qflax.train.penalty_loss`, per-layer targets) and
    the metrics gain ``task_loss``, ``penalty``, ``penalty_weight`` (``t``), ``weight_bits`` /
    ``act_bits`` (means of the continuous bit-widths) and ``violated`` (share of constraints
    over target). Every update is multiplied by ``state.lr_scale``, which decays by
    ``penalty.lr_decay`` per step once ``state.converged`` is set.

    Args:
      graphdef: the student's graph from :func:`split_model`.
      tx: the optimizer (initialised in ``state.opt_state``).
      teacher_graphdef: the teacher's graph (its state is ``state.teacher``), or None.
      divergence: ``"kl"`` or ``"jeffreys"``.
      distill_weight: weight of the divergence in [0, 1].
      temperature: softening temperature ``T > 0``.
      penalty: the bit-width penalty's settings, or None (no penalty, no learning-rate decay).
      shardings: ``(state, batch, replicated)`` shardings on a device mesh
        (:mod:`qflax.parallel`): the step is jitted with them as its in and out shardings (the
        metrics replicated); None: one device.

    Returns:
      The jitted step. ``metrics`` holds float32 scalars ``loss`` and the task's score
      (``accuracy``, or ``psnr`` for autoencoders) and, with
      a teacher, ``cross_entropy`` and ``divergence``. Do not reuse a state after
      passing it in (its buffers are donated).
    """

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        inputs, labels = batch
        rng, _ = jax.random.split(jax.random.wrap_key_data(state.rng))
        teacher_logits = None
        if teacher_graphdef is not None:
            teacher = nnx.merge(teacher_graphdef, state.teacher)
            teacher_logits = jax.lax.stop_gradient(teacher(inputs, train=False))

        def loss_fn(params):
            # Fresh Variable objects (tree.map rebuilds them) belong to this trace level, so
            # the forward pass may update them (BatchNorm statistics).
            rest = jax.tree.map(lambda x: x, state.rest)
            model = nnx.merge(graphdef, params, rest)
            # nnx's training mode: quant layers whose quantizers keep running statistics
            # (DBSSQ activations) use the batch's and update them (models get `train=True`).
            model.train()
            task = model_task(model)
            logits = model(inputs, train=True)
            ce = jnp.mean(task.loss(logits, inputs, labels))
            metrics = {task.metric: jnp.mean(task.score(logits, inputs, labels))}
            loss = ce
            if teacher_logits is not None:
                metrics["cross_entropy"] = ce
                div = jnp.mean(
                    distillation_divergence(
                        logits, teacher_logits, kind=divergence, temperature=temperature
                    )
                )
                metrics["divergence"] = div
                loss = (1.0 - distill_weight) * ce + distill_weight * div
            aux = aux_loss(model)
            if aux is not None:
                metrics["aux_loss"] = aux
                loss = loss + aux
            pstate = state.penalty
            if penalty is not None:
                w_bits, w_targets, a_bits, a_targets = learned_bit_widths(model)
                if w_bits or a_bits:
                    with jax.numpy_dtype_promotion("standard"):  # optax schedules mix int/float
                        lr = penalty.lr_schedule(state.step) * state.lr_scale
                    task = loss
                    loss, pstate = penalty_loss(
                        task,
                        w_bits,
                        a_bits,
                        state.penalty,
                        target_w=w_targets,
                        target_a=a_targets,
                        lr=lr,
                        warmup_steps=penalty.warmup_steps,
                        p=penalty.power,
                    )
                    b = jax.lax.stop_gradient((w_bits, a_bits))
                    metrics.update(
                        task_loss=task,
                        penalty=loss - task,
                        penalty_weight=pstate.t,
                        violated=violated_share(
                            [*b[0], *b[1]], [*w_targets, *a_targets], allow_empty=True
                        ),
                    )
                    if w_bits:
                        metrics["weight_bits"] = jnp.mean(
                            jnp.concatenate([x.ravel() for x in b[0]])
                        )
                    if a_bits:
                        metrics["act_bits"] = jnp.mean(jnp.stack([x.ravel()[0] for x in b[1]]))
            _, _, rest = split_model(model)
            return loss, (metrics, rest, pstate)

        (loss, (metrics, rest, pstate)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        lr_scale = state.lr_scale
        if penalty is not None and lr_scale is not None:
            updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), updates)
            lr_scale = jnp.where(state.converged, lr_scale * penalty.lr_decay, lr_scale)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            rest=rest,
            opt_state=opt_state,
            rng=jax.random.key_data(rng),
            penalty=pstate,
            lr_scale=lr_scale,
        )
        return new_state, {"loss": loss, **metrics}

    if shardings is None:
        return jax.jit(step, donate_argnums=0)
    state_sharding, batch_sharding, replicated = shardings
    return jax.jit(
        step,
        donate_argnums=0,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated),
    )


def make_eval_step(
    graphdef: nnx.GraphDef,
    shardings: tuple[Any, Any, Any] | None = None,
) -> Callable[[Any, Any, Batch, jax.Array], dict[str, jax.Array]]:
    """Makes the jitted ``eval_step(params, rest, batch, weights) -> sums``.

    ``shardings``: as :func:`make_train_step`'s (``params`` and ``rest`` take the state's,
    the batch and the weights the batch's).

    ``weights`` (float32, shape of the labels' leading axis) masks padded examples, so a short
    last batch padded to the full size reuses the compiled step. Returns float32 sums
    ``loss_sum``, ``score_sum`` (of the task's score: correct predictions, or PSNR) and
    ``count`` (positions count for sequence models); the model
    runs in inference mode (BatchNorm running averages).
    """

    def step(params: Any, rest: Any, batch: Batch, weights: jax.Array) -> dict[str, jax.Array]:
        inputs, labels = batch
        model = nnx.merge(graphdef, params, rest)
        model.eval()  # quant layers use running statistics (the default; explicit here)
        task = model_task(model)
        logits = model(inputs, train=False)
        loss, score = task.loss(logits, inputs, labels), task.score(logits, inputs, labels)
        w = jnp.broadcast_to(weights.reshape(weights.shape + (1,) * (loss.ndim - 1)), loss.shape)
        return {
            "loss_sum": jnp.sum(loss * w),
            "score_sum": jnp.sum(score * w),
            "count": jnp.sum(w),
        }

    if shardings is None:
        return jax.jit(step)
    state_sharding, batch_sharding, replicated = shardings
    return jax.jit(
        step,
        in_shardings=(state_sharding.params, state_sharding.rest, batch_sharding, batch_sharding),
        out_shardings=replicated,
    )
