"""Denoising moments: exact against the Gaussian-mixture ground truth, estimators unbiased, UNet Jacobians agree."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILY_CONFIGS
from diffusers import DDPMScheduler

from mmgibbs import GaussianMixtureDenoiser, NoiseSchedule, denoising_moments
from mmgibbs.moments import hutchinson_diagonal, isotropic_variance

SIGMAS = (0.05, 0.3, 1.0, 3.0)


def _mixture(dim: int, family: str) -> GaussianMixtureDenoiser:
    if dim == 2:
        return GaussianMixtureDenoiser.from_components(
            [[-1.0, 0.5], [1.2, -0.3], [0.0, 1.5]],
            [[[0.3, 0.2], [0.2, 0.25]], [[0.01, 0.0], [0.0, 0.4]], [[0.05, -0.02], [-0.02, 0.05]]],
            weights=[0.5, 0.3, 0.2],
            scheduler_config=FAMILY_CONFIGS[family],
        )
    return GaussianMixtureDenoiser.random_anisotropic(dim, 4, seed=dim, scheduler_config=FAMILY_CONFIGS[family])


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", ["vp", "ve", "edm", "flow"])
@pytest.mark.parametrize("dim", [2, 10])
def test_tweedie_moments_are_exact(family: str, dim: int) -> None:
    """mu = E[x|y] and Sigma = sigma^2 d mu/dy = Cov[x|y], computed from the model's *prediction*."""
    model = _mixture(dim, family)
    schedule = model.noise_schedule
    for sigma in SIGMAS:
        t = schedule.timestep_for_sigma(sigma)
        sig = float(schedule.sigma(t))  # VP: the nearest training step's sigma
        y = torch.cat([model.sample_noisy(6, sig), 3 * torch.randn(2, dim, dtype=torch.float64)])  # + off-support
        moments = denoising_moments(schedule.denoiser(model, t), y, sig, covariance="full", max_full_dim=16)
        assert _rel_err(moments.mu, model.posterior_mean(y, sig)) <= 1e-5
        exact_cov = model.posterior_covariance(y, sig)
        assert _rel_err(moments.variance, exact_cov) <= 1e-5, (family, dim, sigma)
        exact_diag = denoising_moments(schedule.denoiser(model, t), y, sig, covariance="exact_diagonal")
        assert _rel_err(exact_diag.variance, torch.diagonal(exact_cov, dim1=-2, dim2=-1)) <= 1e-5


def test_tweedie_mean_is_score_formula() -> None:
    model = _mixture(2, "ve")
    y = model.sample_noisy(16, 0.4)
    torch.testing.assert_close(model.posterior_mean(y, 0.4), y + 0.4**2 * model.score(y, 0.4))


def test_forward_and_reverse_mode_agree_on_the_mixture() -> None:
    model = _mixture(10, "vp")
    t = model.noise_schedule.timestep_for_sigma(0.5)
    sig = model.noise_schedule.sigma(t)
    y = model.sample_noisy(5, float(sig))
    den = model.noise_schedule.denoiser(model, t)
    rev = denoising_moments(den, y, sig, covariance="full", jacobian="reverse")
    fwd = denoising_moments(den, y, sig, covariance="full", jacobian="forward")
    torch.testing.assert_close(rev.variance, fwd.variance, rtol=1e-9, atol=1e-12)
    assert (rev.num_forward, rev.num_backward, rev.num_jvp) == (1, 10, 0)
    assert (fwd.num_backward, fwd.num_jvp) == (0, 10)


