"""The checksums of checkpoint items: tree_digest, recorded by save_items and checked by
restore_items / restore_model_state (one flipped bit in any array fails and names the item)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qflax.runs import (
    CheckpointError,
    checkpoint_manager,
    restore_items,
    restore_model_state,
    save_items,
    tree_digest,
)

STEP = 7


def items():
    """A model item and a train item with float, int and uint32 leaves (a None leaf too)."""
    model = {
        "params": {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "b": jnp.ones(4)},
        "rest": {"mean": jnp.full((4,), 0.5, jnp.float32)},
    }
    train = {
        "step": jnp.asarray(STEP, jnp.int32),
        "rng": jax.random.key_data(jax.random.key(0)),
        "opt_state": {"mu": jnp.zeros((3, 4), jnp.bfloat16)},
        "teacher": None,
    }
    return model, train


def leaf_paths():
    model, train = items()
    for name, tree in (("model", model), ("train", train)):
        for path, _ in jax.tree_util.tree_leaves_with_path(tree):
            yield name, path


def flip_bit(tree, target_path, bit=3):
    def flip(path, leaf):
        if path != target_path:
            return leaf
        array = np.array(leaf)
        view = array.reshape(-1).view(np.uint8)
        view[len(view) // 2] ^= 1 << bit
        return jnp.asarray(array)

    return jax.tree_util.tree_map_with_path(flip, tree)


def save(directory, model, train, digests_of=None):
    """Saves ``model`` and ``train``; with ``digests_of``, their checksums replace the recorded
    ones (as if the arrays on disk had changed after a save of those)."""
    manager = checkpoint_manager(directory, max_to_keep=2)
    save_items(manager, STEP, {"epoch": 1, "step": STEP}, model=model, train=train)
    manager.close()
    if digests_of is not None:
        path = directory / str(STEP) / "meta" / "metadata"
        meta = json.loads(path.read_text())
        meta["sha256"] = {name: tree_digest(tree) for name, tree in digests_of.items()}
        path.write_text(json.dumps(meta))


def test_tree_digest_sees_values_dtypes_and_shapes_not_placement():
    x = np.arange(6, dtype=np.float32)
    assert tree_digest({"x": x}) == tree_digest({"x": jnp.asarray(x)})  # host or device
    assert tree_digest({"x": x}) != tree_digest({"x": x.reshape(2, 3)})
    assert tree_digest({"x": x}) != tree_digest({"x": x.view(np.int32)})  # same bytes
    assert tree_digest({"x": x}) != tree_digest({"x": x[::-1].copy()})
    assert tree_digest({"x": x, "y": None}) == tree_digest({"x": x})


def test_an_intact_checkpoint_restores_and_records_a_checksum_per_item(tmp_path):
    model, train = items()
    save(tmp_path, model, train)
    manager = checkpoint_manager(tmp_path, max_to_keep=2)
    restored = restore_items(manager, STEP, model=model, train=train)
    manager.close()
    assert restored["meta"]["sha256"] == {"model": tree_digest(model), "train": tree_digest(train)}
    assert tree_digest(restored["model"]) == tree_digest(model)
    assert tree_digest(restored["train"]) == tree_digest(train)


@pytest.mark.parametrize(
    "item, path", list(leaf_paths()), ids=lambda v: v if isinstance(v, str) else None
)
def test_one_flipped_bit_in_any_array_fails_and_names_the_item(tmp_path, item, path):
    model, train = items()
    changed = {"model": model, "train": train}
    changed[item] = flip_bit(changed[item], path)
    save(tmp_path, **changed, digests_of={"model": model, "train": train})
    manager = checkpoint_manager(tmp_path, max_to_keep=2)
    pattern = rf"\(step {STEP}\) is corrupt: its '{item}' item does not match the sha256"
    with pytest.raises(CheckpointError, match=pattern):
        restore_items(manager, STEP, model=model, train=train)
    # A model-only restore checks the model item only.
    if item == "model":
        with pytest.raises(CheckpointError, match=pattern):
            restore_model_state(manager, STEP, model["params"], model["rest"])
    else:
        params, _, _ = restore_model_state(manager, STEP, model["params"], model["rest"])
        assert tree_digest(params) == tree_digest(model["params"])
    manager.close()


def test_a_checkpoint_saved_before_the_checksums_restores_unchecked(tmp_path, caplog):
    model, train = items()
    save(tmp_path, model, train)
    path = tmp_path / str(STEP) / "meta" / "metadata"
    meta = json.loads(path.read_text())
    del meta["sha256"]
    path.write_text(json.dumps(meta))
    manager = checkpoint_manager(tmp_path, max_to_keep=2)
    with caplog.at_level("INFO", logger="qflax.runs._checkpoint"):
        restored = restore_items(manager, STEP, model=model, train=train)
    manager.close()
    assert tree_digest(restored["model"]) == tree_digest(model)
    assert "has no checksums" in caplog.text
