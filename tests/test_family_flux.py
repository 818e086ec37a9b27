"""Flux through `MomentMatchingGibbsPipeline.from_pipe` and as a drop-in scheduler (tiny, offline).

"CFG on/off" for a guidance-distilled Flux-dev model means true CFG (``true_cfg_scale`` > 1 with a negative
prompt, both branches in one batched call); its embedded ``guidance`` is an input of every call either way.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline
from exact_flow_gaussians import (
    ExactGaussians,
    assert_exact_affine_denoiser,
    assert_exact_laws,
    assert_per_image_streams,
)
from tiny_flux import FLUX_DEV_SCHEDULER_CONFIG, tiny_flux_components, tiny_flux_pipeline
from tiny_pipelines import count_calls, generator

from mmgibbs import MMGibbsScheduler, MomentMatchingGibbsPipeline

COVARIANCES = ["none", "isotropic", "diagonal", "projection"]
PROMPTS = ["a red cat", "a blue dog"]
SIZE = {"height": 16, "width": 16}


@pytest.fixture(scope="module")
def flux_pipe() -> MomentMatchingGibbsPipeline:
    return MomentMatchingGibbsPipeline.from_pipe(tiny_flux_pipeline(), jacobian="reverse")


def run(pipe, prompts: list[str], seed: int | list[int] = 0, **kwargs):
    kwargs = {"num_inference_steps": 2, "output_type": "np", **SIZE, **kwargs}
    return pipe(prompts, generator=generator(seed), **kwargs)


def record(module: torch.nn.Module, keys: tuple[str, ...]):
    """A context collecting the named keyword inputs of every forward call of ``module``."""
    seen: list[dict[str, torch.Tensor | None]] = []

    def hook(_module, _args, kwargs, _output):
        seen.append({k: None if kwargs.get(k) is None else kwargs[k].clone() for k in keys})

    @contextlib.contextmanager
    def recording():
        handle = module.register_forward_hook(hook, with_kwargs=True)
        try:
            yield seen
        finally:
            handle.remove()

    return recording()


def test_scheduler_takes_flux_dev_config_sigmas_and_mu() -> None:
    """A dynamic-shifting FlowMatchEuler config builds (mu is not known before set_timesteps) and
    `set_timesteps(sigmas=, mu=)` lays out FlowMatchEuler's levels, u = 1 (alpha = 0) clamped to 1 - 1/T."""
    reference = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG)
    ours = MMGibbsScheduler.from_config(reference.config)
    sigmas, mu = np.linspace(1.0, 1 / 6, 6), 0.7
    reference.set_timesteps(sigmas=sigmas, mu=mu)
    ours.set_timesteps(sigmas=sigmas, mu=mu)
    torch.testing.assert_close(ours.timesteps[1:], reference.timesteps[1:])
    assert float(reference.timesteps[0]) == 1000.0 and float(ours.timesteps[0]) == 999.0


def test_from_pipe_shares_the_host_components() -> None:
    host = tiny_flux_pipeline()
    pipe = MomentMatchingGibbsPipeline.from_pipe(host, covariance="diagonal")
    assert pipe.transformer is host.transformer and pipe.text_encoder_2 is host.text_encoder_2
    assert pipe.config.host_pipeline == "FluxPipeline" and pipe.scheduler.config.noise_family == "flow"


@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("true_cfg_scale", [1.0, 4.0])
def test_every_covariance_with_and_without_true_cfg(flux_pipe, covariance, true_cfg_scale) -> None:
    with count_calls(flux_pipe.transformer) as calls:
        out = run(
            flux_pipe,
            PROMPTS,
            negative_prompt="",
            true_cfg_scale=true_cfg_scale,
            covariance=covariance,
            gibbs_sweeps=2,
        )
    assert out.images.shape == (2, 16, 16, 3) and (out.images >= 0).all() and (out.images <= 1).all()
    batch = 4 if true_cfg_scale > 1 else 2  # both branches in one call
    assert calls == [batch] * 4 and out.num_forward == 4  # 2 levels x 2 sweeps
    assert out.num_backward == (4 if covariance in ("diagonal", "projection") else 0)


def test_the_transformer_sees_what_the_host_gives_it(flux_pipe) -> None:
    """Packed latents, the embedded guidance, the timestep as u = t / 1000 on the host's own levels (mu from the
    image's token count, sigmas linspace(1, 1/n, n); u = 1 becomes 1 - 1/T), txt_ids / img_ids."""
    keys = ("hidden_states", "timestep", "guidance", "txt_ids", "img_ids", "pooled_projections")
    host = tiny_flux_pipeline()
    with record(host.transformer, keys) as theirs:
        host(PROMPTS, num_inference_steps=4, guidance_scale=2.5, max_sequence_length=8, **SIZE)
    with record(flux_pipe.transformer, keys) as ours:
        run(flux_pipe, PROMPTS, num_inference_steps=4, guidance_scale=2.5, max_sequence_length=8, covariance="none")
    assert len(ours) == len(theirs) == 4
    for step, (mine, host_call) in enumerate(zip(ours, theirs, strict=True)):
        assert mine["hidden_states"].shape == host_call["hidden_states"].shape == (2, 16, 16)
        torch.testing.assert_close(mine["guidance"], torch.full((2,), 2.5))
        for key in ("txt_ids", "img_ids"):
            torch.testing.assert_close(mine[key], host_call[key])
        if step > 0:
            torch.testing.assert_close(mine["timestep"], host_call["timestep"])
    assert float(theirs[0]["timestep"][0]) == 1.0 and float(ours[0]["timestep"][0]) == pytest.approx(0.999)


