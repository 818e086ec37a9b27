"""Noise parametrisation: round trips per family and prediction type, and agreement with diffusers."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_CONFIGS
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    ScoreSdeVeScheduler,
)

from mmgibbs import NoiseSchedule
from mmgibbs.noise import infer_noise_family

PREDICTIONS = {
    "vp": ("epsilon", "v_prediction", "sample", "score", "flow"),
    "vp_cosine": ("epsilon", "v_prediction"),
    "ve": ("epsilon", "score", "sample", "v_prediction"),
    "edm": ("epsilon", "v_prediction"),
    "flow": ("flow", "epsilon", "v_prediction", "sample"),
}
CASES = [(fam, pred) for fam, preds in PREDICTIONS.items() for pred in preds]


@pytest.mark.parametrize(("family", "prediction"), CASES)
def test_round_trip_exact_prediction_recovers_x(family: str, prediction: str) -> None:
    schedule = NoiseSchedule.from_config(FAMILY_CONFIGS[family], prediction_type=prediction)
    timesteps = schedule.inference_timesteps(7)
    x = torch.randn(7, 3, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x)
    x_t = schedule.add_noise(x, eps, timesteps)  # one timestep per sample
    alpha, s = schedule.coefficients(timesteps, x)
    torch.testing.assert_close(x_t, alpha * x + s * eps, rtol=0, atol=0)
    # the exact prediction for (x, eps): the posterior mean given a point mass at x is x itself
    out = schedule.prediction(x, x_t, timesteps)
    recovered = schedule.posterior_mean(out, x_t, timesteps)
    torch.testing.assert_close(recovered, x, rtol=1e-10, atol=1e-10)
    if prediction == "epsilon" and family != "edm":
        torch.testing.assert_close(out, eps, rtol=1e-9, atol=1e-9)
    # y = x_t / alpha = x + sigma * eps
    torch.testing.assert_close(x_t / alpha, x + schedule.sigma(timesteps).reshape(-1, 1, 1, 1) * eps)


def test_edm_model_input_round_trip() -> None:
    schedule = NoiseSchedule.from_config(FAMILY_CONFIGS["edm"])
    t = schedule.inference_timesteps(5)
    x_t = torch.randn(5, 2, dtype=torch.float64)
    scaled = schedule.model_input(x_t, t)
    sigma = schedule.sigma(t)
    torch.testing.assert_close(scaled, x_t / (sigma**2 + 0.25).sqrt().unsqueeze(-1))
    torch.testing.assert_close(schedule.unscale_model_input(scaled, t), x_t)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_vp_add_noise_matches_diffusers(cls, beta_schedule: str) -> None:
    reference = cls(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012)
    schedule = NoiseSchedule.from_config(reference.config)
    x, eps = torch.randn(6, 1, 4, 4), torch.randn(6, 1, 4, 4)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    torch.testing.assert_close(schedule.add_noise(x, eps, t), reference.add_noise(x, eps, t), rtol=1e-5, atol=1e-6)


def test_euler_sigmas_are_the_ve_view_of_the_vp_model() -> None:
    euler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    euler.set_timesteps(10)
    schedule = NoiseSchedule.from_config(euler.config)
    sigma = schedule.sigma(euler.timesteps.double())
    torch.testing.assert_close(sigma.float(), euler.sigmas[:-1], rtol=1e-4, atol=1e-5)
    # diffusers' Euler adds noise in the VE frame: x + sigma eps = x_t / alpha_t
    x, eps = torch.randn(10, 4), torch.randn(10, 4)
    alpha, _ = schedule.coefficients(euler.timesteps, x)
    torch.testing.assert_close(
        schedule.add_noise(x, eps, euler.timesteps) / alpha,
        euler.add_noise(x, eps, euler.timesteps),
        rtol=1e-4,
        atol=1e-4,
    )


def test_ve_add_noise_matches_score_sde_ve() -> None:
    reference = ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=50.0)
    reference.set_sigmas(100)
    schedule = NoiseSchedule.from_config(reference.config)
    idx = torch.tensor([0, 10, 50, 99])
    sigmas = reference.discrete_sigmas[idx]
    x, eps = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    torch.testing.assert_close(schedule.add_noise(x, eps, sigmas), reference.add_noise(x, eps, idx))
    assert schedule.prediction_type == "score"
    reference.set_timesteps(100)
    reference.set_sigmas(100)  # the pipeline's sigmas: sigma_min (sigma_max / sigma_min)^t, t from 1 to eps
    torch.testing.assert_close(schedule.inference_timesteps(100).float(), reference.sigmas.float(), rtol=1e-5, atol=0)


def test_edm_add_noise_and_timesteps_match_edm_euler() -> None:
    reference = EDMEulerScheduler()
    reference.set_timesteps(12)
    schedule = NoiseSchedule.from_config(reference.config)
    torch.testing.assert_close(schedule.inference_timesteps(12).float(), reference.timesteps, rtol=1e-5, atol=1e-5)
    x, eps = torch.randn(3, 2), torch.randn(3, 2)
    t = reference.timesteps[[0, 5, 11]]
    torch.testing.assert_close(schedule.add_noise(x, eps, t), reference.add_noise(x, eps, t), rtol=1e-4, atol=1e-4)
    # EDM preconditioning: our posterior mean is diffusers' precondition_outputs
    out = torch.randn(3, 2)
    sigma = reference.sigmas[[0, 5, 11]].unsqueeze(-1)
    expected = reference.precondition_outputs(x, out, sigma)
    torch.testing.assert_close(schedule.posterior_mean(out, x, t), expected, rtol=1e-4, atol=1e-4)


def test_flow_add_noise_matches_flow_match_euler() -> None:
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(8)
    schedule = NoiseSchedule.from_config(reference.config)
    x, eps = torch.randn(8, 2), torch.randn(8, 2)
    t = reference.timesteps
    expected = torch.stack([reference.scale_noise(x[i : i + 1], t[i : i + 1], eps[i : i + 1])[0] for i in range(8)])
    torch.testing.assert_close(schedule.add_noise(x, eps, t), expected, rtol=1e-5, atol=1e-5)
    # our levels are FlowMatchEuler's shifted ramp, except that the first avoids pure noise (alpha = 0)
    ours = schedule.inference_timesteps(8)
    assert float(ours[0]) < 1000 and torch.all(ours[1:] < ours[:-1])


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_vp_levels_follow_timestep_spacing(spacing: str) -> None:
    reference = DDPMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    for n in (1, 7, 50):
        reference.set_timesteps(n)
        ours = NoiseSchedule.from_config(reference.config).inference_timesteps(n)
        assert torch.equal(ours, reference.timesteps.long())


def test_family_inference_and_errors() -> None:
    assert infer_noise_family(DDPMScheduler().config) == "vp"
    assert infer_noise_family(EulerDiscreteScheduler().config) == "vp"
    assert infer_noise_family(ScoreSdeVeScheduler().config) == "ve"
    assert infer_noise_family(EDMEulerScheduler().config) == "edm"
    assert infer_noise_family(FlowMatchEulerDiscreteScheduler().config) == "flow"
    with pytest.raises(ValueError, match=r"noise_family.*'vp', 've', 'edm', 'flow'"):
        NoiseSchedule.from_config({"noise_family": "cosmic"})
    with pytest.raises(ValueError, match=r"prediction_type.*'epsilon'"):
        NoiseSchedule.from_config({"_class_name": "DDPMScheduler", "prediction_type": "noise"})
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule.from_config({"_class_name": "DDPMScheduler", "beta_schedule": "quadratic"})
    with pytest.raises(ValueError, match="timestep"):
        NoiseSchedule.from_config(DDPMScheduler().config).alpha_s(1000)
    with pytest.raises(ValueError, match="num_inference_steps"):
        NoiseSchedule.from_config(DDPMScheduler().config).inference_timesteps(0)


def test_timestep_for_sigma_inverts_sigma() -> None:
    for family in ("ve", "edm", "flow"):
        schedule = NoiseSchedule.from_config(FAMILY_CONFIGS[family])
        assert float(schedule.sigma(schedule.timestep_for_sigma(0.37))) == pytest.approx(0.37, rel=1e-9)
    vp = NoiseSchedule.from_config(DDPMScheduler().config)
    t = vp.timestep_for_sigma(0.5)
    sig = vp.sigma(torch.arange(1000))
    assert (sig - 0.5).abs().argmin() == t


def test_zero_terminal_snr_is_finite() -> None:
    schedule = NoiseSchedule.from_config(DDIMScheduler(rescale_betas_zero_snr=True).config)
    assert torch.isfinite(schedule.sigma(999))