def test_hutchinson_is_unbiased_and_error_falls_like_inverse_sqrt_probes() -> None:
    model = _mixture(10, "ve")
    sig = 0.6
    y = model.sample_noisy(8, sig, torch.Generator().manual_seed(1))
    den = model.noise_schedule.denoiser(model, sig)
    exact = torch.diagonal(model.posterior_covariance(y, sig), dim1=-2, dim2=-1)
    estimates = {}
    for probes in (1, 4, 16):
        draws = torch.stack(
            [
                denoising_moments(
                    den, y, sig, "diagonal", num_probes=probes, generator=torch.Generator().manual_seed(s)
                ).variance
                for s in range(200)
            ]
        )
        estimates[probes] = draws
    # unbiased: the mean over 200 seeds is within 3 standard errors of the exact diagonal, for almost every entry
    draws = estimates[1]
    z = (draws.mean(0) - exact) / (draws.std(0) / math.sqrt(len(draws)) + 1e-12)
    assert (z.abs() < 3).float().mean() > 0.97, z.abs().max()
    # root-mean-square error falls like 1 / sqrt(num_probes): x4 probes halves it
    rmse = {p: float((d - exact).pow(2).mean().sqrt()) for p, d in estimates.items()}
    assert rmse[4] / rmse[1] == pytest.approx(0.5, rel=0.2)
    assert rmse[16] / rmse[4] == pytest.approx(0.5, rel=0.2)


