"""The exact reference model: closed forms checked independently, diffusers model interface, save/load."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_CONFIGS

from mmgibbs import GaussianMixtureDenoiser


def _model(**kwargs) -> GaussianMixtureDenoiser:
    return GaussianMixtureDenoiser.random_anisotropic(6, 3, seed=3, **kwargs)


def test_score_and_hessian_match_autograd_of_log_density() -> None:
    model = _model()
    y = model.sample_noisy(5, 0.4).requires_grad_(True)
    log_p = model.noisy_log_prob(y, 0.4)
    (grad,) = torch.autograd.grad(log_p.sum(), y)
    torch.testing.assert_close(model.score(y.detach(), 0.4), grad)
    # second-order Tweedie: Cov[x|y] = sigma^4 Hess log p~ + sigma^2 I
    y0 = y.detach()[0]
    hess = torch.autograd.functional.hessian(lambda v: model.noisy_log_prob(v[None], 0.4).sum(), y0)
    expected = 0.4**4 * hess + 0.4**2 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(model.posterior_covariance(y0[None], 0.4)[0], expected)


def test_log_density_is_a_normalised_mixture() -> None:
    model = GaussianMixtureDenoiser.paper_toy()
    grid = torch.linspace(-4, 4, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    p = model.log_prob(torch.stack([xx.flatten(), yy.flatten()], -1)).exp()
    assert float(p.sum() * (grid[1] - grid[0]) ** 2) == pytest.approx(1.0, abs=1e-6)


def test_posterior_sampler_has_the_posterior_moments() -> None:
    model = _model()
    y = model.sample_noisy(1, 0.7, torch.Generator().manual_seed(4)).expand(40000, -1)
    x = model.posterior_sample(y, 0.7, torch.Generator().manual_seed(5))
    mean, cov = model.posterior_mean(y[:1], 0.7)[0], model.posterior_covariance(y[:1], 0.7)[0]
    torch.testing.assert_close(x.mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.02, rtol=0)


def test_clean_and_noisy_samples() -> None:
    model = GaussianMixtureDenoiser.paper_toy()
    x = model.sample(20000, torch.Generator().manual_seed(0))
    assert x.shape == (20000, 2) and x.dtype == torch.float64
    counts = torch.bincount(model.component(x), minlength=4).double() / 20000
    torch.testing.assert_close(counts, torch.full((4,), 0.25, dtype=torch.float64), atol=0.015, rtol=0)
    comp = model.component(x)
    for k in range(4):
        torch.testing.assert_close(x[comp == k].var(0), torch.full((2,), 0.04, dtype=torch.float64), atol=4e-3, rtol=0)
    y = model.sample_noisy(20000, 0.5, torch.Generator().manual_seed(1))
    assert float(y.var(0).mean()) == pytest.approx(1.0 + 0.04 + 0.25, rel=0.03)


@pytest.mark.parametrize("family", ["vp", "ve", "edm", "flow"])
def test_forward_returns_the_exact_prediction_for_image_shaped_inputs(family: str) -> None:
    model = GaussianMixtureDenoiser.random_anisotropic(
        12, 2, seed=1, sample_shape=[3, 2, 2], scheduler_config=FAMILY_CONFIGS[family]
    )
    schedule = model.noise_schedule
    t = schedule.inference_timesteps(4)[1]
    x = model.sample(3)
    assert x.shape == (3, 3, 2, 2)
    eps = torch.randn_like(x)
    x_t = schedule.add_noise(x, eps, t)
    out = model(schedule.model_input(x_t, t), t).sample
    assert out.shape == x.shape
    mu = schedule.posterior_mean(out, x_t, t)
    sig = schedule.sigma(t)
    alpha, _ = schedule.coefficients(t, x_t)
    torch.testing.assert_close(mu, model.posterior_mean(x_t / alpha, sig))


def test_component_variance_is_the_per_mode_variance() -> None:
    model = GaussianMixtureDenoiser.paper_toy(std=0.2)
    x = model.sample(20000, torch.Generator().manual_seed(0))
    assert model.component_variance(x) == pytest.approx(0.04, rel=0.05)
    assert model.component_variance(0.5 * x) == pytest.approx(0.01, rel=0.05)  # shrunk modes are seen as such


def test_save_and_load_round_trip(tmp_path) -> None:
    model = _model(scheduler_config={"_class_name": "DDPMScheduler", "prediction_type": "v_prediction"})
    model.save_pretrained(tmp_path)
    loaded = GaussianMixtureDenoiser.from_pretrained(tmp_path)
    for name in ("means", "covariances", "weights"):
        assert torch.equal(getattr(loaded, name), getattr(model, name))
        assert getattr(loaded, name).dtype == torch.float64
    assert loaded.noise_schedule.prediction_type == "v_prediction"
    x_t, t = torch.randn(4, 6, dtype=torch.float64), torch.tensor(500)
    torch.testing.assert_close(loaded(x_t, t).sample, model(x_t, t).sample)


def test_invalid_components_are_refused() -> None:
    with pytest.raises(ValueError, match="covariances"):
        GaussianMixtureDenoiser.from_components([[0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(torch.linalg.LinAlgError):
        GaussianMixtureDenoiser.from_components([[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(ValueError, match="weights"):
        GaussianMixtureDenoiser.from_components([[0.0], [1.0]], [[[1.0]], [[1.0]]], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="sample_shape"):
        GaussianMixtureDenoiser(num_components=1, dim=4, sample_shape=[3])


def test_forward_and_mean_skip_the_covariance_path(monkeypatch) -> None:
    """The mean needs responsibilities and component means only: forward never builds posterior covariances (an
    (N, K, d, d) tensor was 1.3 GB per call at d = 64, N = 4000), and its result is the exact prediction."""
    model = _model()
    x_t, t = model.sample_noisy(7, 0.6, torch.Generator().manual_seed(2)), torch.tensor(400)
    expected = model(x_t, t).sample

    def refuse(*args, **kwargs):
        raise AssertionError("the covariance path was called")

    monkeypatch.setattr(GaussianMixtureDenoiser, "component_posterior_covariances", refuse)
    torch.testing.assert_close(model(x_t, t).sample, expected, rtol=0, atol=0)
    model.posterior_mean(x_t, 0.6)
    model.score(x_t, 0.6)
    with pytest.raises(AssertionError, match="covariance path"):
        model.posterior_covariance(x_t, 0.6)


def test_posterior_covariance_is_the_mixture_of_component_moments() -> None:
    """Cov[x | y] = sum_k pi_k (C'_k + m'_k m'_k^T) - mu mu^T, written out with the (N, K, d, d) terms."""
    model = _model()
    y = model.sample_noisy(5, 0.5, torch.Generator().manual_seed(3))
    _, resp, post_mean, _ = model._posterior_terms(y, 0.5)
    comp = model.component_posterior_covariances(0.5)
    mean = (resp.unsqueeze(-1) * post_mean).sum(1)
    second = (resp[..., None, None] * (comp + post_mean.unsqueeze(-1) * post_mean.unsqueeze(-2))).sum(1)
    torch.testing.assert_close(model.posterior_covariance(y, 0.5), second - mean.unsqueeze(-1) * mean.unsqueeze(-2))


def test_sampling_gathers_the_cholesky_factors_in_bounded_chunks(monkeypatch) -> None:
    """``sample`` once gathered an (N, d, d) stack of Cholesky factors (10 GB for 20000 draws at d = 256); in
    chunks of SAMPLE_GATHER_NUMBERS numbers it draws the same samples bit for bit."""
    import mmgibbs.reference as reference

    g = torch.Generator().manual_seed(0)
    d, n = 6, 50
    a = torch.randn(3, d, d, generator=g, dtype=torch.float64)
    model = GaussianMixtureDenoiser.from_components(torch.randn(3, d, generator=g, dtype=torch.float64),
                                                    a @ a.mT + torch.eye(d, dtype=torch.float64))  # fmt: skip
    whole = model.sample(n, torch.Generator().manual_seed(1))
    monkeypatch.setattr(reference, "SAMPLE_GATHER_NUMBERS", 7 * d * d)  # 7 rows a chunk
    assert torch.equal(model.sample(n, torch.Generator().manual_seed(1)), whole)
