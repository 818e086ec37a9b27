"""Shared helpers for the 8x8 ``sklearn`` digits examples.

This module is importable on its own (it only needs ``torch``, ``numpy``, ``diffusers`` and ``scikit-learn``) and
provides:

* :func:`load_digits_split`: the digits images scaled to ``[-1, 1]`` with a fixed, stratified, seeded train/held-out
  split that is identical on every machine;
* :class:`DigitsClassifier`: a small CNN (``diffusers`` ``ModelMixin`` + ``ConfigMixin``) whose 64-d penultimate
  features are used for Frechet distances between sample sets and held-out digits;
* :func:`classifier_features` / :func:`classifier_predict`: batched, no-grad helpers around the classifier;
* :func:`frechet_distance`: Frechet distance between Gaussian fits of two feature sets;
* :data:`CHECKPOINTS` and the ``*_DIR`` constants: where the small pre-trained checkpoints are shipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from mmgibbs.metrics import frechet_distance

__all__ = [
    "CHECKPOINTS",
    "CLASSIFIER_DIR",
    "DDPM_DIR",
    "NUM_HELDOUT",
    "NUM_TRAIN",
    "DigitsClassifier",
    "classifier_features",
    "classifier_predict",
    "dsm_dir",
    "frechet_distance",
    "load_digits_split",
    "stratified_heldout_indices",
    "stratified_split",
]

#: Folder holding the shipped checkpoints (``examples/checkpoints``), resolved relative to this file.
CHECKPOINTS: Path = Path(__file__).resolve().parent / "checkpoints"
#: Full ``DDPMPipeline`` (UNet2DModel with one attention block + DDPMScheduler) trained on the train split.
DDPM_DIR: Path = CHECKPOINTS / "digits-ddpm"
#: ``DigitsClassifier`` trained on the train split (used for features / class histograms).
CLASSIFIER_DIR: Path = CHECKPOINTS / "digits-classifier"

#: Size of the train split returned by :func:`load_digits_split`.
NUM_TRAIN: int = 1400
#: Size of the held-out split returned by :func:`load_digits_split` (1797 images in total).
NUM_HELDOUT: int = 397


def dsm_dir(sigma: float = 0.5) -> Path:
    """Folder of the single-noise-level (variance-exploding) DSM checkpoint trained at ``sigma``.

    Args:
        sigma: The noise level the model was trained at (the folder name uses ``f"{sigma:g}"``).

    Returns:
        ``CHECKPOINTS / f"digits-dsm-sigma{sigma:g}"``, e.g. ``.../digits-dsm-sigma0.5``.
    """
    return CHECKPOINTS / f"digits-dsm-sigma{sigma:g}"


def stratified_heldout_indices(labels: np.ndarray, num_heldout: int, seed: int) -> np.ndarray:
    """Pick ``num_heldout`` indices, stratified by label, with a seeded (platform-independent) PCG64 generator.

    Each class receives ``floor(n_c * num_heldout / N)`` held-out slots; the remaining slots go to the classes with
    the largest fractional remainders (ties broken by class index). Within a class, the held-out members are the first
    entries of a seeded permutation of that class's indices. Returned sorted (ascending dataset order).
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * num_heldout / labels.shape[0]
    quota = np.floor(exact).astype(np.int64)
    remainder = exact - quota
    order = sorted(range(len(classes)), key=lambda i: (-remainder[i], i))
    for i in order[: num_heldout - int(quota.sum())]:
        quota[i] += 1
    picked = []
    for cls, q in zip(classes, quota, strict=True):
        members = np.flatnonzero(labels == cls)
        picked.append(members[rng.permutation(members.shape[0])[:q]])
    return np.sort(np.concatenate(picked))