def test_hutchinson_estimator_on_a_known_matrix() -> None:
    a = torch.randn(6, 6, dtype=torch.float64)
    like = torch.zeros(1, 6, dtype=torch.float64)
    est = hutchinson_diagonal(lambda v: v @ a.T, like, 20000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(est[0], a.diagonal(), atol=0.1, rtol=0)


def test_isotropic_matches_mean_trace_of_posterior_covariance() -> None:
    """Per sample, v_i = sigma^2 (1 - ||eps_hat_i||^2 / d) has mean E[tr Cov[x|y]] / d over y ~ p~ (law of total
    covariance); at d = 32 and sigma = 0.2 the per-sample estimate is never clamped, so its batch mean tests that."""
    model = _mixture(32, "ve")
    sig = 0.2
    y = model.sample_noisy(8000, sig, torch.Generator().manual_seed(2))
    mu = model.posterior_mean(y, sig)
    v = isotropic_variance(y, mu, torch.full((len(y),), sig, dtype=torch.float64))
    per_sample = torch.diagonal(model.posterior_covariance(y[:1000], sig), dim1=-2, dim2=-1).mean(-1)
    assert float(((v == 0) | (v == sig**2)).double().mean()) < 0.01
    se = float(per_sample.std() / math.sqrt(len(per_sample))) + float(v.std() / math.sqrt(len(v)))
    assert float(v.mean()) == pytest.approx(float(per_sample.mean()), abs=4 * se)


def test_isotropic_variance_of_a_sample_depends_on_that_sample_alone() -> None:
    """No coupling through the batch: each v_i is what sample i gives alone, and a NaN stays in its sample."""
    model = _mixture(8, "ve")
    y = model.sample_noisy(6, 0.5, torch.Generator().manual_seed(0))
    mu = model.posterior_mean(y, 0.5)
    sig = torch.full((6,), 0.5, dtype=torch.float64)
    v = isotropic_variance(y, mu, sig)
    alone = torch.cat([isotropic_variance(y[i : i + 1], mu[i : i + 1], sig[:1]) for i in range(6)])
    torch.testing.assert_close(v, alone, rtol=0, atol=0)
    y_nan = y.clone()
    y_nan[2, 3] = float("nan")
    v_nan = isotropic_variance(y_nan, mu, sig)
    assert torch.isnan(v_nan[2]) and torch.equal(v_nan[[0, 1, 3, 4, 5]], v[[0, 1, 3, 4, 5]])
    y_inf = y.clone()
    y_inf[4, 0] = float("inf")
    assert torch.equal(isotropic_variance(y_inf, mu, sig)[:4], v[:4])


def test_variance_bounds() -> None:
    y = torch.randn(4, 3, dtype=torch.float64) * 10
    sig = torch.full((4,), 2.0, dtype=torch.float64)
    # a useless denoiser (mu = 0) gives a negative Analytic-DPM estimate: clamped to 0
    assert torch.all(isotropic_variance(y, torch.zeros_like(y), sig) == 0)
    # mu = y (no denoising) gives sigma^2; with a data bound b it is shrunk towards v_0 = b sigma^2 / (b + sigma^2)
    # with weight w = v_0^2 / (v_0^2 + 2 sigma^4 / d) (d = 3 here) and clamped by the bound
    assert torch.allclose(isotropic_variance(y, y, sig), torch.full((4,), 4.0, dtype=torch.float64))
    v0, w = 0.8, 0.64 / (0.64 + 2 * 16 / 3)
    expected = torch.full((4,), w * 4.0 + (1 - w) * v0, dtype=torch.float64)
    torch.testing.assert_close(isotropic_variance(y, y, sig, variance_bound=1.0), expected)
    big = torch.randn(4, 100000, dtype=torch.float64)  # d large: the sample's own estimate, clamped by the bound
    torch.testing.assert_close(
        isotropic_variance(big, big, sig, variance_bound=1.0), torch.ones(4, dtype=torch.float64)
    )
    moments = denoising_moments(lambda v: 3 * v, y, 2.0, "full", variance_bound=1.0)  # Sigma = 12 I -> 1
    torch.testing.assert_close(moments.variance, torch.eye(3, dtype=torch.float64).expand(4, 3, 3))
    moments = denoising_moments(lambda v: -v, y, 2.0, "diagonal")  # negative Jacobian -> 0
    assert torch.all(moments.variance == 0)


def test_isotropic_estimate_is_shrunk_not_zero_in_low_dimension() -> None:
    """Issue 16: at d = 64 the per-sample estimate's noise (sigma^2 sqrt(2 / d)) swamps the posterior variance at
    sigma >= 1, and clamped at 0 it was a mean-only step for half the samples. With a bound it is never 0 and stays
    within [0, min(sigma^2, bound)]; it follows the sample's own estimate where that is precise."""
    g = torch.Generator().manual_seed(0)
    for sigma in (0.3, 1.0, 4.0, 60.0):
        sig = torch.full((2000,), sigma, dtype=torch.float64)
        x = torch.randn(2000, 64, generator=g, dtype=torch.float64) * 0.5
        y = x + sigma * torch.randn(2000, 64, generator=g, dtype=torch.float64)
        mu = (
            y * 0.25 / (0.25 + sigma**2)
        )  # the exact denoiser of N(0, 0.25 I): posterior variance 0.25 s^2 / (0.25 + s^2)
        v = isotropic_variance(y, mu, sig, variance_bound=1.0)
        raw = isotropic_variance(y, mu, sig, variance_bound=None)
        assert torch.all(v > 0) and torch.all(v <= min(1.0, sigma**2))
        if sigma >= 4.0:
            assert (raw == 0).double().mean() > 0.2  # the unshrunk estimate: a coin flip between 0 and the bound
    small = torch.full((2000,), 0.05, dtype=torch.float64)
    y = torch.randn(2000, 64, generator=g, dtype=torch.float64) * 0.05
    torch.testing.assert_close(  # sigma small: w = 0.97 here, within 5% of the sample's own estimate
        isotropic_variance(y, 0.5 * y, small, variance_bound=1.0),
        isotropic_variance(y, 0.5 * y, small, variance_bound=None),
        rtol=0.05,
        atol=0,
    )


def test_full_covariance_is_symmetrised_and_psd() -> None:
    a = torch.randn(5, 5, dtype=torch.float64)
    moments = denoising_moments(lambda v: v @ a.T, torch.randn(3, 5, dtype=torch.float64), 0.5, "full")
    cov = moments.variance
    torch.testing.assert_close(cov, cov.transpose(-1, -2))
    assert torch.linalg.eigvalsh(cov).min() >= -1e-12
    sym = 0.5**2 * 0.5 * (a + a.T)
    evals, evecs = torch.linalg.eigh(sym)
    torch.testing.assert_close(cov[0], evecs @ torch.diag(evals.clamp(min=0)) @ evecs.T)


def test_sampling_from_the_moments_has_the_right_covariance() -> None:
    cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    moments = denoising_moments(lambda v: v @ cov.T, torch.zeros(20000, 2, dtype=torch.float64), 1.0, "full")
    x = moments.sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.03, rtol=0)
    diag = denoising_moments(lambda v: 2 * v, torch.zeros(20000, 3, dtype=torch.float32), 0.5, "diagonal")
    assert diag.sample().dtype == torch.float32
    torch.testing.assert_close(diag.sample().var(0), torch.full((3,), 0.5), atol=0.03, rtol=0)


