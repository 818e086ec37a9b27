"""Stable Diffusion XL through `MomentMatchingGibbsPipeline.from_pipe`: text, image-to-image and inpainting, every
covariance with and without guidance, and the host's own conditioning (pooled text embeddings, size ids)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from tiny_pipelines import count_calls, generator, gibbs
from tiny_sdxl import tiny_sdxl_components, tiny_sdxl_pipeline

from mmgibbs import MomentMatchingGibbsPipeline

PROMPTS = ["a red cat", "a blue dog"]
MODES = ("text", "img2img", "inpaint")
HOST_CLASSES = (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline)
SDXL_HOSTS = dict(zip(MODES, HOST_CLASSES, strict=True))


@pytest.fixture(scope="module")
def sdxl_pipe() -> MomentMatchingGibbsPipeline:
    return gibbs(tiny_sdxl_pipeline())


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=generator(7))


def mode_arguments(mode: str, image: torch.Tensor) -> dict[str, Any]:
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 8:] = 1.0
    return {"text": {}, "img2img": {"image": image, "strength": 0.5}, "inpaint": {"image": image, "mask_image": mask}}[
        mode
    ]


def test_from_pipe_shares_components_and_keeps_the_watermarker_setting() -> None:
    host = tiny_sdxl_pipeline()
    pipe = gibbs(host, covariance="diagonal")
    assert pipe.unet is host.unet and pipe.text_encoder_2 is host.text_encoder_2
    assert pipe.tokenizer_2 is host.tokenizer_2
    assert pipe.config.host_pipeline == "StableDiffusionXLPipeline"
    assert pipe.config.host_config == {"force_zeros_for_empty_prompt": True, "add_watermarker": False}


@pytest.mark.parametrize("covariance", ["none", "isotropic", "diagonal", "projection"])
@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_covariance_and_guidance(sdxl_pipe, image, mode, covariance, guidance_scale) -> None:
    """Levels x sweeps calls (img2img strength 0.5 of 2 levels: 1 level; SDXL inpainting's default strength
    0.9999 also skips the first level, as its host does), each on the doubled batch with guidance."""
    with count_calls(sdxl_pipe.unet) as calls:
        out = sdxl_pipe(
            PROMPTS,
            covariance=covariance,
            guidance_scale=guidance_scale,
            guidance_rescale=0.5,
            num_inference_steps=2,
            gibbs_sweeps=2,
            generator=generator(),
            output_type="np",
            **mode_arguments(mode, image),
        )
    assert out.images.shape == (2, 16, 16, 3) and (out.images >= 0).all() and (out.images <= 1).all()
    steps = 4 if mode == "text" else 2
    assert calls == [4 if guidance_scale > 1 else 2] * steps and out.num_forward == steps
    assert out.num_backward == (steps if covariance in ("diagonal", "projection") else 0)


def ddim_host(cls: type, components: dict[str, Any]) -> Any:
    """``cls`` over ``components`` with DDIM on the same betas (final alpha 1: the last step returns x0)."""
    scheduler = DDIMScheduler.from_config(components["scheduler"].config, set_alpha_to_one=True, clip_sample=False)
    host = cls(**{**components, "scheduler": scheduler})
    host.set_progress_bar_config(disable=True)
    return host


@pytest.mark.parametrize("mode", MODES)
def test_mean_only_eta_zero_chain_is_the_hosts_ddim_run(image, mode) -> None:
    """Sigma = 0, eta = 0 is DDIM: through the adapter the chain reproduces the SDXL host's own DDIM run (two
    encoders, pooled embeddings, size/aesthetic ids, guidance with rescale, img2img start, inpainting re-noising,
    upcast-aware decoding with the VAE's latents_mean/std) from the same generator."""
    components = tiny_sdxl_components()
    components["vae"].register_to_config(latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.5, 1.0, 2.0])
    arguments: dict[str, Any] = dict(num_inference_steps=4, guidance_scale=5.0, guidance_rescale=0.7, output_type="np")
    arguments.update(mode_arguments(mode, image))
    expected = ddim_host(SDXL_HOSTS[mode], components)(PROMPTS, generator=generator(), **arguments).images
    pipe = gibbs(ddim_host(StableDiffusionXLPipeline, components), covariance="none", eta=0.0)
    got = pipe(PROMPTS, generator=generator(), **arguments).images
    assert abs(got - expected).max() < 1e-4


def test_negative_size_ids_go_to_the_negative_branch(sdxl_pipe) -> None:
    """With CFG the UNet's rows are [negative..., positive...]; each branch gets its own size ids (one row per
    image), the negative ones from ``negative_original_size``/``negative_target_size``."""
    seen: list[torch.Tensor] = []

    def hook(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone())

    handle = sdxl_pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        sdxl_pipe(
            PROMPTS,
            num_inference_steps=1,
            guidance_scale=5.0,
            negative_original_size=(8, 8),
            negative_target_size=(12, 12),
            output_type="latent",
        )
    finally:
        handle.remove()
    negative, positive = torch.tensor([8.0, 8, 0, 0, 12, 12]), torch.tensor([16.0, 16, 0, 0, 16, 16])
    assert torch.equal(seen[0], torch.stack([negative, negative, positive, positive]))


def test_inpainting_keeps_the_known_region_exactly(sdxl_pipe) -> None:
    image_latents = torch.randn(2, 4, 8, 8, generator=generator(3))
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 8:] = 1.0
    out = sdxl_pipe(
        PROMPTS,
        image=image_latents,
        mask_image=mask,
        strength=1.0,
        num_inference_steps=3,
        covariance="diagonal",
        generator=generator(),
        output_type="latent",
    )
    assert torch.equal(out.images[..., :4], image_latents[..., :4])


@pytest.mark.parametrize("covariance", ["none", "isotropic", "diagonal", "projection"])
def test_per_image_generators(sdxl_pipe, covariance) -> None:
    """Image 0 with its own generator does not depend on the rest of the batch (``isotropic_batch`` does: see the
    SD test)."""

    def first(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        out = sdxl_pipe(
            prompts,
            covariance=covariance,
            num_inference_steps=2,
            generator=[generator(s) for s in seeds],
            output_type="latent",
        )
        return out.images[0]

    alone = first(["a red cat", "a blue dog"], [0, 1])
    assert torch.allclose(alone, first(["a red cat", "the grass"], [0, 2]), atol=1e-5)


def test_sdxl_arguments_get_clear_errors(sdxl_pipe, image) -> None:
    class MyPipeline(StableDiffusionXLPipeline):
        pass

    with pytest.raises(ValueError, match=r"not support the pipeline MyPipeline\. Supported: .*Stable Diffusion XL"):
        MomentMatchingGibbsPipeline.from_pipe(MyPipeline(**tiny_sdxl_components()))
    with pytest.raises(ValueError, match="`aesthetic_score` conditions image-to-image and inpainting only"):
        sdxl_pipe("a cat", aesthetic_score=7.0, num_inference_steps=1)
    with pytest.raises(ValueError, match="does not take `denoising_end`"):
        sdxl_pipe("a cat", denoising_end=0.5, num_inference_steps=1)
    with pytest.raises(ValueError, match="Image-to-image takes no `height`"):
        sdxl_pipe("a cat", image=image[:1], height=32, num_inference_steps=1)