def stratified_split(
    images: torch.Tensor, labels: np.ndarray, num_heldout: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_heldout, y_heldout)`` of ``images`` (N, ...) and integer ``labels`` (N,), the
    held-out part :func:`stratified_heldout_indices`; both parts in ascending dataset order, contiguous."""
    heldout = stratified_heldout_indices(labels, num_heldout, seed)
    mask = np.zeros(labels.shape[0], dtype=bool)
    mask[heldout] = True
    y = torch.from_numpy(labels)
    train_idx = torch.from_numpy(np.flatnonzero(~mask))
    held_idx = torch.from_numpy(np.flatnonzero(mask))
    return (
        images[train_idx].contiguous(),
        y[train_idx].contiguous(),
        images[held_idx].contiguous(),
        y[held_idx].contiguous(),
    )


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load ``sklearn``'s 8x8 digits with a fixed, stratified train/held-out split.

    The pixel values ``0..16`` are mapped to ``[-1, 1]`` by ``x / 8 - 1``. The split has :data:`NUM_TRAIN` (1400)
    training and :data:`NUM_HELDOUT` (397) held-out images, stratified by class, chosen with a seeded PCG64 generator
    so it is identical on every machine for a given ``seed`` (:func:`stratified_split`). Both parts are returned in
    ascending dataset order.

    Args:
        seed: Seed of the split (keep the default ``0`` to match the shipped checkpoints).

    Returns:
        ``(x_train, y_train, x_heldout, y_heldout)``: ``float32`` images of shape ``(N, 1, 8, 8)`` in ``[-1, 1]``
        and ``int64`` labels of shape ``(N,)``.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.asarray(data.images, dtype=np.float64)
    labels = np.asarray(data.target, dtype=np.int64)
    x = torch.from_numpy((images / 8.0 - 1.0).astype(np.float32)).unsqueeze(1)
    return stratified_split(x, labels, NUM_HELDOUT, seed)


class DigitsClassifier(ModelMixin, ConfigMixin):
    """Small CNN classifier for ``(N, 1, S, S)`` digits in ``[-1, 1]`` (S = ``image_size``: 8 for the sklearn digits,
    12 for the MNIST subset of ``mnist.py``).

    Architecture: ``conv3x3(1->c0) -> conv3x3(c0->c0) -> maxpool2 -> conv3x3(c0->c1) -> conv3x3(c1->c1) -> flatten
    (c1*(S/2)^2) -> linear(feature_dim) -> SiLU -> dropout -> linear(num_classes)``, with SiLU activations and
    GroupNorm after every convolution. :meth:`features` returns the ``feature_dim``-d (64 by default) penultimate
    activations (after the SiLU, before dropout), :meth:`forward` returns the logits.

    Args:
        channels: Output channels of the two convolution stages.
        feature_dim: Size of the penultimate feature layer.
        num_classes: Number of classes.
        dropout: Dropout applied to the features during training.
        norm_groups: Groups of the GroupNorm layers.
        image_size: Height and width S of the (square, even) images.
    """

    @register_to_config
    def __init__(
        self,
        channels: tuple[int, int] = (32, 64),
        feature_dim: int = 64,
        num_classes: int = 10,
        dropout: float = 0.2,
        norm_groups: int = 8,
        image_size: int = 8,
    ) -> None:
        super().__init__()
        if image_size < 2 or image_size % 2:
            raise ValueError(f"`image_size` must be an even integer >= 2; got {image_size!r}.")
        c0, c1 = (int(c) for c in channels)

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(norm_groups, cout), nn.SiLU()]

        self.conv = nn.Sequential(*block(1, c0), *block(c0, c0), nn.MaxPool2d(2), *block(c0, c1), *block(c1, c1))
        self.fc = nn.Linear(c1 * (image_size // 2) ** 2, feature_dim)
        self.feature_dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features.

        Args:
            x: Images of shape ``(N, 1, S, S)`` in ``[-1, 1]``.

        Returns:
            Features of shape ``(N, feature_dim)`` (``(N, 64)`` by default).
        """
        h = self.conv(x.to(self.fc.weight.dtype))
        return F.silu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits.

        Args:
            x: Images of shape ``(N, 1, S, S)`` in ``[-1, 1]``.

        Returns:
            Logits of shape ``(N, num_classes)``.
        """
        return self.head(self.feature_dropout(self.features(x)))


def _to_nchw(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Accept ``(N, 1, S, S)`` / ``(N, S, S)`` / ``(N, S, S, 1)`` tensors or arrays; return float ``(N, 1, S, S)``."""
    t = torch.as_tensor(x)
    if t.ndim == 3:
        t = t.unsqueeze(1)
    elif t.ndim == 4 and t.shape[1] != 1 and t.shape[-1] == 1:
        t = t.permute(0, 3, 1, 2)
    if t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"expected images of shape (N, 1, S, S), got {tuple(t.shape)}")
    return t.float()


@torch.no_grad()
def classifier_features(
    classifier: DigitsClassifier, x: torch.Tensor | np.ndarray, batch_size: int = 1024
) -> torch.Tensor:
    """Penultimate features of ``x`` in eval mode, without gradients, batched.

    Args:
        classifier: A :class:`DigitsClassifier` (put in eval mode; its previous mode is restored afterwards).
        x: Images in ``[-1, 1]``, shape ``(N, 1, S, S)`` (``(N, S, S)`` and channels-last ``(N, S, S, 1)`` are also
            accepted, e.g. a pipeline's ``output_type="np"`` output after ``* 2 - 1``).
        batch_size: Images per forward pass.

    Returns:
        A ``float32`` CPU tensor of shape ``(N, feature_dim)``.
    """
    return _batched(classifier, x, batch_size, features=True)


@torch.no_grad()
def classifier_predict(
    classifier: DigitsClassifier, x: torch.Tensor | np.ndarray, batch_size: int = 1024
) -> torch.Tensor:
    """Predicted classes of ``x`` (argmax of the logits) in eval mode, without gradients, batched.

    Args:
        classifier: A :class:`DigitsClassifier`.
        x: Images in ``[-1, 1]``; same accepted shapes as :func:`classifier_features`.
        batch_size: Images per forward pass.

    Returns:
        An ``int64`` CPU tensor of shape ``(N,)``.
    """
    return _batched(classifier, x, batch_size, features=False).argmax(dim=1)


def _batched(
    classifier: DigitsClassifier, x: torch.Tensor | np.ndarray, batch_size: int, features: bool
) -> torch.Tensor:
    """Run ``classifier.features`` (or the logits) over ``x`` in eval mode, batch by batch."""
    images = _to_nchw(x)
    was_training = classifier.training
    classifier.eval()
    try:
        param = next(classifier.parameters())
        outs = []
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start : start + batch_size].to(device=param.device, dtype=param.dtype)
            out = classifier.features(chunk) if features else classifier(chunk)
            outs.append(out.float().cpu())
        if not outs:
            dim = classifier.config.feature_dim if features else classifier.config.num_classes
            return torch.empty(0, dim)
        return torch.cat(outs)
    finally:
        classifier.train(was_training)