def test_schnell_has_no_guidance_input() -> None:
    pipe = MomentMatchingGibbsPipeline.from_pipe(tiny_flux_pipeline(guidance_embeds=False))
    with record(pipe.transformer, ("guidance",)) as seen:
        out = run(pipe, PROMPTS, covariance="isotropic", output_type="latent")
    assert out.images.shape == (2, 16, 16) and all(s["guidance"] is None for s in seen)


def test_deterministic_and_per_image_generators(flux_pipe, exact_flux) -> None:
    """As for SD3: a generator fixes the images, and per-image generators make image 0 independent of the rest of
    the batch for `none`, `diagonal`, `projection` (in float64); `isotropic` too (its variance is per sample);
    `isotropic_batch`'s one batch-wide variance estimate makes it depend on the batch (shown with the exact
    Gaussians)."""
    kwargs = {"covariance": "diagonal", "negative_prompt": "", "true_cfg_scale": 3.0}
    first, again = run(flux_pipe, PROMPTS, **kwargs).images, run(flux_pipe, PROMPTS, **kwargs).images
    other = run(flux_pipe, PROMPTS, seed=1, **kwargs).images
    assert (first == again).all() and not (first == other).all()
    pipe64, hook = exact_flux
    assert_per_image_streams(run, pipe64, hook, PROMPTS, negative_prompt="", true_cfg_scale=3.0)


# ---------------------------------------------------------------------------------------- exactness
TRUE_CFG = 2.0  # s_u = 1, s_c >= 0.8: the guided slope stays in (0, 1] at every level


@pytest.fixture(scope="module")
def exact_flux():
    """The tiny Flux in float64 and a hook replacing its transformer's output by the exact velocity of a Gaussian
    per prompt on the packed latents (the third, the empty prompt, is the negative branch)."""
    pipe = MomentMatchingGibbsPipeline.from_pipe(tiny_flux_pipeline().to(torch.float64), jacobian="reverse")
    host = pipe.family(pipe.scheduler).host
    _, pooled, _ = host.encode_prompt([*PROMPTS, ""], None, max_sequence_length=8)
    pattern = torch.linspace(-1, 1, 256, dtype=torch.float64).reshape(16, 16)
    means = torch.stack([1.0 + 0.3 * pattern, -0.5 - 0.3 * pattern, 0.2 * pattern])
    stds = torch.tensor([0.8, 0.9, 1.0], dtype=torch.float64)
    return pipe, ExactGaussians(pooled, means, stds, timestep_scale=1.0)


@pytest.mark.parametrize("covariance", ["isotropic", "diagonal"])
@pytest.mark.parametrize("true_cfg_scale", [None, TRUE_CFG])
def test_exact_gaussians_through_the_adapter(exact_flux, covariance, true_cfg_scale) -> None:
    """Final packed latents per prompt at 20 levels have the exact law (``exact_flow_gaussians``): N(m_c, s_c^2)
    without true CFG, the chain's guided Gaussian with it."""
    pipe, hook = exact_flux
    guidance = {"negative_prompt": "", "true_cfg_scale": true_cfg_scale or 1.0}
    assert_exact_laws(run, pipe, hook, PROMPTS, covariance, true_cfg_scale, **guidance)


def test_true_cfg_mean_and_jacobian_products_are_exact_in_float64(exact_flux) -> None:
    """Through the adapter (packing, pooled/T5 embeddings, batched true CFG, t / 1000): mu = a y + b and
    J^T v = a v with the analytic guided a, b at every level."""
    pipe, hook = exact_flux
    arguments = {
        "prompt": PROMPTS,
        "negative_prompt": "",
        "true_cfg_scale": TRUE_CFG,
        "max_sequence_length": 8,
        **SIZE,
    }
    assert_exact_affine_denoiser(pipe, hook, arguments, (16, 16), TRUE_CFG)


# ---------------------------------------------------------------------------------------- drop-in and errors
@pytest.mark.parametrize("covariance", ["none", "isotropic"])
def test_drop_in_scheduler_in_the_host_pipeline(covariance) -> None:
    """FluxPipeline with MMGibbsScheduler.from_config(FLUX.1-dev's dynamic-shifting config): the host passes
    `sigmas=` and `mu=`; levels x sweeps calls; deterministic under the global seed (the host does not pass its
    generator to `step`)."""
    host = tiny_flux_pipeline()
    host.scheduler = MMGibbsScheduler.from_config(host.scheduler.config, covariance=covariance, gibbs_sweeps=2)
    images = []
    for _ in range(2):
        torch.manual_seed(0)
        with count_calls(host.transformer) as calls:
            images.append(host(PROMPTS, num_inference_steps=3, output_type="np", **SIZE).images)
        assert calls == [2] * 6
    assert images[0].shape == (2, 16, 16, 3) and np.isfinite(images[0]).all() and (images[0] == images[1]).all()


def test_unsupported_pipelines_and_arguments_get_clear_errors(flux_pipe) -> None:
    img2img = FluxImg2ImgPipeline(**tiny_flux_components())
    with pytest.raises(ValueError, match=r"does not support the pipeline FluxImg2ImgPipeline.*SD3.*Flux"):
        MomentMatchingGibbsPipeline.from_pipe(img2img)
    with pytest.raises(ValueError, match="does not take `ip_adapter_image`"):
        flux_pipe("a cat", ip_adapter_image=np.zeros((16, 16, 3)), num_inference_steps=1, **SIZE)
    host = flux_pipe.family(flux_pipe.scheduler).host
    embeds, pooled, _ = host.encode_prompt("a cat", max_sequence_length=8)
    with pytest.raises(ValueError, match="negative prompt embeddings must have the shape"):
        flux_pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=embeds[:, :4],
            negative_pooled_prompt_embeds=pooled,
            true_cfg_scale=2.0,
            num_inference_steps=1,
            **SIZE,
        )
