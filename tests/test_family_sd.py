"""Stable Diffusion 1.x/2.x beyond text (image-to-image, inpainting), and exactness through the SD/SDXL adapters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from tiny_pipelines import (
    SD_SCHEDULER_CONFIG,
    count_calls,
    generator,
    gibbs,
    tiny_sd_components,
    tiny_stable_diffusion_pipeline,
    tiny_unet2d_condition,
)
from tiny_sdxl import tiny_sdxl_pipeline, tiny_stand_in_unet

from mmgibbs import MomentMatchingGibbsPipeline
from mmgibbs.noise import NoiseSchedule

PROMPTS = ["a red cat", "a blue dog"]
SD_HOSTS = (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline)


@pytest.fixture(scope="module")
def sd_pipe() -> MomentMatchingGibbsPipeline:
    return gibbs(tiny_stable_diffusion_pipeline())


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=generator(7))


def right_half_mask(batch: int = 2, size: int = 16) -> torch.Tensor:
    """Repaint (1) the right half, keep (0) the left half: diffusers' mask convention."""
    mask = torch.zeros(batch, 1, size, size)
    mask[..., size // 2 :] = 1.0
    return mask


@contextlib.contextmanager
def seen_timesteps(unet: torch.nn.Module) -> Iterator[list[int]]:
    """The timestep of every UNet call while the block runs."""
    seen: list[int] = []

    def hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        seen.append(int(torch.as_tensor(timestep).flatten()[0]))

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------- modes
def test_the_mode_follows_the_arguments_whatever_the_host(image) -> None:
    """Text, img2img and inpainting from each SD host class give the same samples: the host of each mode is built
    from the same components."""
    results: dict[str, list[torch.Tensor]] = {"text": [], "img2img": [], "inpaint": []}
    for cls in SD_HOSTS:
        pipe = gibbs(cls(**tiny_sd_components()))
        assert pipe.config.host_pipeline == cls.__name__
        common = dict(num_inference_steps=2, output_type="latent", covariance="diagonal", guidance_scale=3.0)
        results["text"].append(pipe(PROMPTS, generator=generator(), **common).images)
        results["img2img"].append(pipe(PROMPTS, image=image, strength=0.5, generator=generator(), **common).images)
        mask = right_half_mask()
        results["inpaint"].append(pipe(PROMPTS, image=image, mask_image=mask, generator=generator(), **common).images)
    for mode, outs in results.items():
        assert all(torch.isfinite(o).all() for o in outs), mode
        assert all(torch.equal(outs[0], o) for o in outs[1:]), mode


def test_image_arguments_get_clear_errors(sd_pipe, image) -> None:
    with pytest.raises(ValueError, match="`mask_image` needs `image`"):
        sd_pipe("a cat", mask_image=right_half_mask(1), num_inference_steps=1)
    with pytest.raises(ValueError, match="`strength` needs `image`"):
        sd_pipe("a cat", strength=0.5, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"`strength`=0\.1 leaves none of the 4 levels"):
        sd_pipe(PROMPTS, image=image, strength=0.1, num_inference_steps=4)
    with pytest.raises(ValueError, match="Image-to-image takes no `latents`"):
        sd_pipe(PROMPTS, image=image, latents=torch.zeros(2, 4, 8, 8), num_inference_steps=1)
    with pytest.raises(ValueError, match="does not take `prompt_2`"):
        sd_pipe("a cat", prompt_2="a dog", num_inference_steps=1)


# ---------------------------------------------------------------------------------------------- img2img
@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_img2img_starts_at_the_level_strength_selects(sd_pipe, image, guidance_scale) -> None:
    """strength 0.5 of 4 levels runs the last int(4 * 0.5) = 2 levels; with 2 sweeps the chain starts at step
    2 * 2 = 4, the first sweep of level 2 (timestep 251 of the SD v1 'leading' layout 751, 501, 251, 1), and makes
    levels x sweeps = 4 calls."""
    with count_calls(sd_pipe.unet) as calls, seen_timesteps(sd_pipe.unet) as timesteps:
        out = sd_pipe(
            PROMPTS,
            image=image,
            strength=0.5,
            num_inference_steps=4,
            gibbs_sweeps=2,
            covariance="diagonal",
            guidance_scale=guidance_scale,
            generator=generator(),
            output_type="np",
        )
    assert timesteps == [251, 251, 1, 1]
    assert calls == [4 if guidance_scale > 1 else 2] * 4
    assert out.num_forward == 4 and out.num_backward == 4
    assert out.images.shape == (2, 16, 16, 3) and (out.images >= 0).all() and (out.images <= 1).all()


# ---------------------------------------------------------------------------------------------- inpainting
@pytest.mark.parametrize(
    ("channels", "covariance", "final_output"),
    [(4, "isotropic", "sample"), (4, "diagonal", "sample"), (9, "isotropic", "sample"), (9, "diagonal", "sample"),
     (4, "diagonal", "mean")],
)  # fmt: skip
def test_inpainting_keeps_the_known_region_exactly(channels, covariance, final_output) -> None:
    """The result equals the image latents where the mask keeps them (4-channel UNets and 9-channel inpainting
    UNets, which also see the mask and masked-image latents), also when the chain returns its last posterior mean;
    levels x sweeps calls, CFG in one batch."""
    if channels == 4:
        host = tiny_stable_diffusion_pipeline()
    else:
        host = StableDiffusionInpaintPipeline(**{**tiny_sd_components(), "unet": tiny_unet2d_condition(in_channels=9)})
    pipe = gibbs(host)
    image_latents = torch.randn(2, 4, 8, 8, generator=generator(3))
    keep = torch.zeros(2, 1, 8, 8)
    keep[..., :4] = 1.0  # the left half: the mask (pixels) repaints the right half
    extra = {"masked_image_latents": image_latents * keep} if channels == 9 else {}
    with count_calls(pipe.unet) as calls:
        out = pipe(
            PROMPTS,
            image=image_latents,
            mask_image=right_half_mask(),
            num_inference_steps=3,
            gibbs_sweeps=2,
            covariance=covariance,
            final_output=final_output,
            guidance_scale=5.0,
            generator=generator(),
            output_type="latent",
            **extra,
        )
    latents = out.images
    assert calls == [4] * 6 and out.num_forward == 6
    assert torch.equal(latents[..., :4], image_latents[..., :4])
    assert torch.isfinite(latents).all() and not torch.allclose(latents[..., 4:], image_latents[..., 4:])


def test_inpainting_from_pixels_and_strength(sd_pipe, image) -> None:
    """Pixels go through the host's VAE encoding; strength 0.5 of 4 levels runs 2 levels."""
    with count_calls(sd_pipe.unet) as calls:
        out = sd_pipe(
            PROMPTS,
            image=image,
            mask_image=right_half_mask(),
            strength=0.5,
            num_inference_steps=4,
            covariance="projection",
            generator=generator(),
            output_type="np",
        )
    assert len(calls) == 2 and out.images.shape == (2, 16, 16, 3)


# ---------------------------------------------------------------------------------------------- the host's own sampler
def ddim_host(cls: type, components: dict[str, Any]) -> Any:
    """``cls`` over ``components`` with DDIM (final alpha 1, so its last step returns the predicted x0)."""
    scheduler = DDIMScheduler(**{**SD_SCHEDULER_CONFIG, "set_alpha_to_one": True})
    host = cls(**{**components, "scheduler": scheduler})
    host.set_progress_bar_config(disable=True)
    return host


@pytest.mark.parametrize("mode", ["text", "img2img", "inpaint"])
def test_mean_only_eta_zero_chain_is_the_hosts_ddim_run(image, mode) -> None:
    """With Sigma = 0 and eta = 0 the chain is DDIM, so through the adapter it reproduces the host pipeline's own
    DDIM run from the same generator: prompts, guidance, the img2img start, the inpainting re-noising of the known
    region (strength < 1, where the host starts from the noised image too) and decoding are the host's."""
    components = tiny_sd_components()
    arguments: dict[str, Any] = dict(num_inference_steps=4, guidance_scale=5.0, output_type="np")
    if mode == "img2img":
        arguments.update(image=image, strength=0.5)
    elif mode == "inpaint":
        arguments.update(image=image, mask_image=right_half_mask(), strength=0.75)
    cls = SD_HOSTS[("text", "img2img", "inpaint").index(mode)]
    expected = ddim_host(cls, components)(PROMPTS, generator=generator(), **arguments).images
    pipe = gibbs(ddim_host(StableDiffusionPipeline, components), covariance="none", eta=0.0)
    got = pipe(PROMPTS, generator=generator(), **arguments).images
    assert abs(got - expected).max() < 1e-4


# ---------------------------------------------------------------------------------------------- exactness
class ExactGaussian:
    """A forward hook replacing the UNet's output by the exact prediction for Gaussian latents, one Gaussian per
    condition: x ~ N(m_c, s_c^2 I) for the condition c written in ``encoder_hidden_states[:, 0, 0]``.

    In the VE frame y = x_t / alpha_t = x + sigma eps the exact denoiser is mu(y) = m_c + a (y - m_c) with
    a = s_c^2 / (s_c^2 + sigma^2); the hook returns the prediction (epsilon here) that maps to this mu.
    """

    def __init__(self, schedule: NoiseSchedule, means: dict[int, float], stds: dict[int, float]):
        self.schedule, self.means, self.stds = schedule, means, stds

    def __call__(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], _output: Any) -> tuple[Any]:
        x_t, timestep = args[0][:, :4], args[1]
        ids = kwargs["encoder_hidden_states"][:, 0, 0].round().long().tolist()
        shape = (-1, 1, 1, 1)
        m = torch.tensor([self.means[c] for c in ids], dtype=x_t.dtype, device=x_t.device).view(shape)
        s = torch.tensor([self.stds[c] for c in ids], dtype=x_t.dtype, device=x_t.device).view(shape)
        alpha, s_t = self.schedule.alpha_s(torch.as_tensor(timestep).cpu())
        sigma = float(s_t / alpha)
        mu = m + s**2 / (s**2 + sigma**2) * (x_t / float(alpha) - m)
        return (self.schedule.prediction(mu, x_t, torch.as_tensor(timestep).cpu()).to(x_t.dtype),)


