"""Stable Diffusion 1.x / 2.x: ``UNet2DConditionModel`` with text cross-attention and classifier-free guidance."""

from __future__ import annotations

from typing import Any

import torch

from .base import Family, Job, guided


class StableDiffusion(Family):
    name = "Stable Diffusion 1.x/2.x (UNet2DConditionModel)"
    hosts = ("StableDiffusionPipeline",)
    model_classes = ("UNet2DConditionModel",)

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
        clip_skip: int | None = None,
        device: torch.device | None = None,
    ) -> Job:
        host, unet = self.host, self.host.unet
        height = height or unet.config.sample_size * host.vae_scale_factor
        width = width or unet.config.sample_size * host.vae_scale_factor
        host.check_inputs(prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds)
        guidance_scale = self.default("guidance_scale", guidance_scale)
        guidance_rescale = self.default("guidance_rescale", guidance_rescale)
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
        context = torch.cat([negative, positive]) if cfg else positive
        start = host.prepare_latents(
            len(positive), unet.config.in_channels, height, width, positive.dtype, device, generator, latents
        )

        def call(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            return unet(model_input.to(unet.dtype), timestep, encoder_hidden_states=context, return_dict=False)[0]

        return Job(
            latents=start.float(),
            predict=guided(call, guidance_scale if cfg else None, guidance_rescale),
            finish=lambda z, output_type: self.decode(z, output_type, generator, positive.dtype),
        )

    def decode(self, latents: torch.Tensor, output_type: str, generator: Any, dtype: torch.dtype) -> Any:
        """The host's own decoding: VAE, safety checker, image processor."""
        host = self.host
        if output_type == "latent":
            return latents
        vae = host.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False, generator=generator)
        image, nsfw = host.run_safety_checker(image[0], latents.device, dtype)
        denormalize = [True] * len(image) if nsfw is None else [not flagged for flagged in nsfw]
        return host.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)
