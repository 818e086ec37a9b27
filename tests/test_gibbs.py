"""The kernel's pieces in float64: the transition share and the conditioning on a known part (inpainting)."""

from __future__ import annotations

import pytest
import torch

from mmgibbs.gibbs import condition_on_known, kept_noise_share
from mmgibbs.moments import DenoisingMoments


def _gaussian(d: int = 5, n: int = 1):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    mu = torch.randn(n, d, generator=g, dtype=torch.float64)
    keep = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64).expand(n, d)
    known = torch.randn(n, d, generator=g, dtype=torch.float64)
    moments = DenoisingMoments(mu=mu, sigma=torch.ones(n, dtype=torch.float64), covariance="full")
    moments.variance = cov.expand(n, d, d)
    return moments, cov, keep, known


def test_full_covariance_is_conditioned_exactly_on_the_known_part() -> None:
    """E[x_U | x_K] = mu_U + S_UK S_KK^-1 (x_K - mu_K) and Cov = S_UU - S_UK S_KK^-1 S_KU (Matheron's rule)."""
    moments, cov, keep, known = _gaussian()
    k, u = keep[0].bool(), ~keep[0].bool()
    s_kk, s_uk = cov[k][:, k], cov[u][:, k]
    expected_mean = moments.mu[0, u] + s_uk @ torch.linalg.solve(s_kk, known[0, k] - moments.mu[0, k])
    mean = condition_on_known(moments, moments.mu, (known, keep))
    torch.testing.assert_close(mean[0, u], expected_mean)
    assert torch.equal(mean[0, k], known[0, k])
    draws = condition_on_known(moments, moments.sample(torch.Generator().manual_seed(1)).expand(1, -1), (known, keep))
    assert torch.equal(draws[0, k], known[0, k])
    # Monte Carlo: the conditioned draws have the Schur complement as covariance
    n = 200000
    many, _, keep_n, known_n = _gaussian(n=n)
    many.mu = moments.mu.expand(n, -1).clone()
    known_n = known[0].expand(n, -1)
    x = condition_on_known(many, many.sample(torch.Generator().manual_seed(2)), (known_n, keep_n))
    schur = cov[u][:, u] - s_uk @ torch.linalg.solve(s_kk, s_uk.T)
    torch.testing.assert_close(torch.cov(x[:, u].T), schur, atol=0.01, rtol=0.02)
    torch.testing.assert_close(x[:, u].mean(0), expected_mean, atol=0.01, rtol=0)


@pytest.mark.parametrize("covariance", ["none", "isotropic", "diagonal"])
def test_without_cross_covariance_conditioning_is_replacement(covariance: str) -> None:
    moments, _, keep, known = _gaussian()
    moments.covariance = covariance
    x = torch.randn_like(moments.mu)
    torch.testing.assert_close(condition_on_known(moments, x, (known, keep)), torch.lerp(x, known, keep))


def test_kept_noise_share() -> None:
    assert kept_noise_share(2.0, 1.0, "gibbs") == 0.0
    assert kept_noise_share(2.0, 2.0) == 0.0  # within a level: fresh noise
    assert kept_noise_share(2.0, 1.0, eta=1.0) == pytest.approx(0.5)  # DDPM: c = sigma_s / sigma_t
    assert kept_noise_share(2.0, 1.0, eta=0.0) == 1.0  # DDIM keeps all of it
