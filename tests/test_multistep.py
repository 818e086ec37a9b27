"""The second-order mean (``mean_order=2``): DPM-Solver++(2M)'s extrapolated data prediction inside the draw.

With Sigma = 0 the chain must be DPM-Solver++(2M) step for step (diffusers' own scheduler on the same levels, eta 0,
and its SDE form at eta 1 with the same noise draws), in the pipeline and in the drop-in scheduler alike."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

from mmgibbs import GaussianMixtureDenoiser, MMGibbsScheduler, MomentMatchingGibbsPipeline
from mmgibbs.moments import DenoisingMoments, LowRankCovariance
from mmgibbs.multistep import LAMBDA_GRID, MultistepMean, extrapolation_weight, variance_factors

STEPS = 10


CONFIG = dict(DDPMScheduler(clip_sample=False).config)


def _mixture() -> GaussianMixtureDenoiser:
    """Three Gaussians in d = 16 under DDPM's linear betas (exact, float64 inside, outputs in the input's dtype)."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 16, generator=g, dtype=torch.float64)
    covariances = 0.2 * torch.eye(16, dtype=torch.float64).expand(3, 16, 16)
    return GaussianMixtureDenoiser.from_components(means, covariances, sample_shape=[1, 4, 4], scheduler_config=CONFIG)


def _start(seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Generator]:
    """A start x ~ N(0, I) and its generator, positioned after that draw."""
    g = torch.Generator().manual_seed(seed)
    return randn_tensor((6, 1, 4, 4), generator=g, dtype=dtype), g


def _dpm(model: GaussianMixtureDenoiser, x: torch.Tensor, g: torch.Generator, **kwargs) -> torch.Tensor:
    """diffusers' loop with DPM-Solver++(2M) on the model's config (its own layout, final step to sigma 0) from x;
    the SDE form draws its noise from ``g``."""
    scheduler = DPMSolverMultistepScheduler.from_config(CONFIG, **kwargs)
    scheduler.set_timesteps(STEPS)
    for t in scheduler.timesteps:
        with torch.no_grad():
            x = scheduler.step(model(x, t).sample, t, x, generator=g).prev_sample
    return x


def _gibbs_scheduler(model: GaussianMixtureDenoiser, **settings) -> MMGibbsScheduler:
    source = DPMSolverMultistepScheduler.from_config(CONFIG)
    return MMGibbsScheduler.from_scheduler(
        source, covariance="none", mean_order=2, final_output="mean", variance_bound=None, **settings
    )


def test_no_covariance_is_dpm_solver_2m_in_the_pipeline() -> None:
    model = _mixture()
    pipe = MomentMatchingGibbsPipeline(unet=model, scheduler=_gibbs_scheduler(model, eta=0.0))
    pipe.set_progress_bar_config(disable=True)
    start, g = _start(3, torch.float64)
    run = {"num_inference_steps": STEPS, "output_type": "latent", "latents": start}
    ours = pipe(**run).images
    theirs = _dpm(model, start, g)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    first_order = pipe(**run, mean_order=1).images
    assert (first_order - theirs).abs().max() > 1e-2  # the extrapolation is not a no-op


@pytest.mark.parametrize(
    "dtype, eta, kwargs",
    [(torch.float64, 0.0, {}), (torch.float32, 1.0, {"algorithm_type": "sde-dpmsolver++"})],
)
def test_no_covariance_is_dpm_solver_2m_in_the_drop_in_loop(dtype: torch.dtype, eta: float, kwargs: dict) -> None:
    """eta 0: DPM-Solver++(2M); eta 1: its SDE form (midpoint), the same noise draws (diffusers draws them in
    float32, so that case runs in float32)."""
    model = _mixture()
    scheduler = _gibbs_scheduler(model, eta=eta)
    scheduler.set_timesteps(STEPS)
    start, g = _start(4, dtype)
    x = start * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        with torch.no_grad():
            x = scheduler.step(model(scheduler.scale_model_input(x, t), t).sample, t, x, generator=g).prev_sample
    tolerance = 1e-6 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(x, _dpm(model, start, _start(4, dtype)[1], **kwargs), atol=tolerance, rtol=tolerance)
    scheduler.set_timesteps(STEPS)  # a new schedule forgets the previous run's mean
    assert scheduler._multistep.previous is None


def test_the_extrapolation_skips_sweeps_within_a_level() -> None:
    """mu2_i = mu_i + (mu_i - mu_{i-1}) h_i / (2 h_{i-1}) over transitions between levels only; the first
    transition and the last step are first order."""
    multistep = MultistepMean(2)
    one, two, three = (torch.full((1,), v) for v in (1.0, 2.0, 4.0))
    assert multistep(one, 4.0, 2.0) is one  # first transition: first order
    assert multistep(two, 2.0, 2.0) is two  # a sweep within the level: untouched, history kept
    h_prev, h = math.log(2.0), math.log(2.0 / 0.5)
    torch.testing.assert_close(multistep(three, 2.0, 0.5), three + (three - one) * h / (2 * h_prev))
    assert multistep(two, 0.5, None) is two  # last step: first order
    assert MultistepMean(1)(three, 2.0, 0.5) is three


