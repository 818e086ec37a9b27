"""MMGibbsScheduler: configs of every family, step layout, the ancestral transition, drop-in pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import public
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    ScoreSdeVeScheduler,
    UniPCMultistepScheduler,
)
from tiny_pipelines import count_calls, tiny_ddpm_pipeline, tiny_stable_diffusion_pipeline

from mmgibbs import MMGibbsScheduler, NoiseSchedule

SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
SOURCES = [
    (DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"), "vp"),
    (DDIMScheduler(**SD_BETAS, steps_offset=1), "vp"),
    (PNDMScheduler(**SD_BETAS, skip_prk_steps=True), "vp"),
    (EulerDiscreteScheduler(**SD_BETAS), "vp"),
    (EulerAncestralDiscreteScheduler(**SD_BETAS), "vp"),
    (DPMSolverMultistepScheduler(**SD_BETAS, prediction_type="sample"), "vp"),
    (UniPCMultistepScheduler(trained_betas=np.linspace(1e-4, 0.03, 1000).tolist()), "vp"),
    (ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=348.0), "ve"),
    (EDMEulerScheduler(sigma_max=60.0, prediction_type="v_prediction"), "edm"),
    (FlowMatchEulerDiscreteScheduler(shift=3.0), "flow"),
]


@pytest.mark.parametrize(("source", "family"), SOURCES, ids=[type(s).__name__ for s, _ in SOURCES])
def test_from_config_keeps_the_source_noise_schedule(source, family: str) -> None:
    ours = MMGibbsScheduler.from_config(source.config, covariance="isotropic", gibbs_sweeps=2)
    assert ours.config.noise_family == family and ours.config.gibbs_sweeps == 2
    expected = NoiseSchedule.from_config({**dict(source.config), "_class_name": type(source).__name__})
    assert ours.noise_schedule.prediction_type == expected.prediction_type
    if family == "vp":
        torch.testing.assert_close(ours.noise_schedule.alphas_cumprod.float(), source.alphas_cumprod)
    t = expected.inference_timesteps(5)
    torch.testing.assert_close(ours.noise_schedule.sigma(t), expected.sigma(t))
    # ... also when the source config comes from disk (with `_class_name`)
    loaded = MMGibbsScheduler.from_config({**dict(source.config), "_class_name": type(source).__name__})
    assert loaded.config.noise_family == family
    torch.testing.assert_close(loaded.noise_schedule.sigma(t), expected.sigma(t))


def test_source_defaults_survive_conversion() -> None:
    """diffusers drops keys a source left at its defaults; DDPM's default clip_sample=True must survive."""
    assert MMGibbsScheduler.from_config(DDPMScheduler().config).config.clip_sample is True
    assert MMGibbsScheduler.from_config(EulerDiscreteScheduler().config).config.timestep_spacing == "linspace"
    assert MMGibbsScheduler.from_config(ScoreSdeVeScheduler().config).noise_schedule.sigma_max == 1348.0


def test_save_and_load_round_trip(tmp_path) -> None:
    ours = MMGibbsScheduler.from_config(
        EDMEulerScheduler().config, covariance="diagonal", num_probes=3, transition="gibbs", variance_bound=1.0
    )
    ours.save_pretrained(tmp_path)
    loaded = MMGibbsScheduler.from_pretrained(tmp_path)
    assert public(loaded.config) == public(ours.config)
    assert public(MMGibbsScheduler.from_config(ours.config).config) == public(ours.config)
    loaded.set_timesteps(6)
    ours.set_timesteps(6)
    assert torch.equal(loaded.timesteps, ours.timesteps)


def test_levels_times_sweeps_layout_and_reset() -> None:
    sched = MMGibbsScheduler(gibbs_sweeps=3)
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [750] * 3 + [500] * 3 + [250] * 3 + [0] * 3
    assert len(sched.sigmas) == 13 and sched.sigmas[-1] == 0
    x = torch.randn(2, 3)
    for t in sched.timesteps[:5]:
        x = sched.step(torch.zeros_like(x), t, x).prev_sample
    assert sched.step_index == 5  # counted by index through the repeats, not looked up by value
    sched.set_timesteps(2)
    assert sched.step_index is None and sched.timesteps.tolist() == [500] * 3 + [0] * 3
    single = MMGibbsScheduler(schedule="single_level", sigma=0.5, gibbs_sweeps=2)
    single.set_timesteps(5)
    assert len(single.timesteps) == 10 and len(set(single.timesteps.tolist())) == 1
    assert float(single.sigmas[0]) == pytest.approx(0.5, rel=0.01)


