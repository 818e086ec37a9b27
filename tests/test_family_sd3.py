"""Stable Diffusion 3 through `MomentMatchingGibbsPipeline.from_pipe` and as a drop-in scheduler (tiny, offline)."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline
from exact_flow_gaussians import (
    ExactGaussians,
    assert_exact_affine_denoiser,
    assert_exact_laws,
    assert_per_image_streams,
)
from tiny_pipelines import count_calls, generator
from tiny_sd3 import tiny_sd3_components, tiny_sd3_pipeline

from mmgibbs import MMGibbsScheduler, MomentMatchingGibbsPipeline

COVARIANCES = ["none", "isotropic", "diagonal", "projection"]
PROMPTS = ["a red cat", "a blue dog"]


@pytest.fixture(scope="module")
def sd3_pipe() -> MomentMatchingGibbsPipeline:
    return MomentMatchingGibbsPipeline.from_pipe(tiny_sd3_pipeline(), jacobian="reverse")


@pytest.fixture(scope="module")
def sd3_pipe64() -> MomentMatchingGibbsPipeline:
    """The tiny SD3 in float64: the chain runs in float64 too (comparisons free of float32 batching noise)."""
    return MomentMatchingGibbsPipeline.from_pipe(tiny_sd3_pipeline().to(torch.float64), jacobian="reverse")


def run(pipe: MomentMatchingGibbsPipeline, prompts: list[str], seed: int | list[int] = 0, **kwargs):
    kwargs = {"num_inference_steps": 2, "output_type": "np", **kwargs}
    return pipe(prompts, generator=generator(seed), **kwargs)


def test_from_pipe_shares_the_host_components() -> None:
    host = tiny_sd3_pipeline()
    pipe = MomentMatchingGibbsPipeline.from_pipe(host, covariance="diagonal")
    assert pipe.transformer is host.transformer and pipe.vae is host.vae
    assert pipe.text_encoder_3 is host.text_encoder_3 and pipe.tokenizer_3 is host.tokenizer_3
    assert pipe.config.host_pipeline == "StableDiffusion3Pipeline"
    assert isinstance(pipe.scheduler, MMGibbsScheduler) and pipe.scheduler.config.noise_family == "flow"


@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_every_covariance_with_and_without_guidance(sd3_pipe, covariance, guidance_scale) -> None:
    with count_calls(sd3_pipe.transformer) as calls:
        out = run(sd3_pipe, PROMPTS, covariance=covariance, guidance_scale=guidance_scale, gibbs_sweeps=2)
    assert out.images.shape == (2, 16, 16, 3) and (out.images >= 0).all() and (out.images <= 1).all()
    batch = 4 if guidance_scale > 1 else 2  # both guidance branches in one call
    assert calls == [batch] * 4 and out.num_forward == 4  # 2 levels x 2 sweeps
    assert out.num_backward == (4 if covariance in ("diagonal", "projection") else 0)


@pytest.mark.parametrize("covariance", ["none", "diagonal"])
def test_without_t5_the_host_zeros_stand_in(covariance) -> None:
    host = tiny_sd3_pipeline(t5=False)
    pipe = MomentMatchingGibbsPipeline.from_pipe(host, jacobian="reverse")
    with count_calls(pipe.transformer) as calls:
        out = run(pipe, PROMPTS, covariance=covariance, guidance_scale=5.0, output_type="latent")
    assert out.images.shape == (2, 4, 8, 8) and torch.isfinite(out.images).all() and calls == [4, 4]


def test_the_transformer_sees_the_host_inputs(sd3_pipe) -> None:
    """Joint text sequence (16 CLIP + max_sequence_length T5 tokens), pooled width 64, timestep u * 1000."""
    seen = []

    def hook(module, args, kwargs, output):
        seen.append({k: kwargs[k].clone() for k in ("timestep", "encoder_hidden_states", "pooled_projections")})

    handle = sd3_pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        run(sd3_pipe, PROMPTS, guidance_scale=5.0, max_sequence_length=8, covariance="none", num_inference_steps=3)
    finally:
        handle.remove()
    assert [tuple(s["encoder_hidden_states"].shape) for s in seen] == [(4, 24, 64)] * 3
    assert all(tuple(s["pooled_projections"].shape) == (4, 64) for s in seen)
    scheduler = MMGibbsScheduler.from_config(sd3_pipe.scheduler.config)
    scheduler.set_timesteps(3)
    torch.testing.assert_close(torch.stack([s["timestep"] for s in seen]), scheduler.timesteps[:, None].expand(3, 4))


def test_dynamic_shifting_takes_mu_from_the_image_size() -> None:
    """An SD3.5-style config with `use_dynamic_shifting`: mu = calculate_shift(image tokens, the config's base/max
    sequence lengths and shifts), as StableDiffusion3Pipeline computes it; a `mu` argument overrides it."""
    components = tiny_sd3_components()
    components["scheduler"] = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=16,
        max_image_seq_len=64,
        base_shift=0.5,
        max_shift=1.2,
    )
    pipe = MomentMatchingGibbsPipeline.from_pipe(StableDiffusion3Pipeline(**components), covariance="none")
    for size, mu, expected in ((16, None, 0.5), (32, None, 1.2), (16, 0.9, 0.9)):  # 4 x 4 and 8 x 8 tokens
        seen: list[float] = []
        handle = pipe.transformer.register_forward_hook(
            lambda m, a, k, o, seen=seen: seen.append(float(k["timestep"][0])), with_kwargs=True
        )
        try:
            run(pipe, PROMPTS[:1], height=size, width=size, mu=mu, num_inference_steps=3, guidance_scale=1.0)
        finally:
            handle.remove()
        reference = MMGibbsScheduler.from_config(pipe.scheduler.config)
        reference.set_timesteps(3, mu=expected)
        assert seen == pytest.approx(reference.timesteps.tolist(), rel=1e-6), (size, mu)


@pytest.mark.skipif(
    "source_scheduler" not in inspect.signature(MMGibbsScheduler.__init__).parameters,
    reason="FlowMatchEuler's own level layout (its last level is shifted twice) comes with the conformance branch",
)
@pytest.mark.parametrize("dynamic", [False, True])
def test_the_transformer_sees_the_host_timesteps(dynamic) -> None:
    """The levels are StableDiffusion3Pipeline's own (FlowMatchEuler's, mu from the image size when the config
    shifts dynamically), the first, u = 1 (alpha = 0, no finite sigma), at u = 1 - 1/T."""
    components = tiny_sd3_components()
    if dynamic:
        components["scheduler"] = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=64, max_shift=1.2
        )
    host = StableDiffusion3Pipeline(**components)
    host.set_progress_bar_config(disable=True)
    seen: list[float] = []
    handle = host.transformer.register_forward_hook(
        lambda m, a, k, o: seen.append(float(k["timestep"][0])), with_kwargs=True
    )
    try:
        host(PROMPTS[0], num_inference_steps=4, height=32, width=32, output_type="latent")
        theirs = seen[:]
        seen.clear()
        pipe = MomentMatchingGibbsPipeline.from_pipe(host, covariance="none")
        pipe(PROMPTS[0], num_inference_steps=4, height=32, width=32, output_type="latent")
    finally:
        handle.remove()
    assert theirs[0] == 1000.0 and seen[0] == 999.0 and seen[1:] == pytest.approx(theirs[1:], rel=1e-6)


def test_deterministic_and_per_image_generators(sd3_pipe, exact_sd3) -> None:
    """A generator fixes the images; with one generator per image, image 0 does not depend on the rest of the batch
    for `none`, `diagonal`, `projection` and `isotropic` (per-sample draws, probes and variances, per-sample
    attention). `isotropic_batch` shares one variance estimate over the batch (Analytic-DPM's expectation taken
    over the batch), so there image 0 does depend on what else is in the batch (shown with the exact Gaussians,
    whose variance estimate is never clamped to 0, as a random network's often is). Compared in float64: in float32
    batched matmuls differ at 1e-7, which the diagonal draw's square root amplifies to 1e-4 over a CFG chain."""
    first = run(sd3_pipe, PROMPTS, covariance="diagonal", guidance_scale=5.0).images
    again = run(sd3_pipe, PROMPTS, covariance="diagonal", guidance_scale=5.0).images
    other = run(sd3_pipe, PROMPTS, seed=1, covariance="diagonal", guidance_scale=5.0).images
    assert (first == again).all() and not (first == other).all()
    pipe64, hook = exact_sd3
    assert_per_image_streams(run, pipe64, hook, PROMPTS, guidance_scale=5.0)


# ---------------------------------------------------------------------------------------- exactness
GUIDANCE = 2.0  # with s_u = 1 and s_c >= 0.8, a(sigma) = (1 - g) k_u + g k_c stays in (0, 1] at every level


@pytest.fixture(scope="module")
def exact_sd3(sd3_pipe64):
    """The float64 tiny SD3 and a hook replacing its transformer's output by the exact velocity of a Gaussian per
    prompt (the third, the empty prompt, is the unconditional branch)."""
    pipe = sd3_pipe64
    host = pipe.family(pipe.scheduler).host
    prompts = [*PROMPTS, ""]
    _, _, pooled, _ = host.encode_prompt(prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=8)
    pattern = torch.linspace(-1, 1, 256, dtype=torch.float64).reshape(4, 8, 8)
    means = torch.stack([1.0 + 0.3 * pattern, -0.5 - 0.3 * pattern, 0.2 * pattern])
    stds = torch.tensor([0.8, 0.9, 1.0], dtype=torch.float64)
    return pipe, ExactGaussians(pooled, means, stds, timestep_scale=1000.0)


@pytest.mark.parametrize("covariance", ["isotropic", "diagonal"])
@pytest.mark.parametrize("guidance", [None, GUIDANCE])
def test_exact_gaussians_through_the_adapter(exact_sd3, covariance, guidance) -> None:
    """Final latents per prompt at 20 levels have the exact law (module docstring of ``exact_flow_gaussians``):
    N(m_c, s_c^2) without guidance, the chain's guided Gaussian with it. `isotropic` runs one prompt per batch
    (its variance is one estimate per batch); `diagonal` both prompts in one batch."""
    pipe, hook = exact_sd3
    assert_exact_laws(run, pipe, hook, PROMPTS, covariance, guidance, guidance_scale=guidance or 1.0)


def test_guided_mean_and_jacobian_products_are_exact_in_float64(exact_sd3) -> None:
    """Through the adapter (prompt encoding, CFG batching, timestep, flow frame): mu = a y + b and J^T v = a v with
    the analytic guided a, b at every level. To 1e-6 relative: the model is told the float32 timestep (as
    FlowMatchEuler gives it) while the frame change uses the float64 level."""
    pipe, hook = exact_sd3
    arguments = {"prompt": PROMPTS, "guidance_scale": GUIDANCE, "max_sequence_length": 8}
    assert_exact_affine_denoiser(pipe, hook, arguments, (4, 8, 8), GUIDANCE)


# ---------------------------------------------------------------------------------------- drop-in and errors
@pytest.mark.parametrize("covariance", ["none", "isotropic"])
def test_drop_in_scheduler_in_the_host_pipeline(covariance) -> None:
    """StableDiffusion3Pipeline with MMGibbsScheduler.from_config(its FlowMatchEuler config): levels x sweeps
    calls on the CFG batch; the host does not pass its generator to `step`, so the draws follow the global seed."""
    host = tiny_sd3_pipeline()
    host.scheduler = MMGibbsScheduler.from_config(host.scheduler.config, covariance=covariance, gibbs_sweeps=2)
    images = []
    for _ in range(2):
        torch.manual_seed(0)
        with count_calls(host.transformer) as calls:
            images.append(host(PROMPTS, num_inference_steps=3, output_type="np").images)
        assert calls == [4] * 6
    assert images[0].shape == (2, 16, 16, 3) and (images[0] == images[1]).all()


def test_unsupported_pipelines_and_arguments_get_clear_errors(sd3_pipe) -> None:
    img2img = StableDiffusion3Img2ImgPipeline(**tiny_sd3_components())
    with pytest.raises(ValueError, match=r"does not support the pipeline StableDiffusion3Img2ImgPipeline.*SD3.*Flux"):
        MomentMatchingGibbsPipeline.from_pipe(img2img)
    with pytest.raises(ValueError, match="does not take `skip_guidance_layers`"):
        sd3_pipe("a cat", skip_guidance_layers=[0], num_inference_steps=1)
    with pytest.raises(ValueError, match="divisible by 4"):
        sd3_pipe("a cat", height=18, width=16, num_inference_steps=1)
