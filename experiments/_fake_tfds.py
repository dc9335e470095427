"""A stand-in TFDS image set for checking accelerator-scale configs where their data is absent:
random JPEG images of varied sizes (as ImageNet's are), prepared in ``array_record`` format
without TensorFlow or network, read by the same ``tfds:`` loader (``stream``, ``image_size``).
It checks that a config starts, shards, checkpoints and resumes — its accuracy means nothing.

    python -m experiments._fake_tfds DATA_DIR              # qflax_fake_images: 2,048 / 512
"""

from __future__ import annotations

import io
import sys

import numpy as np

NAME = "qflax_fake_images"


def prepare(
    data_dir: str,
    *,
    train: int = 2048,
    test: int = 512,
    classes: int = 10,
    sizes: tuple[int, int] = (48, 160),
    seed: int = 0,
) -> str:
    """Writes ``qflax_fake_images`` (``train``/``test`` splits of JPEG images whose sides are
    drawn from ``sizes``, labels in ``[0, classes)``) under ``data_dir``; returns its TFDS
    name. Each image's mean brightness follows its label, so the set is learnable."""
    import PIL.Image
    import tensorflow_datasets as tfds

    def jpeg(i: int, label: int) -> bytes:
        rng = np.random.default_rng((seed, i))
        height, width = rng.integers(sizes[0], sizes[1] + 1, size=2)
        base = 40 + 170 * label / max(classes - 1, 1)
        pixels = np.clip(rng.normal(base, 30, (height, width, 3)), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        PIL.Image.fromarray(pixels).save(out, format="JPEG", quality=90)
        return out.getvalue()

    class QflaxFakeImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                        "label": tfds.features.ClassLabel(num_classes=classes),
                    }
                ),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            return {
                "train": self._generate_examples(0, train),
                "test": self._generate_examples(train, train + test),
            }

        def _generate_examples(self, start, stop):
            for i in range(start, stop):
                label = i % classes
                yield i, {"image": jpeg(i, label), "label": label}

    with tfds.core.registered.skip_registration():
        builder = QflaxFakeImages(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return NAME


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python -m experiments._fake_tfds DATA_DIR ({__doc__.splitlines()[0]})")
    print(f"prepared tfds:{prepare(sys.argv[1])} under {sys.argv[1]}")
