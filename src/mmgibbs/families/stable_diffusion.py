"""Stable Diffusion 1.x / 2.x: ``UNet2DConditionModel`` with text cross-attention and classifier-free guidance;
text-to-image, image-to-image and inpainting.

The mode follows the call's arguments, whatever host pipeline the sampler was built from (the host of each mode
is built from the same components and scheduler, as ``StableDiffusionImg2ImgPipeline(**pipe.components)`` would):

* no ``image``: text-to-image, from pure noise at the first level;
``image`` is what the host's image processor takes (PIL, numpy NHWC, tensors NCHW in [0, 1], or latents), and
also uint8 arrays and tensors in [0, 255] (scaled to [0, 1]) and PIL images of any mode (converted to RGB; an RGBA
image's alpha is dropped, as is a uint8 4-channel array's), see :func:`mmgibbs.checks.pixel_images`; one image, one
per prompt or one per generated image (:func:`mmgibbs.checks.per_image`).

* ``image`` (+ ``strength``): image-to-image. The chain starts at the LEVEL that ``strength`` selects (the host's
  own ``get_timesteps``: ``int(levels * strength)`` levels are run), i.e. at step ``level_index * gibbs_sweeps``,
  the first sweep of that level, from the host's ``prepare_latents(image, t_start)``: the VAE-encoded image
  noised to that level by this scheduler's ``add_noise``. It makes exactly (levels used) x sweeps model calls;
* ``image`` + ``mask_image`` (+ ``strength``, default 1): inpainting, a Gibbs step on the unknown pixels.

Inpainting. Let K be the known latent pixels (the mask is 0 there; ``keep`` = 1 - mask, at latent resolution)
and U the rest. At every level the sampler draws x ~ N(mu(y), Sigma(y)), sets x_K = image latents, and re-noises
the whole x to the next level (``mmgibbs.gibbs``, ``known=(image latents, keep)``): so the known region of every
y is the image re-noised to that level, and the network's mu(y) (and Sigma) is conditioned on it. The chain's
last draw equals the image latents exactly on K.

How this relates to RePaint (Lugmayr et al., CVPR 2022): RePaint runs an ancestral sampler and, at every step,
replaces the known region of x_{t-1} by the image forward-noised to t-1, q(x_{t-1} | x_0 = image), then
"resamples" (jumps back to t by re-noising and steps again) to harmonise the two regions. Here the replacement
happens on the clean draw x, not on the noisy sample: x_K = image is fixed in the Gibbs draw and the transition
re-noises it together with x_U (with ``transition="ancestral"`` the known region's noise is the same mixture of
kept and fresh noise as everywhere else, so y_K has exactly the marginal of the image noised to the next level).
Sweeps within a level (``gibbs_sweeps > 1``) play the role of RePaint's resampling with jump length one: they
re-noise to the same level and draw again with x_K clamped, which is a Gibbs sampler on x_U given x_K.

The draw is conditioned on x_K = image exactly, by Matheron's rule (``mmgibbs.gibbs.condition_on_known``): for
covariance ``"none"``, ``"isotropic"``, ``"diagonal"`` and ``"exact_diagonal"`` Sigma has no cross-covariance
between U and K and this is the replacement x_K <- image; for ``"full"`` the unknown part moves too, x_U <- x_U +
S_UK S_KK^-1 (image - x)_K, a draw of the joint Gaussian's conditional N(mu_U + S_UK S_KK^-1 (image - mu_K),
S_UU - S_UK S_KK^-1 S_KU). The structured ``"projection"`` draw (sigma J z) holds no Sigma and is only replaced.

Inpainting UNets with 9 input channels (``stable-diffusion-inpainting``) also get the host's extra input, the
latent mask and the masked image's latents, concatenated to the model input inside the prediction, as the host
does; 4-channel UNets are conditioned through the known region alone (the host blends the re-noised image into
the sample after each step instead, which is the same re-noising as above).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..checks import per_image, pixel_images
from .base import (
    Family,
    Job,
    Predict,
    chain_dtype,
    check_latents,
    condition_key,
    guidance_settings,
    guided,
    host_default,
    refuse_unused,
    sibling_host,
)

MODES = ("text", "img2img", "inpaint")


def mode_of(
    image: Any = None, mask_image: Any = None, masked_image_latents: Any = None, strength: float | None = None
) -> str:
    """``"text"``, ``"img2img"`` or ``"inpaint"``, from which of the image arguments were passed."""
    if mask_image is not None:
        if image is None:
            raise ValueError("`mask_image` needs `image` (inpainting: the image whose unmasked region is kept).")
        return "inpaint"
    if masked_image_latents is not None:
        raise ValueError("`masked_image_latents` needs `mask_image` (inpainting).")
    if image is not None:
        return "img2img"
    if strength is not None:
        raise ValueError("`strength` needs `image` (image-to-image or inpainting).")
    return "text"


def start_step(host: Any, scheduler: Any, strength: float, device: Any) -> int:
    """The first step of an img2img / inpainting chain: the level ``strength`` selects (the host's own
    ``get_timesteps``), times ``gibbs_sweeps``, so the chain starts on the first sweep of a level."""
    levels = scheduler.num_inference_steps
    _, used = host.get_timesteps(levels, strength, device)
    if used < 1:
        raise ValueError(
            f"`strength`={strength} leaves none of the {levels} levels to run; raise `strength` or "
            "`num_inference_steps`."
        )
    return (levels - used) * scheduler.config.gibbs_sweeps


@dataclass
class Start:
    """Where an image chain starts: the model-frame latents at step ``start``, the known region (inpainting) and
    the extra input channels of a 9-channel inpainting UNet (mask and masked-image latents)."""

    latents: torch.Tensor
    start: int = 0
    known: tuple[torch.Tensor, torch.Tensor] | None = None
    channels: torch.Tensor | None = None


def chain_start(
    host: Any,
    scheduler: Any,
    mode: str,
    *,
    batch: int,
    num_images_per_prompt: int,
    dtype: torch.dtype,
    device: Any,
    generator: Any,
    image: Any,
    strength: float,
    height: int | None = None,
    width: int | None = None,
    mask_image: Any = None,
    masked_image_latents: torch.Tensor | None = None,
    latents: torch.Tensor | None = None,
) -> Start:
    """The start of a text-to-image, img2img or inpainting chain with the host's own ``prepare_latents`` (and
    ``image_processor``, ``mask_processor``, ``prepare_mask_latents``), shared by SD 1.x/2.x and SDXL, whose hosts
    have them.

    ``batch`` counts images (prompts x ``num_images_per_prompt``). Text-to-image starts from the host's noise at
    the first level. For inpainting, the known region of the start is the image noised to the first level with the
    start's own noise: every level, the first included, sees the re-noised image there.
    """
    channels = host.unet.config.in_channels
    if mode != "inpaint" and channels != host.vae.config.latent_channels:
        raise ValueError(
            f"This UNet takes {channels} input channels (latents, mask, masked-image latents: an inpainting UNet); "
            "pass `mask_image` (and `image`) to inpaint with it."
        )
    prompts = batch // num_images_per_prompt
    image = pixel_images(image)  # uint8 scaled from [0, 255], RGBA / grayscale to RGB
    if mode == "text":
        check_latents(latents, batch, channels, height, width, host.vae_scale_factor)
        x_t = host.prepare_latents(batch, channels, height, width, dtype, device, generator, latents)
        return Start(latents=x_t)
    if mode == "img2img":
        refuse_unused("Image-to-image", latents=latents, height=height, width=width)
    start = start_step(host, scheduler, strength, device)
    timestep = scheduler.timesteps[start : start + 1].repeat(batch)
    if mode == "img2img":
        pixels = per_image(host.image_processor.preprocess(image), "image", prompts, num_images_per_prompt)
        x_t = host.prepare_latents(pixels, timestep, prompts, num_images_per_prompt, dtype, device, generator)
        return Start(latents=x_t, start=start)
    pixels = host.image_processor.preprocess(image, height=height, width=width).to(torch.float32)
    pixels = per_image(pixels, "image", prompts, num_images_per_prompt)
    check_latents(latents, batch, host.vae.config.latent_channels, height, width, host.vae_scale_factor)
    x_t, noise, image_latents = host.prepare_latents(
        batch,
        host.vae.config.latent_channels,
        height,
        width,
        dtype,
        device,
        generator,
        latents,
        image=pixels,
        timestep=timestep,
        is_strength_max=strength == 1.0,
        return_noise=True,
        return_image_latents=True,
    )
    mask = host.mask_processor.preprocess(mask_image, height=height, width=width)
    mask = per_image(mask, "mask_image", prompts, num_images_per_prompt)
    nine_channels = host.unet.config.in_channels != x_t.shape[1]
    if masked_image_latents is not None:
        masked = per_image(masked_image_latents, "masked_image_latents", prompts, num_images_per_prompt)
    elif pixels.shape[1] != image_latents.shape[1]:
        masked = pixels * (mask < 0.5)
    elif nine_channels:
        raise ValueError("With latents as `image`, a 9-channel inpainting UNet needs `masked_image_latents`.")
    else:
        masked = image_latents  # never seen by a 4-channel UNet; the host only resizes the mask then
    mask, masked_latents = host.prepare_mask_latents(
        mask, masked, batch, height, width, dtype, device, generator, False
    )
    keep = 1 - mask
    x_t = torch.lerp(x_t, scheduler.add_noise(image_latents, noise, timestep).to(x_t.dtype), keep)
    channels = None
    if nine_channels:
        channels = torch.cat([mask, masked_latents], dim=1)
        if x_t.shape[1] + channels.shape[1] != host.unet.config.in_channels:
            raise ValueError(
                f"The UNet takes {host.unet.config.in_channels} input channels; latents, mask and masked-image "
                f"latents have {x_t.shape[1]} + {mask.shape[1]} + {masked_latents.shape[1]}."
            )
    return Start(latents=x_t, start=start, known=(image_latents, keep), channels=channels)


def unet_call(
    unet: torch.nn.Module,
    context: torch.Tensor,
    channels: torch.Tensor | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> Predict:
    """``(model_input, t) -> unet(model_input [+ channels], t, encoder_hidden_states=context, ...)`` on the batch of
    ``context`` (both guidance branches with CFG); ``channels`` (mask and masked-image latents of a 9-channel
    inpainting UNet, one copy per image) are repeated over the branches."""
    if channels is not None and len(context) != len(channels):
        channels = channels.repeat(len(context) // len(channels), 1, 1, 1)

    def call(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        x = model_input.to(unet.dtype)
        if channels is not None:
            x = torch.cat([x, channels.to(x.dtype)], dim=1)
        out = unet(x, timestep, encoder_hidden_states=context, added_cond_kwargs=added_cond_kwargs, return_dict=False)
        return out[0]

    return call


class StableDiffusion(Family):
    name = "Stable Diffusion 1.x/2.x (UNet2DConditionModel)"
    hosts = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
    model_classes = ("UNet2DConditionModel",)
    embeddings: ClassVar[dict[str, tuple[int, str, str]]] = dict.fromkeys(
        ("prompt_embeds", "negative_prompt_embeds"), (3, "unet", "cross_attention_dim")
    )
    #: the host pipeline class of each mode (:data:`MODES`)
    mode_hosts: ClassVar[dict[str, str]] = dict(zip(MODES, hosts, strict=True))
    conditioning = ("prompt", "negative_prompt", "prompt_embeds", "negative_prompt_embeds")

    def prepare(
        self,
        scheduler: Any,
        *,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: Any = None,
        latents: torch.Tensor | None = None,
        image: Any = None,
        mask_image: Any = None,
        masked_image_latents: torch.Tensor | None = None,
        strength: float | None = None,
        clip_skip: int | None = None,
        device: torch.device | None = None,
    ) -> Job:
        mode = mode_of(image, mask_image, masked_image_latents, strength)
        host = sibling_host(self.host, self.mode_hosts[mode], self.host_values(self.host))
        unet = host.unet
        guidance_scale = host_default(host, "guidance_scale", guidance_scale)
        guidance_rescale = host_default(host, "guidance_rescale", guidance_rescale) or 0.0
        strength = host_default(host, "strength", strength)
        if mode != "img2img":
            height = height or unet.config.sample_size * host.vae_scale_factor
            width = width or unet.config.sample_size * host.vae_scale_factor
        prompts = (negative_prompt, prompt_embeds, negative_prompt_embeds)
        if mode == "text":
            host.check_inputs(prompt, height, width, None, *prompts)
        elif mode == "img2img":
            host.check_inputs(prompt, strength, None, *prompts)
        else:
            host.check_inputs(prompt, image, mask_image, height, width, strength, None, None, *prompts)
        cfg = guidance_scale > 1 and unet.config.time_cond_proj_dim is None
        positive, negative = host.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            cfg,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            clip_skip=clip_skip,
        )
        begin = chain_start(
            host,
            scheduler,
            mode,
            batch=len(positive),
            num_images_per_prompt=num_images_per_prompt,
            dtype=positive.dtype,
            device=device,
            generator=generator,
            image=image,
            strength=strength,
            height=height,
            width=width,
            mask_image=mask_image,
            masked_image_latents=masked_image_latents,
            latents=latents,
        )
        context = torch.cat([negative, positive]) if cfg else positive
        call = unet_call(unet, context, begin.channels)
        return Job(
            latents=chain_dtype(begin.latents),
            predict=guided(call, guidance_scale if cfg else None, guidance_rescale),
            finish=lambda z, output_type: self.decode(host, z, output_type, generator, positive.dtype),
            start=begin.start,
            known=begin.known,
            extra={
                "condition": condition_key(positive, negative if cfg else None),
                "guidance": guidance_settings(cfg, guidance_scale, guidance_rescale=guidance_rescale),
            },
        )

    @staticmethod
    def decode(host: Any, latents: torch.Tensor, output_type: str, generator: Any, dtype: torch.dtype) -> Any:
        """The host's own decoding: VAE, safety checker, image processor."""
        if output_type == "latent":
            return latents
        vae = host.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False, generator=generator)
        image, nsfw = host.run_safety_checker(image[0], latents.device, dtype)
        denormalize = [True] * len(image) if nsfw is None else [not flagged for flagged in nsfw]
        return host.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)
