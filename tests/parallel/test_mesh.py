"""config.mesh: its sizes, errors and shardings (no devices needed: sizes are checked against a
given device count; the sharded training itself: test_equivalence.py)."""

import pytest

from qflax import parallel
from qflax.train import default_config, validate_config


def test_mesh_sizes_resolve_minus_one_and_may_use_fewer_devices():
    assert parallel.mesh_shape({"data": -1}, 8) == {"data": 8, "fsdp": 1, "model": 1}
    assert parallel.mesh_shape({"data": 2, "fsdp": -1}, 8) == {"data": 2, "fsdp": 4, "model": 1}
    assert parallel.mesh_shape({"data": 2, "fsdp": 2}, 8) == {"data": 2, "fsdp": 2, "model": 1}
    assert parallel.make_mesh(default_config().mesh) is None  # all 1: one device, unsharded


@pytest.mark.parametrize(
    "mesh, count, message",
    [
        ({"data": 0}, 8, r"mesh.data=0 is not allowed; allowed: an integer >= 1, or -1"),
        ({"data": 2.0}, 8, r"mesh.data=2.0 is not allowed"),
        ({"data": -1, "fsdp": -1}, 8, r"-1 on \['data', 'fsdp'\]; allowed: -1 on one axis"),
        ({"model": 2}, 8, r"mesh.model=2 is not supported yet; allowed: 1"),
        ({"data": 16}, 8, r"needs 16 devices, but there are 8"),
        ({"data": 3, "fsdp": -1}, 8, r"8 devices do not split into axes of 3"),
        ({"pipeline": 2}, 8, r"mesh has unknown axes \['pipeline'\]"),
    ],
)
def test_bad_meshes_raise_naming_the_value(mesh, count, message):
    with pytest.raises(ValueError, match=message):
        parallel.mesh_shape(mesh, count)


def test_config_validation_checks_the_mesh_before_any_device_is_asked():
    config = default_config()
    config.mesh.model = 4
    with pytest.raises(ValueError, match=r"mesh.model=4 is not supported yet"):
        validate_config(config)
    config.mesh.model, config.mesh.data, config.batch_size = 1, 3, 128
    with pytest.raises(ValueError, match=r"batch_size=128 does not split over mesh data × fsdp"):
        validate_config(config)  # before any data is loaded