def test_step_beyond_the_schedule_and_bad_arguments_are_refused() -> None:
    sched = MMGibbsScheduler()
    sched.set_timesteps(1)
    x = torch.zeros(1, 2)
    sched.step(x, sched.timesteps[0], x)
    with pytest.raises(IndexError, match="set_timesteps"):
        sched.step(x, sched.timesteps[0], x)
    for kwargs, match in [
        (
            {"covariance": "spherical"},
            "`covariance` must be one of 'none', 'isotropic', 'isotropic_batch', 'diagonal'",
        ),
        ({"transition": "ddim"}, "`transition` must be one of 'ancestral', 'gibbs'"),
        ({"schedule": "cosine"}, "`schedule` must be one of 'annealed', 'single_level'"),
        ({"final_output": "median"}, "`final_output` must be one of 'sample', 'mean'"),
        ({"gibbs_sweeps": 0}, "`gibbs_sweeps` must be a positive integer"),
        ({"num_probes": 1.5}, "`num_probes` must be a positive integer"),
        ({"schedule": "single_level"}, "positive noise level `sigma`"),
        ({"variance_bound": -1.0}, "`variance_bound` must be positive"),
        ({"noise_family": "subvp"}, "`noise_family` must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            MMGibbsScheduler(**kwargs)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(0)
    with pytest.raises(ValueError, match="descending"):
        sched.set_timesteps(timesteps=[10, 20])


def test_jacobian_covariance_in_a_standard_loop_names_the_pipeline() -> None:
    sched = MMGibbsScheduler(covariance="full")
    sched.set_timesteps(2)
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="MomentMatchingGibbsPipeline"):
        sched.step(x, sched.timesteps[0], x)


def test_mean_only_ancestral_transition_is_ddpm() -> None:
    """With Sigma = 0 the covariance-aware ancestral step must be DDPM's posterior step, bit for bit up to
    float rounding, including DDPM's clip_sample."""
    pipe = tiny_ddpm_pipeline()
    for steps in (10, 100):
        pipe.scheduler = DDPMScheduler()
        ref = pipe(
            batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np"
        )
        pipe.scheduler = MMGibbsScheduler.from_config(DDPMScheduler().config, covariance="none")
        ours = pipe(
            batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np"
        )
        np.testing.assert_allclose(ours.images, ref.images, atol=1e-4)


def test_mean_only_eta_zero_transition_is_ddim() -> None:
    """eta = 0 keeps all of x_t's implied noise: with Sigma = 0 that is DDIM's deterministic step. (With
    clip_sample the noise is re-derived from the clipped x, i.e. DDIM's use_clipped_model_output=True.)"""
    pipe = tiny_ddpm_pipeline()
    pipe.scheduler = DDIMScheduler(clip_sample=False)
    ref = pipe(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(0), output_type="np")
    pipe.scheduler = MMGibbsScheduler.from_config(pipe.scheduler.config, covariance="none", eta=0.0)
    ours = pipe(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(0), output_type="np")
    np.testing.assert_allclose(ours.images, ref.images, atol=1e-4)


def test_ancestral_step_has_the_integrated_moments() -> None:
    """x_s ~ N(a x_t + b mu, b^2 v + var_ts) for isotropic Sigma = v I (Monte Carlo over draws)."""
    sched = MMGibbsScheduler(covariance="isotropic", transition="ancestral", variance_bound=None)
    sched.set_timesteps(10)
    i = 3
    x_t = torch.full((200000, 1), 0.3, dtype=torch.float64)
    x_t[::2] = -0.3
    eps_hat = torch.full_like(x_t, 0.5)
    alpha_t, s_t = sched.level(i)
    alpha_s, s_s = sched.level(i + 1)
    sched._step_index = i
    out = sched.step(eps_hat, sched.timesteps[i], x_t, generator=torch.Generator().manual_seed(0))
    mu = (x_t - s_t * eps_hat) / alpha_t
    sigma_t, sigma_s = s_t / alpha_t, s_s / alpha_s
    v = sigma_t**2 * (1 - 0.25)
    a = s_s * (sigma_s / sigma_t) / s_t
    b = alpha_s - a * alpha_t
    var = b**2 * v + s_s**2 * (1 - (sigma_s / sigma_t) ** 2)
    for sign in (0, 1):
        got = out.prev_sample[sign::2]
        expected_mean = a * x_t[sign::2] + b * mu[sign::2]
        assert float(got.mean()) == pytest.approx(float(expected_mean.mean()), abs=4 * (var / len(got)) ** 0.5)
        assert float(got.var()) == pytest.approx(var, rel=0.02)
    torch.testing.assert_close(out.pred_original_sample, mu)


def test_within_level_sweeps_renoise_and_final_output() -> None:
    sched = MMGibbsScheduler(covariance="none", gibbs_sweeps=2, final_output="mean")
    sched.set_timesteps(1)
    x_t = torch.randn(50000, 1, dtype=torch.float64)
    eps_hat = torch.zeros_like(x_t)  # mu = x_t / alpha
    alpha, s = sched.level(0)
    out = sched.step(eps_hat, sched.timesteps[0], x_t, generator=torch.Generator().manual_seed(0))
    # the same level again: fresh re-noising of x = mu, x_t' = alpha mu + s z
    resid = out.prev_sample - alpha * (x_t / alpha)
    assert float(resid.std()) == pytest.approx(s, rel=0.02)
    last = sched.step(eps_hat, sched.timesteps[1], out.prev_sample).prev_sample
    torch.testing.assert_close(last, out.prev_sample / alpha)


def test_model_frame_scaling_per_family() -> None:
    vp = MMGibbsScheduler.from_config(EulerDiscreteScheduler(**SD_BETAS).config)
    vp.set_timesteps(5)
    assert vp.init_noise_sigma == pytest.approx(1.0)  # the VP model's own frame, not Euler's sigma frame
    x = torch.randn(2, 3)
    assert torch.equal(vp.scale_model_input(x, vp.timesteps[0]), x)
    edm = MMGibbsScheduler.from_config(EDMEulerScheduler().config)
    edm.set_timesteps(5)
    reference = EDMEulerScheduler()
    reference.set_timesteps(5)
    assert edm.init_noise_sigma == pytest.approx(reference.init_noise_sigma, rel=1e-5)
    torch.testing.assert_close(
        edm.scale_model_input(x, edm.timesteps[0]), reference.scale_model_input(x, reference.timesteps[0])
    )
    torch.testing.assert_close(edm.timesteps, reference.timesteps)


# ------------------------------------------------------------------------------------------ drop-in pipelines
@pytest.mark.parametrize("covariance", ["none", "isotropic"])
@pytest.mark.parametrize("transition", ["ancestral", "gibbs"])
def test_ddpm_pipeline_drop_in(covariance: str, transition: str) -> None:
    pipe = tiny_ddpm_pipeline()
    pipe.scheduler = MMGibbsScheduler.from_config(
        pipe.scheduler.config, covariance=covariance, gibbs_sweeps=3, transition=transition
    )
    with count_calls(pipe.unet) as calls:
        a = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    assert len(calls) == 4 * 3
    b = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    assert np.array_equal(a.images, b.images)
    c = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(1), output_type="np")
    assert not np.array_equal(a.images, c.images)


def test_stable_diffusion_drop_in_with_guidance() -> None:
    pipe = tiny_stable_diffusion_pipeline()
    pipe.scheduler = MMGibbsScheduler.from_config(pipe.scheduler.config, covariance="isotropic", gibbs_sweeps=2)
    kwargs = {"num_inference_steps": 3, "guidance_scale": 7.5, "output_type": "np"}
    with count_calls(pipe.unet) as calls:
        a = pipe("a red cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert calls == [2] * 6  # 3 levels x 2 sweeps, each on the doubled classifier-free-guidance batch
    b = pipe("a red cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.array_equal(a, b) and np.isfinite(a).all()
    # the prompt reaches the sample
    c = pipe("a blue dog", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert not np.array_equal(a, c)
