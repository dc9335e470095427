"""One of two processes of a run on the loopback interface (run by test_equivalence.py):
``jax.distributed`` over gloo CPU collectives, 2 forced CPU devices per process, a mesh over the
4 devices of both (``data=2, fsdp=2``: batches and the sharded state span the processes). Both
processes train the same tiny models into shared workdirs; each writes the final parameters it
sees (gathered) and its summary to ``<out>/<recipe>-p<process>.{npz,json}``."""

import json
import pathlib
import sys

from tests.parallel._equivalence_worker import RECIPES


def main(out: pathlib.Path, process: int, port: int, recipes: list[str]) -> None:
    import jax
    import numpy as np

    from qflax import parallel
    from qflax.train import train_and_evaluate
    from tests.train.test_loop import tiny_config

    # A mesh over only some of the processes' devices is refused before anything is written.
    partial = tiny_config(
        "cnn",
        mesh__data=2,
        distributed__enabled=True,
        distributed__coordinator_address=f"127.0.0.1:{port}",
        distributed__num_processes=2,
        distributed__process_id=process,
    )
    try:
        train_and_evaluate(partial, out / "partial")
        refused = ""
    except ValueError as error:
        refused = str(error)
    (out / f"refused-p{process}.json").write_text(
        json.dumps({"error": refused, "written": (out / "partial").exists()})
    )
    for recipe in recipes:
        config = tiny_config(
            "cnn",
            log_every_steps=1,
            mesh__data=2,
            mesh__fsdp=2,
            distributed__enabled=True,
            distributed__coordinator_address=f"127.0.0.1:{port}",
            distributed__num_processes=2,
            distributed__process_id=process,
            **RECIPES[recipe],
        )
        state, summary = train_and_evaluate(config, out / recipe)
        assert jax.process_count() == 2 and len(jax.local_devices()) == 2
        leaves = jax.tree.leaves(parallel.addressable(state.params))
        np.savez(out / f"{recipe}-p{process}.npz", *[np.asarray(x) for x in leaves])
        specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state.params)})
        (out / f"{recipe}-p{process}.json").write_text(
            json.dumps({"summary": summary, "specs": specs})
        )


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(","))
