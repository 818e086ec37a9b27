"""The exact image-like benchmark's model and metrics: exact samples sit at the floor, collapsed ones do not."""

from __future__ import annotations

import image_mixture as im
import torch


def test_digits_mixture_has_the_structure_of_images() -> None:
    model = im.fit_digits_mixture()
    assert model.sample_shape == (1, 8, 8) and len(model.weights) == 10
    evals = torch.linalg.eigvalsh(model.covariances)
    assert float(evals.min()) >= im.REGULARISATION * (1 - 1e-9)  # near-degenerate directions at 2e-3 ...
    assert int((evals < 1.5 * im.REGULARISATION).sum(-1).min()) >= 10  # ... at least 10 per class
    assert 2.0 < float(evals.max()) < 8.0  # ... and a few with variance of order 4


def test_metrics_separate_exact_samples_from_collapsed_ones() -> None:
    model = im.fit_digits_mixture()
    reference = model.sample(4000, torch.Generator().manual_seed(0))
    exact = im.mixture_metrics(model, model.sample(2000, torch.Generator().manual_seed(1)), reference)
    for group, _ in im.DIRECTION_GROUPS:
        assert 0.85 < exact[f"vr_{group}"] < 1.15
    assert exact["tv"] < 0.05 and exact["nonfinite"] == 0
    # shrink every sample towards its component mean along the component's smallest directions: KL and the
    # small-direction variance ratio see it, the weights do not
    x = model.sample(2000, torch.Generator().manual_seed(1)).reshape(2000, -1)
    comp = model.component(x)
    for k in range(10):
        _, evecs = torch.linalg.eigh(model.covariances[k])
        small = evecs[:, :16]
        centred = x[comp == k] - model.means[k]
        x[comp == k] = model.means[k] + centred - 0.7 * (centred @ small) @ small.T
    collapsed = im.mixture_metrics(model, x, reference)
    assert collapsed["kl"] > exact["kl"] + 10 and collapsed["vr_small"] < 0.2
    assert abs(collapsed["tv"] - exact["tv"]) < 0.02
