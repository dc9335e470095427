"""Training on several devices with ``jax.sharding``: a mesh from the config, batches sharded
over its ``data`` and ``fsdp`` axes, the train state sharded FSDP-style over ``fsdp``.

* :func:`mesh_shape` and :func:`make_mesh`: ``config.mesh`` (``data``, ``fsdp``, ``model``;
  ``-1``: every device left) as a ``jax.sharding.Mesh`` over ``jax.devices()`` (None for one
  device: the unsharded path, unchanged);
* :func:`batch_sharding`: the leading (example) axis of a batch split over ``data × fsdp``;
* :func:`state_sharding`: each array of a pytree (parameters, optimizer moments, quantizer
  parameters and state) sharded on its last axis over ``fsdp`` when that axis divides evenly
  (kernels and their per-output-channel scales, which share that axis), replicated otherwise
  (scalars, small or odd-sized arrays);
* :func:`replicated`;
* several processes (hosts): :func:`initialize` (``jax.distributed`` from ``config.distributed``
  or the environment, CPU collectives over gloo), :func:`is_main` (process 0 writes the run's
  files), :func:`sync` (a barrier) and :func:`addressable` (host copies of arrays sharded over
  several processes, for summaries and checksums; checkpoints are saved shard by shard).

Reductions inside the jitted steps (batch means, BatchNorm statistics, the penalty terms,
activation ranges, GDNSQ bit-widths) run on the global arrays, so XLA reduces them over every
device: results do not depend on the device count beyond float summation order.
"""

from qflax.parallel._distributed import (
    addressable,
    check_distributed,
    check_spans_processes,
    initialize,
    is_main,
    process_shard,
    sync,
)
from qflax.parallel._mesh import (
    MESH_AXES,
    batch_sharding,
    check_mesh,
    make_mesh,
    mesh_shape,
    replicated,
    shard_count,
    state_sharding,
)

__all__ = [
    "MESH_AXES",
    "addressable",
    "check_distributed",
    "check_spans_processes",
    "initialize",
    "is_main",
    "process_shard",
    "sync",
    "batch_sharding",
    "check_mesh",
    "make_mesh",
    "mesh_shape",
    "replicated",
    "shard_count",
    "state_sharding",
]