def test_clear_errors() -> None:
    y = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="`covariance` must be one of 'none', 'isotropic'"):
        denoising_moments(lambda v: v, y, 1.0, "low_rank")
    with pytest.raises(ValueError, match="`jacobian` must be one of"):
        denoising_moments(lambda v: v, y, 1.0, "full", jacobian="symbolic")
    with pytest.raises(ValueError, match="`num_probes` must be a positive integer"):
        denoising_moments(lambda v: v, y, 1.0, "diagonal", num_probes=0)
    with pytest.raises(ValueError, match=r"max_full_dim=2.*'diagonal'"):
        denoising_moments(lambda v: v, y, 1.0, "full", max_full_dim=2)
    with pytest.raises(ValueError, match="`sigma` must be positive and finite"):
        denoising_moments(lambda v: v, y, float("inf"), "none")
    outside_torch = lambda v: torch.from_numpy(v.detach().numpy() * 2)  # noqa: E731
    with pytest.raises(RuntimeError, match=r"reverse: .*; forward: .*; finite_difference: "):
        denoising_moments(lambda v: outside_torch(v).half(), y, 1.0, "diagonal")
    with pytest.warns(UserWarning, match=r"uses finite_difference Jacobian products because reverse: .*forward: "):
        fallback = denoising_moments(outside_torch, y, 1.0, "diagonal")  # J = 2 I, by finite differences
    torch.testing.assert_close(fallback.variance, torch.full_like(y, 2.0))


def test_moments_enable_grad_inside_no_grad() -> None:
    model = _mixture(2, "ve")
    y = model.sample_noisy(3, 0.3)
    with torch.no_grad():
        moments = denoising_moments(model.noise_schedule.denoiser(model, 0.3), y, 0.3, "full")
    torch.testing.assert_close(moments.variance, model.posterior_covariance(y, 0.3))


# --------------------------------------------------------------------------------------------- real UNets
@pytest.fixture(scope="module")
def unet_denoiser():
    from tiny_pipelines import tiny_unet2d

    unet = tiny_unet2d(attention=True).double()
    schedule = NoiseSchedule.from_config(DDPMScheduler().config)
    t = torch.tensor(250)
    return unet, schedule, t


def test_unet_jacobian_reverse_forward_and_finite_differences_agree(unet_denoiser) -> None:
    unet, schedule, t = unet_denoiser
    assert any("Attn" in type(b).__name__ for b in unet.down_blocks)
    den = schedule.denoiser(unet, t)
    sig = schedule.sigma(t)
    y = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    rev = denoising_moments(den, y, sig, "full", jacobian="reverse")
    fwd = denoising_moments(den, y, sig, "full", jacobian="forward")
    torch.testing.assert_close(rev.mu, fwd.mu)
    torch.testing.assert_close(rev.variance, fwd.variance, rtol=1e-8, atol=1e-10)
    # central finite differences of the Jacobian, columns j = 0..63
    h, d = 1e-5, 64
    jac = torch.empty(2, d, d, dtype=torch.float64)
    with torch.no_grad():
        for j in range(d):
            e = torch.zeros(2, d, dtype=torch.float64)
            e[:, j] = h
            e = e.reshape(y.shape)
            jac[:, :, j] = ((den(y + e) - den(y - e)) / (2 * h)).reshape(2, d)
    exact_diag = denoising_moments(den, y, sig, "exact_diagonal", jacobian="reverse").variance.reshape(2, d)
    torch.testing.assert_close(exact_diag, sig**2 * torch.diagonal(jac, dim1=-2, dim2=-1), rtol=1e-5, atol=1e-9)
    # the full covariance is the PSD projection of sigma^2 (J + J^T)/2 of the finite-difference Jacobian
    sym = sig**2 * 0.5 * (jac + jac.transpose(-1, -2))
    evals, evecs = torch.linalg.eigh(sym)
    projected = evecs @ torch.diag_embed(evals.clamp(min=0)) @ evecs.transpose(-1, -2)
    torch.testing.assert_close(rev.variance, projected, rtol=1e-5, atol=1e-8)


