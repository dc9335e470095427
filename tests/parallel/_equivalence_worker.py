"""Trains tiny models on several meshes in one process with 8 forced CPU devices and writes
their loss curves and final parameters (run by test_equivalence.py in a subprocess:
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX starts)."""

import json
import pathlib
import sys

import jax
import numpy as np

from qflax.train import train_and_evaluate
from tests.train.test_loop import read_metrics, tiny_config

RECIPES = {
    "float": {},
    "lsq_w4a4": {"quant__recipe": "lsq"},
    "gdnsq": {"quant__recipe": "gdnsq", "quant__weight_bits": 2, "quant__act_bits": 2},
    "bnn": {"quant__recipe": "binary", "pair__name": "bnn", "quant__latent_clip": 1.0},
}
MESHES = {"one": (1, 1), "data8": (8, 1), "fsdp8": (1, 8), "data2_fsdp4": (2, 4)}


def main(out: pathlib.Path, runs: list[str]) -> None:
    """``runs``: ``recipe=mesh+mesh...`` items (each recipe on those meshes) and ``resume``."""
    assert jax.device_count() == 8, jax.devices()
    result = {}
    for item in (r for r in runs if r != "resume"):
        recipe, meshes = item.split("=")
        for mesh in meshes.split("+"):
            data, fsdp = MESHES[mesh]
            config = tiny_config(
                "cnn", log_every_steps=1, mesh__data=data, mesh__fsdp=fsdp, **RECIPES[recipe]
            )
            if recipe == "bnn":
                config.model_kwargs["activation"] = "hardtanh"
            workdir = out / f"{recipe}-{mesh}"
            state, summary = train_and_evaluate(config, workdir)
            losses = [r["train_loss"] for r in read_metrics(workdir) if r["kind"] == "step"]
            leaves = jax.tree.leaves(state.params)
            shardings = sorted({str(getattr(x.sharding, "spec", "one device")) for x in leaves})
            np.savez(out / f"{recipe}-{mesh}.npz", *[np.asarray(x) for x in leaves])
            result[f"{recipe}-{mesh}"] = {
                "losses": losses,
                "test_accuracy": summary["test_accuracy"],
                "specs": shardings,
            }
    if "resume" in runs:
        # 8 → 1: one epoch sharded FSDP over 8 devices, then the same workdir resumed for a
        # second epoch on one device (mesh.* may change on resume), against 2 epochs on one;
        # 1 → 4: one epoch on one device, the second FSDP over 4.
        for name, meshes_run in (
            ("resume-8to1", ((1, 8), (1, 1))),
            ("resume-1to4", ((1, 1), (1, 4))),
            ("resume-one", ((1, 1),)),
        ):
            workdir = out / name
            for epochs, (data, fsdp) in enumerate(meshes_run, start=3 - len(meshes_run)):
                config = tiny_config(
                    "mlp",  # cheaper than the CNN; its 32-wide layers shard over 8 and 4
                    epochs=epochs,
                    optimizer__schedule="constant",  # the same schedule over 1 or 2 epochs
                    mesh__data=data,
                    mesh__fsdp=fsdp,
                )
                state, summary = train_and_evaluate(config, workdir)
            np.savez(out / f"{name}.npz", *[np.asarray(x) for x in jax.tree.leaves(state.params)])
            result[name] = {"test_accuracy": summary["test_accuracy"], "step": int(state.step)}
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]), sys.argv[2].split(","))
