"""Energy-parametrised denoisers (``mmgibbs.energy``): the exact energy of a Gaussian mixture against its closed
forms in float64 (Tweedie mean, Hessian-vector products, full covariance, one Gibbs step's moments), the two energy
forms of the network wrapper against finite differences, sampling through the pipeline and the kernel with every
covariance, and the errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from tiny_pipelines import count_calls, tiny_unet2d

from mmgibbs import (
    COVARIANCES,
    GaussianMixtureDenoiser,
    GaussianMixtureEnergy,
    MMGibbsScheduler,
    MomentMatchingGibbsPipeline,
    NetworkEnergy,
    gibbs,
    make_estimator,
)
from mmgibbs.covariances import CALIBRATED_COVARIANCES
from mmgibbs.energy import energy_score
from mmgibbs.moments import _linearise, jacobian_matrix

SIGMA = 0.5
VE = {"noise_family": "ve", "prediction_type": "epsilon", "schedule": "single_level", "sigma": SIGMA}


def _single_level(**kwargs) -> MMGibbsScheduler:
    return MMGibbsScheduler(**VE, **kwargs)


@pytest.fixture(scope="module")
def exact():
    """A 3-component anisotropic mixture in d = 4 and its exact energy, at one VE level sigma = 0.5."""
    scheduler = _single_level()
    mixture = GaussianMixtureDenoiser.random_anisotropic(
        4, 3, seed=3, spread=1.0, scheduler_config=dict(scheduler.config)
    )
    energy = GaussianMixtureEnergy.from_mixture(mixture)
    y = mixture.sample_noisy(6, SIGMA, torch.Generator().manual_seed(0))
    t = scheduler.noise_schedule.timestep_for_sigma(SIGMA)
    return scheduler, mixture, energy, y, scheduler.noise_schedule.denoiser(energy, t)


def test_tweedie_mean_of_the_exact_energy(exact) -> None:
    _, mixture, _, y, denoiser = exact
    mu = denoiser(y)
    assert mu.dtype == torch.float64
    torch.testing.assert_close(mu, mixture.posterior_mean(y, SIGMA), rtol=0, atol=1e-12)


def test_hessian_vector_products_are_the_analytic_ones(exact) -> None:
    """The kernel's reverse-mode product through the energy's score is J v, J = I - sigma^2 Hess E; analytically
    J = Cov[x | y] / sigma^2 (symmetric: J^T v = J v)."""
    _, mixture, energy, y, denoiser = exact
    v = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lin = _linearise(denoiser, y, "reverse", torch.full((len(y),), SIGMA, dtype=torch.float64))
    cov = mixture.posterior_covariance(y, SIGMA)
    analytic = torch.einsum("nij,nj->ni", cov, v) / SIGMA**2
    torch.testing.assert_close(lin.product(v), analytic, rtol=0, atol=1e-11)
    # the Hessian of E itself, by double backward of energy_score: (v - J v) / sigma^2
    x = y.clone().requires_grad_(True)
    t = torch.full((len(y),), SIGMA, dtype=torch.float64)
    (hv,) = torch.autograd.grad(energy_score(energy, x, t, create_graph=True), x, v)
    torch.testing.assert_close(hv, (v - analytic) / SIGMA**2, rtol=0, atol=1e-10)
    assert lin.num_forward == 1 and lin.num_backward == 1


def test_full_covariance_is_the_analytic_posterior_covariance(exact) -> None:
    """J from d Hessian-vector products is symmetric to round-off (the symmetrisation in ``full`` changes nothing)
    and sigma^2 J is the exact Cov[x | y]; no clamp acts on the exact energy."""
    _, mixture, _, y, denoiser = exact
    lin = _linearise(denoiser, y, "reverse", torch.full((len(y),), SIGMA, dtype=torch.float64))
    jac = jacobian_matrix(lin.product, y, lin.transpose)
    assert float((jac - jac.mT).norm() / jac.norm()) < 1e-13
    moments = make_estimator("full", jacobian="reverse").moments(denoiser, y, SIGMA)
    cov = mixture.posterior_covariance(y, SIGMA)
    torch.testing.assert_close(moments.variance, cov, rtol=0, atol=1e-12)
    torch.testing.assert_close(SIGMA**2 * jac, cov, rtol=0, atol=1e-12)
    assert moments.num_forward == 1 and moments.num_backward == 4


@pytest.mark.parametrize("path", ["kernel", "pipeline"])
def test_one_gibbs_step_draws_the_exact_posterior_moments(exact, path: str) -> None:
    """One step at one level from a fixed y, 4000 draws: mean and covariance match E[x | y] and Cov[x | y] within
    their Monte Carlo error (the covariance's entries ~ 1/sqrt(4000) of the variances)."""
    scheduler, mixture, energy, y, denoiser = exact
    n = 4000
    ys = y[2:3].expand(n, -1).contiguous()
    g = torch.Generator().manual_seed(5)
    if path == "kernel":
        x = gibbs.sample(lambda v, i: denoiser(v), [SIGMA], ys, make_estimator("full"), generator=g).sample
    else:
        pipe = MomentMatchingGibbsPipeline(unet=energy, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(latents=ys, num_inference_steps=1, covariance="full", generator=g, output_type="pt")
        assert (out.num_forward, out.num_backward) == (1, 4)
        x = out.images
    mean, cov = mixture.posterior_mean(y[2:3], SIGMA)[0], mixture.posterior_covariance(y[2:3], SIGMA)[0]
    scale = cov.diagonal().sqrt()
    assert torch.all((x.mean(0) - mean).abs() < 5 * scale / n**0.5)
    err = (torch.cov(x.T) - cov) / (scale[:, None] * scale[None, :])
    assert float(err.abs().max()) < 6 / n**0.5


@pytest.fixture(scope="module")
def tiny_network() -> torch.nn.Module:
    return tiny_unet2d(sample_size=4, seed=1).double()


@pytest.mark.parametrize("form", ["sum", "quadratic"])
def test_energy_forms_give_their_score(tiny_network, form: str) -> None:
    """The score of both wrapper forms: autograd's grad E against central differences of E, and against the closed
    form -s J_f^T 1 (sum) / -s ((y - f) - J_f^T (y - f)) (quadratic)."""
    model = NetworkEnergy.from_network(tiny_network, form, scale=3.0)
    assert model.sample_shape == (1, 4, 4)
    y = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = torch.full((2,), 10.0, dtype=torch.float64)
    grad = energy_score(model, y, t)
    h, fd = 1e-5, torch.zeros_like(y)
    with torch.no_grad():
        for i in range(16):
            e = torch.zeros(16, dtype=torch.float64)
            e[i] = h
            e = e.reshape(1, 1, 4, 4)
            fd.view(2, 16)[:, i] = (model(y + e, t).energy - model(y - e, t).energy) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)
    x = y.clone().requires_grad_(True)
    f = tiny_network(x, t).sample
    weight = torch.ones_like(f) if form == "sum" else (y - f).detach()
    (jt,) = torch.autograd.grad(f, x, weight)
    closed = 3.0 * (jt if form == "sum" else (y - f.detach()) - jt)
    torch.testing.assert_close(grad, closed, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def tiny_energy() -> NetworkEnergy:
    return NetworkEnergy.from_network(tiny_unet2d(sample_size=4, seed=1), "quadratic", scale=1.0)


@pytest.mark.parametrize("covariance", [c for c in COVARIANCES if c not in CALIBRATED_COVARIANCES])
@pytest.mark.parametrize("schedule", ["single_level", "annealed"])
def test_every_covariance_samples_an_energy_model(tiny_energy, covariance: str, schedule: str) -> None:
    """Through the pipeline, single level (VE) and annealed (VP), with its cost: a counted forward is one energy
    evaluation (network forward + backward), a counted backward one Hessian-vector product."""
    scheduler = _single_level() if schedule == "single_level" else MMGibbsScheduler.from_config(DDPMScheduler().config)
    pipe = MomentMatchingGibbsPipeline(unet=tiny_energy, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    with count_calls(tiny_energy.network) as calls:
        out = pipe(
            batch_size=2,
            num_inference_steps=2,
            covariance=covariance,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        )
    assert out.images.shape == (2, 1, 4, 4) and torch.isfinite(out.images).all()
    products = {"diagonal": 1, "projection": 1, "full": 16, "exact_diagonal": 16}.get(covariance, 0)
    assert (out.num_forward, out.num_backward, out.num_jvp) == (2, 2 * products, 0)
    assert len(calls) == 2  # one network forward per level; the products differentiate the kept graph


def test_calibrated_covariance_of_an_energy_model(tiny_energy) -> None:
    pipe = MomentMatchingGibbsPipeline(unet=tiny_energy, scheduler=_single_level(covariance="calibrated"))
    pipe.set_progress_bar_config(disable=True)
    x = torch.randn(32, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    pipe.calibrate_covariance(1, samples=x, num_clusters=2, rank=2)
    out = pipe(batch_size=2, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 1, 4, 4) and out.num_forward == 2


def test_finite_difference_products_of_an_energy_model(exact) -> None:
    """Finite differences of the score approximate the same Hessian-vector products (one more score evaluation)."""
    _, mixture, _, y, denoiser = exact
    moments = make_estimator("full", jacobian="finite_difference").moments(denoiser, y, SIGMA)
    torch.testing.assert_close(moments.variance, mixture.posterior_covariance(y, SIGMA), rtol=0, atol=2e-3)
    assert (moments.num_forward, moments.num_backward) == (5, 0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"covariance": "diagonal", "jacobian": "forward"}, "jacobian='forward' cannot differentiate an energy model"),
        ({"covariance": "full", "product_batch": 4}, "product_batch=4: batched Jacobian products"),
    ],
)
def test_derivative_settings_an_energy_model_cannot_serve(tiny_energy, settings, message: str) -> None:
    pipe = MomentMatchingGibbsPipeline(unet=tiny_energy, scheduler=_single_level())
    pipe.set_progress_bar_config(disable=True)
    with count_calls(tiny_energy.network) as calls, pytest.raises(ValueError, match=message):
        pipe(batch_size=2, num_inference_steps=1, **settings)
    assert calls == []


def test_the_drop_in_scheduler_cannot_sample_an_energy_model(tiny_energy) -> None:
    """A standard diffusers loop reads ``.sample`` of the model output, or a loop hands the scheduler the energy
    itself: both are errors that say why and what to use."""
    scheduler = MMGibbsScheduler.from_config(DDPMScheduler().config)
    scheduler.set_timesteps(2)
    sample = torch.randn(3, 1, 4, 4)
    with pytest.raises(TypeError, match=r"drop-in MMGibbsScheduler .* cannot sample it.*MomentMatchingGibbsPipeline"):
        tiny_energy(sample, scheduler.timesteps[0]).sample  # noqa: B018 (what diffusers' loops read)
    energy = tiny_energy(sample, scheduler.timesteps[0]).energy
    with pytest.raises(ValueError, match=r"one scalar per sample: an energy model.*MomentMatchingGibbsPipeline"):
        scheduler.step(energy, scheduler.timesteps[0], sample)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"form": "square"}, ValueError, "`form` must be one of 'sum', 'quadratic'; got 'square'"),
        ({"scale": 0.0}, ValueError, "`scale` must be a positive finite number; got 0.0"),
        ({"scale": float("nan")}, ValueError, "`scale` must be a positive finite number"),
        ({"network_class": "NoSuchNet"}, ValueError, "`network_class` must name a diffusers model class"),
        ({"network_class": "DDPMScheduler"}, ValueError, "'DDPMScheduler' is not a diffusers model"),
        ({"network_config": "x"}, ValueError, "`network_config` must be the network's config"),
        (
            {"network_config": {"in_channels": 1, "out_channels": 2, "sample_size": 4}},
            ValueError,
            "form='quadratic' needs f\\(y\\) of y's shape: the network has in_channels=1 and out_channels=2",
        ),
    ],
)
def test_network_energy_refuses_bad_settings(kwargs, error, message: str) -> None:
    base = {"network_config": {"in_channels": 1, "out_channels": 1, "sample_size": 4}}
    with pytest.raises(error, match=message):
        NetworkEnergy(**{**base, **kwargs})


def test_an_energy_of_the_wrong_shape_is_named(exact) -> None:
    class Bad(GaussianMixtureEnergy):
        def energy(self, sample, timestep):
            return super().energy(sample, timestep)[:, None]

    _, mixture, _, y, _ = exact
    with pytest.raises(ValueError, match=r"Bad.energy must return one scalar per sample, shape \(6,\); got \(6, 1\)"):
        Bad.from_mixture(mixture)(y, torch.tensor(0.5))
    with pytest.raises(ValueError, match="`network` must be a diffusers model"):
        NetworkEnergy.from_network(torch.nn.Linear(2, 2))
