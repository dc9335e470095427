"""Input-pipeline throughput against what the train step consumes (issue 18): can the data keep
up with the step?

Sources, each yielding float32 batches of ``--batch`` CIFAR-shaped images (32×32×3) with labels,
shuffled per epoch, randomly shifted by up to 4 pixels as ``augment_shift=4`` does:

* ``in memory``: ``qflax.data.batches`` over numpy arrays plus ``random_shift`` — what
  ``qflax train`` does for the bundled sets and for TFDS sets it loads into memory;
* ``grain, N workers``: an ``array_record`` TFDS data set streamed through
  ``qflax.data.tfds_source`` and grain (``shuffle → random_map(shift, to float) → batch``), in
  this process (0 workers) or in N worker processes (``mp_prefetch``). The data set is prepared
  here into a temporary directory (``--examples`` 32×32 JPEG images from
  ``experiments/_fake_tfds.py``: no TensorFlow, no network), so the disk reads and the image
  decoding (TFDS stores CIFAR as PNG) are real.

Consumer: the float ResNet-20 train step (SGD, batch ``--batch``) built by ``build_trainer`` on
this machine's default device, in examples per second. Every number comes from this one run.

    python -m benchmarks.input_pipeline                 # 20,000 examples, 0 to 2 workers
    python -m benchmarks.input_pipeline --workers 0 1 2 4 --examples 50000

Goal: every source ≥ 1× the step's rate (the pipeline is not the bottleneck).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from experiments import _fake_tfds

SHAPE = (32, 32, 3)
SHIFT = 4


def _shift(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One image shifted by up to SHIFT pixels (zero padding), as float32 in [0, 1]."""
    dy, dx = rng.integers(0, 2 * SHIFT + 1, size=2)
    padded = np.pad(image, ((SHIFT, SHIFT), (SHIFT, SHIFT), (0, 0)))
    return padded[dy : dy + SHAPE[0], dx : dx + SHAPE[1]].astype(np.float32) / 255.0


def _preprocess(example: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.int32]:
    return _shift(example["image"], rng), np.int32(example["label"])


def grain_batches(directory: str, batch: int, workers: int, seed: int = 0):
    """An endless iterator of grain batches from the prepared data set."""
    import grain

    from qflax.data import tfds_source

    source = tfds_source(_fake_tfds.NAME, split="train", data_dir=directory)
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    ds = ds.random_map(_preprocess, seed=seed).batch(batch, drop_remainder=True)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=64))
    if workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(it)


def memory_batches(x: np.ndarray, y: np.ndarray, batch: int, seed: int = 0):
    """An endless iterator of in-memory batches, as the train loop makes them."""
    from qflax import data
    from qflax.train._loop import random_shift

    epoch = 0
    while True:
        rng = np.random.default_rng((seed, epoch, 1))
        for xb, yb in data.batches(x, y, batch, seed=seed, epoch=epoch):
            yield random_shift(xb, SHIFT, rng), yb
        epoch += 1


def rate(batches, batch: int, seconds: float, warmup: int = 3) -> float:
    """Examples per second over about ``seconds`` after ``warmup`` batches."""
    for _ in range(warmup):
        next(batches)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(batches)
        n += 1
    return n * batch / (time.perf_counter() - start)


def step_rate(batch: int, steps: int) -> float:
    """Examples per second of the float ResNet-20 train step (compiled first)."""
    import jax
    from flax import nnx

    from qflax import models
    from qflax.train import build_trainer, default_config

    config = default_config()
    config.model = "resnet20"
    config.batch_size = batch
    config.optimizer.name = "sgd"
    config.optimizer.momentum = 0.9
    model = models.build_model("resnet20", input_shape=SHAPE, num_classes=10, rngs=nnx.Rngs(0))
    trainer = build_trainer(config, model, steps_per_epoch=100)
    rng = np.random.default_rng(0)
    x = rng.random((batch, *SHAPE), dtype=np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    state = trainer.state
    for _ in range(2):  # compile, warm up
        state, _ = trainer.train_step(state, (x, y))
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = trainer.train_step(state, (x, y))
    jax.block_until_ready(state)
    return steps * batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seconds", type=float, default=10.0, help="per source")
    parser.add_argument("--steps", type=int, default=10, help="train steps timed")
    args = parser.parse_args(argv)
    if args.examples < 2 * args.batch:
        parser.error(f"--examples={args.examples}; allowed: at least 2 × --batch")
    rows = []
    consumer = step_rate(args.batch, args.steps)
    print(f"ResNet-20 float train step, batch {args.batch}: {consumer:.0f} examples/s")
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        _fake_tfds.prepare(directory, train=args.examples, test=args.batch, sizes=(32, 32))
        print(f"prepared {args.examples} examples in {time.perf_counter() - start:.1f} s")
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (args.examples, *SHAPE), dtype=np.uint8)
        x = x.astype(np.float32) / 255.0
        y = (np.arange(args.examples) % 10).astype(np.int32)
        sources = {"in memory": lambda: memory_batches(x, y, args.batch)}
        for w in args.workers:
            sources[f"grain, {w} workers"] = lambda w=w: grain_batches(directory, args.batch, w)
        for name, make in sources.items():
            found = rate(make(), args.batch, args.seconds)
            rows.append({"source": name, "examples_per_s": found, "ratio": found / consumer})
            print(f"{name}: {found:.0f} examples/s ({found / consumer:.1f}× the step)")
    print(f"\nbatch {args.batch}, {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    print("| source | examples/s | × the ResNet-20 step |")
    print("|---|---|---|")
    print(f"| (the step itself) | {consumer:.0f} | 1.0 |")
    for row in rows:
        print(f"| {row['source']} | {row['examples_per_s']:.0f} | {row['ratio']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
