"""The sample-quality metrics against their definitions, written out directly on small sets."""

from __future__ import annotations

import pytest
import torch

from mmgibbs.metrics import mmd2, reference_bandwidth


def _sets() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(50, 3, generator=g, dtype=torch.float64), 1.5 * torch.randn(40, 3, generator=g).double() + 0.3


def test_reference_bandwidth_is_the_mean_squared_distance_over_distinct_pairs() -> None:
    _, y = _sets()
    d2 = ((y[:, None] - y[None]) ** 2).sum(-1)
    n = len(y)
    assert reference_bandwidth(y) == pytest.approx(float(d2.sum() / (n * (n - 1))), rel=1e-12)


def test_mmd2_is_the_unbiased_statistic_of_the_five_bandwidth_kernel() -> None:
    x, y = _sets()
    h0 = 0.7

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = ((a[:, None] - b[None]) ** 2).sum(-1)
        return sum(torch.exp(-d2 / (c * h0)) for c in (0.25, 0.5, 1.0, 2.0, 4.0))

    def off_diagonal_mean(m: torch.Tensor) -> torch.Tensor:
        return (m.sum() - m.diagonal().sum()) / (len(m) * (len(m) - 1))

    expected = off_diagonal_mean(k(x, x)) + off_diagonal_mean(k(y, y)) - 2 * k(x, y).mean()
    assert mmd2(x, y, h0) == pytest.approx(float(expected), rel=1e-10, abs=1e-14)
    assert mmd2(x, y) == pytest.approx(mmd2(x, y, reference_bandwidth(y)), rel=1e-12)