def condition_embeds(ids: list[int], width: int, length: int = 4) -> torch.Tensor:
    """Prompt embeddings that carry a condition id (every entry equals it)."""
    return torch.tensor(ids, dtype=torch.float64).view(-1, 1, 1).expand(-1, length, width).clone()


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("covariance", ["isotropic", "diagonal"])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_exact_gaussian_through_the_adapter(family, covariance, guidance_scale) -> None:
    """With the exact denoiser of a Gaussian per condition, 20 levels give that Gaussian: the final latents'
    mean and std per condition match the truth within 4 standard errors (float64, 32 samples x 256 latent
    dimensions per condition). The UNet is a stand-in with the family's interface (its output is replaced).

    Without guidance the target is N(m_c, s_c^2 I). With guidance scale g the adapter's denoiser is
    mu_g = mu_u + g (mu_c - mu_u), mu_u the negative branch's (condition c's negative prompt, N(n_c, s_c^2 I)).
    For Gaussians with the same s_c, both mu are affine in y with the same slope a = s_c^2 / (s_c^2 + sigma^2):
    mu_g(y) = (1 - g)(n_c + a (y - n_c)) + g (m_c + a (y - m_c)) = m* + a (y - m*), m* = (1 - g) n_c + g m_c,
    which is the exact denoiser of N(m*, s_c^2 I) at every sigma. Annealing therefore samples that Gaussian
    exactly (with different variances the guided slope would be a sigma-dependent mixture and no single Gaussian
    would be the target; this test keeps them equal). The conditions have s_1 != s_2: ``isotropic`` estimates one
    variance per sample (unbiased for an isotropic Gaussian), ``diagonal`` (Hutchinson) is exact for diagonal
    Jacobians. The start, N(0, I) at the first level instead of the exact marginal, is off by
    O(s^2 / sigma_max^2) ~ 1e-3.
    """
    n = 32
    ids = [1] * n + [2] * n
    means = {1: 1.0, 2: -0.5, 11: 0.2, 12: 0.3}  # 11, 12: the negative prompts of conditions 1, 2
    s1, s2 = 0.5, 0.8
    stds = {1: s1, 2: s2, 11: s1, 12: s2}
    if family == "sd":
        host, width, pooled = tiny_stable_diffusion_pipeline(), 32, None
    else:
        host, width, pooled = tiny_sdxl_pipeline(), 64, 32
    pipe = gibbs(host, covariance=covariance, unet=tiny_stand_in_unet(sdxl=family == "sdxl")).to(torch.float64)
    embeds: dict[str, torch.Tensor] = {"prompt_embeds": condition_embeds(ids, width)}
    if pooled:
        embeds["pooled_prompt_embeds"] = torch.zeros(2 * n, pooled, dtype=torch.float64)
    if guidance_scale > 1:
        embeds["negative_prompt_embeds"] = condition_embeds([10 + c for c in ids], width)
        if pooled:
            embeds["negative_pooled_prompt_embeds"] = torch.zeros(2 * n, pooled, dtype=torch.float64)
    handle = pipe.unet.register_forward_hook(
        ExactGaussian(pipe.scheduler.noise_schedule, means, stds), with_kwargs=True
    )
    try:
        out = pipe(
            **embeds,
            guidance_scale=guidance_scale,
            num_inference_steps=20,
            generator=generator(),
            output_type="latent",
        )
    finally:
        handle.remove()
    latents = out.images
    assert latents.dtype == torch.float64
    g = guidance_scale
    for c, rows in ((1, slice(0, n)), (2, slice(n, 2 * n))):
        target_mean = (1 - g) * means[10 + c] + g * means[c] if g > 1 else means[c]
        values = latents[rows]
        standard_error = 1 / values.numel() ** 0.5
        assert abs(values.mean().item() - target_mean) < 4 * stds[c] * standard_error, (c, values.mean(), target_mean)
        assert abs(values.std().item() / stds[c] - 1) < 4 * standard_error / 2**0.5, (c, values.std(), stds[c])