@pytest.mark.parametrize(
    "settings, fragment",
    [
        ({"mean_order": 3}, "`mean_order` must be one of 1, 2"),
        ({"mean_order": True}, "`mean_order` must be one of 1, 2"),
        ({"mean_order": 2, "transition": "gibbs"}, "needs transition='ancestral'"),
    ],
)
def test_bad_mean_orders_are_refused(settings: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        MMGibbsScheduler(**settings)
    model = _mixture()
    pipe = MomentMatchingGibbsPipeline(unet=model, scheduler=MMGibbsScheduler.from_config(CONFIG))
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        pipe(batch_size=2, num_inference_steps=3, **settings)


# ------------------------------------------------------------------ the draw's variance matched to the 2M step
@pytest.mark.parametrize("eta, transition", [(0.0, "ancestral"), (1.0, "ancestral"), (0.5, "ancestral")])
def test_first_order_factors_are_one(eta: float, transition: str) -> None:
    """The first-order step with the exact covariance is exact, so the recursion must ask for exactly Sigma
    (f = 1), sweeps within a level included."""
    sigmas = [80.0, 20.0, 20.0, 5.0, 1.0, 1.0, 0.3]
    f = variance_factors(sigmas, LAMBDA_GRID[::20], order=1, transition=transition, eta=eta)
    np.testing.assert_allclose(f, 1.0, rtol=1e-4)  # to the cancellation in lam + sigma^2 at lam = 1e-8


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_matched_second_order_chain_has_the_exact_variances_on_gaussian_data(eta: float) -> None:
    """One Gaussian with prior variances 1e-3 .. 4 (the spread of image directions): with its draw matched, the 2M
    chain with the exact posterior covariance (``full``) has the true variance in every direction up to lam = 1
    (Monte Carlo, 40000 samples: std of a ratio 0.007). Where the extrapolation alone already spreads a direction too
    far (lam = 4 at the last levels, f = 0) no draw can narrow it: there the ratio is 1.05 (eta 0) / 1.10 (eta 1),
    against 0.99 / 1.03 for DPM-Solver++(2M) itself and 0.74 / 0.60 for the first-order mean alone."""
    lam = torch.tensor([1e-3, 1e-2, 0.1, 0.5, 1.0, 4.0], dtype=torch.float64)
    model = GaussianMixtureDenoiser.from_components(
        torch.zeros(1, 6, dtype=torch.float64), torch.diag(lam)[None], sample_shape=[6], scheduler_config=CONFIG
    )
    source = DPMSolverMultistepScheduler.from_config(CONFIG)
    scheduler = MMGibbsScheduler.from_scheduler(source, covariance="full", mean_order=2, eta=eta, variance_bound=None)
    pipe = MomentMatchingGibbsPipeline(unet=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    x = pipe(
        batch_size=40000, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="latent"
    ).images
    ratio = x.var(0) / lam
    torch.testing.assert_close(ratio[:-1], torch.ones_like(ratio[:-1]), atol=0.03, rtol=0)
    assert 0.97 < ratio[-1] < 1.13
    # the unmatched draw (the whole Sigma on top of the extrapolated mean) is measurably too wide at large lam
    sigmas = scheduler.ve_sigmas()
    f = variance_factors(sigmas, lam.numpy(), eta=eta)
    assert f[-4:-1, -1].max() < 0.5  # large directions at low noise: most of Sigma is not needed


def test_scaled_moments_scale_every_structure() -> None:
    """``DenoisingMoments.scaled`` multiplies each direction's variance by the factor, in each structure."""
    g = torch.Generator().manual_seed(0)
    n, d = 3, 4
    mu = torch.zeros(n, d, dtype=torch.float64)
    sigma = torch.ones(n, dtype=torch.float64)
    half = lambda v: torch.full_like(v, 0.5)  # noqa: E731
    iso = DenoisingMoments(
        mu=mu, sigma=sigma, covariance="isotropic", variance=torch.rand(n, generator=g, dtype=mu.dtype)
    )
    torch.testing.assert_close(iso.scaled(half).variance, 0.5 * iso.variance)
    a = torch.randn(n, d, d, generator=g, dtype=mu.dtype)
    full = DenoisingMoments(mu=mu, sigma=sigma, covariance="full", variance=a @ a.mT)
    torch.testing.assert_close(full.scaled(half).variance, 0.5 * full.variance)
    factor = torch.linalg.qr(torch.randn(n, d, 2, generator=g, dtype=mu.dtype))[0] * 2.0
    low = LowRankCovariance(factor, torch.rand(n, d, generator=g, dtype=mu.dtype))
    lowrank = DenoisingMoments(mu=mu, sigma=sigma, covariance="calibrated", variance=low)
    torch.testing.assert_close(lowrank.scaled(half).variance.dense(), 0.5 * low.dense())
    draw = torch.randn(n, d, generator=g, dtype=mu.dtype)
    projection = DenoisingMoments(mu=mu, sigma=sigma, covariance="projection", draw=draw)
    torch.testing.assert_close(projection.scaled(half).draw, draw * 0.5**0.5)
    none = DenoisingMoments(mu=mu, sigma=sigma, covariance="none")
    assert none.scaled(half) is none


def test_a_step_more_than_twice_the_previous_is_first_order() -> None:
    """DDPM's leading layout ends 0.34 -> 0.01 at 10 steps (h / (2 h_prev) = 2.3): extrapolating that jump took the
    exact image mixture's FD from 0.07 to 1.4; such a step stays first order."""
    multistep = MultistepMean(2)
    one, two = torch.ones(1), torch.full((1,), 2.0)
    multistep(one, 0.72, 0.34)
    assert multistep(two, 0.34, 0.01) is two
    assert extrapolation_weight(math.log(0.34 / 0.01), math.log(0.72 / 0.34)) == 0.0
    assert extrapolation_weight(1.0, 0.6) == pytest.approx(1.0 / 1.2)
