"""Several processes (hosts): ``jax.distributed`` start-up from the config or the environment,
which process writes, and host copies of arrays that span processes."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

# The environment variables read when the config leaves a field unset (JAX itself reads
# JAX_COORDINATOR_ADDRESS, and detects SLURM, Open MPI, Cloud TPU and Kubernetes jobs).
ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


def check_distributed(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``config.distributed`` checked without starting anything: ``enabled`` (bool),
    ``coordinator_address`` (``"host:port"`` or ``""``: from the environment),
    ``num_processes`` (>= 1, or 0: from the environment) and ``process_id`` (0 ..
    num_processes − 1, or −1: from the environment); raises ValueError naming the value."""
    out = dict(settings)
    unknown = sorted(set(out) - {"enabled", *ENV})
    if unknown:
        raise ValueError(
            f"distributed has unknown keys {unknown}; allowed: enabled, {', '.join(ENV)}"
        )
    if not isinstance(out.get("enabled", False), bool):
        raise ValueError(f"distributed.enabled={out['enabled']!r}; allowed: True, False")
    address = out.get("coordinator_address", "")
    if not isinstance(address, str) or (address and address.rpartition(":")[1] != ":"):
        raise ValueError(
            f"distributed.coordinator_address={address!r}; allowed: 'host:port', or '' (from "
            "$JAX_COORDINATOR_ADDRESS or the cluster)"
        )
    count, index = out.get("num_processes", 0), out.get("process_id", -1)
    for key, value, lo in (("num_processes", count, 0), ("process_id", index, -1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
            raise ValueError(
                f"distributed.{key}={value!r}; allowed: an integer >= {lo} ({lo}: from "
                f"${ENV[key]} or the cluster)"
            )
    if count and index >= count:
        raise ValueError(
            f"distributed.process_id={index} with num_processes={count}; allowed: 0..{count - 1}"
        )
    return out


def _from_env(key: str, value: Any, unset: Any) -> Any:
    if value != unset:
        return value
    found = os.environ.get(ENV[key])
    if found is None:
        return None
    return found if key == "coordinator_address" else int(found)


def initialize(settings: Mapping[str, Any]) -> bool:
    """Starts ``jax.distributed`` when ``settings["enabled"]`` (``config.distributed``; fields
    left unset come from ``$JAX_COORDINATOR_ADDRESS``, ``$JAX_NUM_PROCESSES``,
    ``$JAX_PROCESS_ID`` or JAX's cluster detection), with CPU collectives over gloo so CPU
    processes can reduce across each other; once per process (later calls do nothing). Must
    run before anything else uses JAX's devices. Returns whether several processes run."""
    settings = check_distributed(settings)
    if not settings.get("enabled", False):
        return jax.process_count() > 1
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=_from_env(
                "coordinator_address", settings.get("coordinator_address", ""), ""
            ),
            num_processes=_from_env("num_processes", settings.get("num_processes", 0), 0),
            process_id=_from_env("process_id", settings.get("process_id", -1), -1),
        )
    except RuntimeError as error:
        raise RuntimeError(
            f"jax.distributed.initialize failed ({error}); it must run before any JAX "
            "computation in this process, with the same coordinator and process count in "
            "every process"
        ) from error
    return jax.process_count() > 1


def is_main() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def check_spans_processes(mesh: Mapping[str, Any]) -> None:
    """With several processes, the mesh ``config.mesh`` must use every device (each process
    puts its part of every batch on its own devices); raises ValueError naming the sizes."""
    if jax.process_count() == 1:
        return
    from qflax.parallel._mesh import mesh_shape

    used = int(np.prod(list(mesh_shape(mesh, jax.device_count()).values())))
    if used != jax.device_count():
        raise ValueError(
            f"mesh={dict(mesh)} uses {used} of the {jax.device_count()} devices of "
            f"{jax.process_count()} processes; allowed: a mesh over every device (e.g. "
            "mesh.data=-1), so each process holds its part of every batch"
        )


def process_shard() -> tuple[int, int]:
    """``(process index, process count)``: which part of every global batch this process reads
    and puts on its devices (``qflax.data.batches(shard=...)``)."""
    return jax.process_index(), jax.process_count()


def sync(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def addressable(tree: Any) -> Any:
    """``tree`` with each array this process cannot read whole (sharded over devices of
    several processes) replaced by a host copy of its global value (``process_allgather``:
    every process must call this together); the tree itself when every array is readable (one
    process: always)."""
    leaves = jax.tree.leaves(tree)
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves):
        return tree
    from jax.experimental import multihost_utils

    def host(x: Any) -> Any:
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(host, tree)