# ---------------------------------------------------------------------------------------------- generators
@pytest.mark.parametrize("covariance", ["none", "isotropic", "isotropic_batch", "diagonal", "projection"])
def test_per_image_generators_make_an_image_independent_of_its_batch(sd_pipe, covariance) -> None:
    """Image 0 with generator 0 is the same whatever image 1 is, for every covariance but ``isotropic_batch``,
    whose variance is one Analytic-DPM estimate pooled over the batch (``isotropic`` estimates it per image)."""

    def first(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        out = sd_pipe(
            prompts,
            covariance=covariance,
            num_inference_steps=3,
            guidance_scale=5.0,
            generator=[generator(s) for s in seeds],
            output_type="latent",
        )
        return out.images[0]

    a = first(["a red cat", "a blue dog"], [0, 1])
    assert torch.equal(a, first(["a red cat", "a blue dog"], [0, 1]))  # deterministic
    b = first(["a red cat", "the grass"], [0, 2])
    if covariance == "isotropic_batch":
        assert not torch.allclose(a, b, atol=1e-4)
    else:
        assert torch.allclose(a, b, atol=1e-5)


# ---------------------------------------------------------------------------------------------- the main job
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_main_job_runs_the_full_method_on_a_saved_pipeline_folder(tmp_path, capsys, family) -> None:
    """``examples/sample.py --model <folder> --prompt ... --covariance diagonal``: from_pipe over the loaded
    pipeline, guidance in one batched call per level, one backward pass per level."""
    import sample
    from PIL import Image

    folder = tmp_path / family
    (tiny_stable_diffusion_pipeline() if family == "sd" else tiny_sdxl_pipeline()).save_pretrained(folder)
    out = tmp_path / "grid.png"
    arguments = ["--model", str(folder), "--prompt", "a red cat", "--covariance", "diagonal", "--batch-size", "3"]
    sample.main([*arguments, "--steps", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "UNet2DConditionModel" in printed and "MomentMatchingGibbsPipeline" in printed
    assert "covariance=diagonal" in printed and "2 UNet forward passes, 2 backward passes" in printed
    assert Image.open(out).size[0] >= 2 * 16


def test_custom_timesteps_are_the_levels_as_the_host_takes_them(sd_pipe, image) -> None:
    """``timesteps=`` (e.g. an Align Your Steps schedule), which StableDiffusionPipeline passes to its scheduler:
    the chain visits exactly those levels; the default layout passed as custom timesteps gives the default run
    bit for bit (a callback that hands the tensors back unchanged changes nothing: it used to add the round-off of
    a frame round trip); img2img slices them as it slices the default ones; beside ``num_inference_steps`` they
    are refused (as the scheduler refuses both), and a family whose host takes none refuses them by name."""
    sd_pipe.scheduler.set_timesteps(4)
    default_levels = sd_pipe.scheduler.timesteps.tolist()
    seen: list[int] = []

    def record(_pipe: Any, _step: int, timestep: Any, tensors: dict) -> dict:
        seen.append(int(timestep))
        return tensors

    call = dict(output_type="latent", guidance_scale=3.0)
    default = sd_pipe(PROMPTS, num_inference_steps=4, generator=generator(), **call).images
    custom = sd_pipe(PROMPTS, timesteps=default_levels, generator=generator(), callback_on_step_end=record, **call)
    assert seen == default_levels and torch.equal(custom.images, default)
    seen.clear()
    ays = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]
    sd_pipe(PROMPTS, timesteps=ays, generator=generator(), callback_on_step_end=record, **call)
    assert seen == ays
    seen.clear()
    sd_pipe(
        PROMPTS, image=image, strength=0.5, timesteps=ays, generator=generator(), callback_on_step_end=record, **call
    )
    assert seen == ays[5:]
    with pytest.raises(ValueError, match="Pass `num_inference_steps` or `timesteps`, not both"):
        sd_pipe(PROMPTS, num_inference_steps=4, timesteps=ays, **call)
    from tiny_dit import tiny_dit_pipeline

    dit = gibbs(tiny_dit_pipeline())
    with pytest.raises(ValueError, match="does not take `timesteps`"):
        dit(class_labels=[1], timesteps=ays, output_type="latent")


def test_a_table_calibrated_for_custom_timesteps_serves_them() -> None:
    """``calibrate_covariance(timesteps=...)`` calibrates exactly those levels (the table then serves a call with
    the same ``timesteps``, and refuses the default layout's, which it does not hold); beside
    ``num_inference_steps`` they are refused before any model call."""
    pipe = gibbs(tiny_stable_diffusion_pipeline(), covariance="calibrated", eta=0.0)
    ays = [999, 736, 455, 124]
    samples = torch.randn(8, 4, 8, 8, generator=generator(1))
    with count_calls(pipe.unet) as calls, pytest.raises(ValueError, match="Pass `num_inference_steps` or `timesteps`"):
        pipe.calibrate_covariance(4, timesteps=ays, samples=samples, prompt="a cat", num_clusters=1, rank=2)
    assert calls == []
    table = pipe.calibrate_covariance(timesteps=ays, samples=samples, prompt="a cat", num_clusters=1, rank=2)
    pipe.scheduler.set_timesteps(timesteps=ays)
    assert table.sigmas == pytest.approx(pipe.scheduler.ve_sigmas()[: len(ays)])
    with count_calls(pipe.unet) as calls:
        pipe("a cat", timesteps=ays, output_type="latent", generator=generator())
    assert len(calls) == len(ays)
    with pytest.raises(ValueError, match="No calibrated covariance for sigma="):
        pipe("a cat", num_inference_steps=4, output_type="latent")
