"""The device mesh of a config and the shardings of batches and train states."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# The mesh axes, in order: data parallelism (batch), fully sharded data parallelism (batch and
# state), model parallelism (not used by any layer yet: must be 1).
MESH_AXES = ("data", "fsdp", "model")
# The batch axis is split over these mesh axes.
BATCH_AXES = ("data", "fsdp")


def _size(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"mesh.{name}={value!r} is not allowed; allowed: an integer >= 1, or -1")
    if value != -1 and value < 1:
        raise ValueError(f"mesh.{name}={value!r} is not allowed; allowed: an integer >= 1, or -1")
    return int(value)


def check_mesh(mesh: Mapping[str, Any]) -> dict[str, int]:
    """The sizes of ``mesh`` checked without devices (integers >= 1 or -1, at most one -1,
    ``model`` 1); raises ValueError naming the value."""
    unknown = sorted(set(mesh) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh has unknown axes {unknown}; allowed: {', '.join(MESH_AXES)}")
    sizes = {axis: _size(mesh.get(axis, 1), axis) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"mesh={sizes} has -1 on {free}; allowed: -1 on one axis at most")
    if sizes["model"] != 1:
        raise ValueError(
            f"mesh.model={sizes['model']} is not supported yet; allowed: 1 (no layer is split "
            "over a model axis; use data and fsdp)"
        )
    return sizes


def mesh_shape(mesh: Mapping[str, Any], device_count: int) -> dict[str, int]:
    """The size of each axis of ``mesh`` (``{"data", "fsdp", "model"}``) on ``device_count``
    devices, ``-1`` (at most one axis) resolved to the devices left; without a ``-1`` the mesh
    may use fewer devices than there are (the first ones).

    >>> mesh_shape({"data": -1, "fsdp": 2, "model": 1}, 8)
    {'data': 4, 'fsdp': 2, 'model': 1}

    Raises:
      ValueError: an unknown axis, a size that is not an integer >= 1 or -1, more than one -1,
        ``model != 1``, or more devices than ``device_count``.
    """
    sizes = check_mesh(mesh)
    free = [axis for axis, size in sizes.items() if size == -1]
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if device_count % fixed:
            raise ValueError(
                f"mesh={sizes}: {device_count} devices do not split into axes of {fixed}; "
                f"allowed: fixed sizes whose product divides {device_count}"
            )
        sizes[free[0]] = device_count // fixed
    elif fixed > device_count:
        raise ValueError(
            f"mesh={sizes} needs {fixed} devices, but there are {device_count} "
            f"({jax.default_backend()}); allowed: sizes whose product is at most {device_count}, "
            "or -1 on one axis"
        )
    return sizes


def make_mesh(mesh: Mapping[str, Any], devices: Sequence[Any] | None = None) -> Mesh | None:
    """The ``jax.sharding.Mesh`` of ``mesh`` over the first of ``devices`` (default
    ``jax.devices()``) it needs; None when it needs one device (the steps run unsharded)."""
    if all(size == 1 for size in check_mesh(mesh).values()):
        return None
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if math.prod(shape) == 1:
        return None
    grid = np.asarray(devices[: math.prod(shape)], dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def shard_count(mesh: Mesh | None) -> int:
    """How many pieces a batch is split into (``data × fsdp``; 1 without a mesh)."""
    if mesh is None:
        return 1
    return int(math.prod(mesh.shape[a] for a in BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """A batch's leading (example) axis split over ``data × fsdp`` (a prefix: any rank)."""
    return NamedSharding(mesh, P(BATCH_AXES))


def state_sharding(mesh: Mesh, tree: Any) -> Any:
    """A ``NamedSharding`` for every array of ``tree``: the last axis over ``fsdp`` when it
    divides evenly by the ``fsdp`` size (> 1), else replicated."""
    fsdp = mesh.shape["fsdp"]

    def sharding(x: Any) -> NamedSharding:
        shape = np.shape(x)
        if fsdp > 1 and len(shape) >= 1 and shape[-1] % fsdp == 0:
            return NamedSharding(mesh, P(*([None] * (len(shape) - 1)), "fsdp"))
        return replicated(mesh)

    return jax.tree.map(sharding, tree)