def test_unet_hutchinson_modes_agree_for_same_probes(unet_denoiser) -> None:
    unet, schedule, t = unet_denoiser
    den = schedule.denoiser(unet, t)
    y = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    sig = schedule.sigma(t)
    out = {}
    for mode in ("reverse", "forward", "auto"):
        out[mode] = denoising_moments(den, y, sig, "diagonal", 3, torch.Generator().manual_seed(7), jacobian=mode)
    # v * J^T v and v * J v differ for a non-symmetric learned Jacobian but estimate the same diagonal
    torch.testing.assert_close(out["auto"].variance, out["reverse"].variance)
    assert out["reverse"].num_backward == 3 and out["forward"].num_jvp == 3
    exact = denoising_moments(den, y, sig, "exact_diagonal").variance
    for mode in ("reverse", "forward"):
        assert float((out[mode].variance - exact).abs().mean()) < float(exact.abs().mean()) * 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_give_float32_moments(unet_denoiser, dtype: torch.dtype) -> None:
    unet, schedule, t = unet_denoiser
    half = unet.to(dtype)
    try:
        den = schedule.denoiser(half, t)
        y = torch.randn(2, 1, 8, 8)
        moments = denoising_moments(den, y, schedule.sigma(t), "diagonal", 2, jacobian="reverse")
        assert moments.mu.dtype == torch.float32 and moments.variance.dtype == torch.float32
        assert torch.isfinite(moments.variance).all()
        ref = denoising_moments(schedule.denoiser(unet.double(), t), y.double(), schedule.sigma(t), "none")
        assert float((moments.mu.double() - ref.mu).abs().max()) < 0.1
    finally:
        unet.double()


def test_finite_difference_products_match_autodiff() -> None:
    model = _mixture(10, "ve")
    sig = 0.5
    y = model.sample_noisy(6, sig, torch.Generator().manual_seed(3))
    den = model.noise_schedule.denoiser(model, sig)
    exact = denoising_moments(den, y, sig, "full", jacobian="reverse")
    fd = denoising_moments(den, y, sig, "full", jacobian="finite_difference")
    assert _rel_err(fd.variance, exact.variance) < 0.05
    assert (fd.num_forward, fd.num_backward, fd.num_jvp) == (11, 0, 0)  # one forward per product, plus mu
    diag = denoising_moments(den, y, sig, "diagonal", 2, torch.Generator().manual_seed(0), "finite_difference")
    assert diag.num_forward == 3


@pytest.mark.parametrize("jacobian", ["reverse", "forward", "finite_difference"])
def test_projection_draw_has_covariance_sigma_j(jacobian: str) -> None:
    """For Gaussian data N(m, C), J = C (C + sigma^2 I)^-1 everywhere, so sigma J z ~ N(0, sigma^2 J J^T) = N(0,
    Sigma J); on a subspace at small noise (J ~ a projection) that is Sigma itself."""
    stds = torch.tensor([1.0, 0.8, 0.5, 1e-3, 1e-3], dtype=torch.float64)
    model = GaussianMixtureDenoiser.from_components(
        [[0.3, -0.2, 0.1, 0.0, 0.0]], torch.diag(stds**2)[None], scheduler_config=FAMILY_CONFIGS["ve"]
    )
    sig = 0.05
    y = model.sample_noisy(1, sig).expand(20000, -1)
    den = model.noise_schedule.denoiser(model, sig)
    moments = denoising_moments(
        den, y, sig, "projection", generator=torch.Generator().manual_seed(1), jacobian=jacobian
    )
    x = moments.sample()
    exact_cov = model.posterior_covariance(y[:1], sig)[0]
    jac = torch.diag(stds**2 / (stds**2 + sig**2))
    assert torch.equal(moments.sample(), x)  # one draw, made with the moments
    torch.testing.assert_close(x.mean(0), moments.mu[0], atol=3e-4, rtol=0)
    tol = 0.05 if jacobian == "finite_difference" else 0.03
    torch.testing.assert_close(torch.cov(x.T), exact_cov @ jac, atol=tol * sig**2, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), exact_cov, atol=tol * sig**2, rtol=0)  # J is nearly a projection
    with pytest.raises(ValueError, match="use `sample"):
        moments.scale(torch.zeros_like(y))
