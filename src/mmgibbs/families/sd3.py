"""Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel`` on unpacked latents, three text encoders, CFG.

The host's ``encode_prompt`` gives the joint sequence (two CLIP encoders' hidden states, zero-padded to the T5
width, then T5's; zeros where ``text_encoder_3`` is None) and the pooled CLIP projections; the transformer is
called as ``transformer(hidden_states=x_t, timestep=u * 1000, encoder_hidden_states, pooled_projections)`` and
predicts the flow velocity v = eps - x. Both CFG branches run in one batched call, v = v_u + g (v_c - v_u), so
mu = x_t - u v is guided in the same way and every Jacobian covariance is the guided denoiser's. Decoding is the
host's: z / scaling_factor + shift_factor through the VAE, then its image processor.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Job, chain_dtype, check_latents, condition_key, guidance_settings, guided
from .flow import FlowMatching


class StableDiffusion3(FlowMatching):
    name = "Stable Diffusion 3 (SD3Transformer2DModel)"
    hosts = ("StableDiffusion3Pipeline",)
    model_classes = ("SD3Transformer2DModel",)
    default_max_shift = 1.16
    conditioning = (
        "prompt",
        "prompt_2",
        "prompt_3",
        "negative_prompt",
        "negative_prompt_2",
        "negative_prompt_3",
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    )

    def image_seq_len(self, arguments: dict[str, Any]) -> int:
        """(latent height / patch) x (latent width / patch), as the host counts it for ``mu``."""
        latents = arguments.get("latents")
        if latents is not None:
            h, w = latents.shape[-2:]
        else:
            height, width = self.size(arguments.get("height"), arguments.get("width"))
            h, w = int(height) // self.host.vae_scale_factor, int(width) // self.host.vae_scale_factor
        patch = self.host.transformer.config.patch_size
        return (h // patch) * (w // patch)

    def prepare(
        self,
        scheduler: Any,
        *,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: Any = None,
        latents: torch.Tensor | None = None,
        clip_skip: int | None = None,
        max_sequence_length: int | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        device: torch.device | None = None,
    ) -> Job:
        """The host's own steps: ``check_inputs``, ``encode_prompt`` (both branches when guidance_scale > 1),
        ``prepare_latents``; ``sigmas``/``mu`` were used by :meth:`set_timesteps`."""
        host, transformer = self.host, self.host.transformer
        height, width = self.size(height, width)
        max_sequence_length = self.default("max_sequence_length", max_sequence_length)
        host.check_inputs(
            prompt,
            prompt_2,
            prompt_3,
            height,
            width,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            max_sequence_length=max_sequence_length,
        )
        guidance_scale = self.default("guidance_scale", guidance_scale)
        cfg = guidance_scale > 1  # the host's do_classifier_free_guidance
        positive, negative, pooled, negative_pooled = host.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            prompt_3=prompt_3,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            do_classifier_free_guidance=cfg,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            device=device,
            clip_skip=clip_skip,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
            lora_scale=(joint_attention_kwargs or {}).get("scale"),
        )
        key = condition_key(positive, pooled, *((negative, negative_pooled) if cfg else ()))
        context = torch.cat([negative, positive]) if cfg else positive
        pooled_context = torch.cat([negative_pooled, pooled]) if cfg else pooled
        check_latents(latents, len(positive), transformer.config.in_channels, height, width, host.vae_scale_factor)
        start = host.prepare_latents(
            len(positive), transformer.config.in_channels, height, width, positive.dtype, device, generator, latents
        )

        def call(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            return transformer(
                hidden_states=model_input.to(transformer.dtype),
                timestep=timestep.expand(len(model_input)),
                encoder_hidden_states=context,
                pooled_projections=pooled_context,
                joint_attention_kwargs=joint_attention_kwargs,
                return_dict=False,
            )[0]

        return Job(
            latents=chain_dtype(start),
            predict=guided(call, guidance_scale if cfg else None),
            finish=self.decode,
            extra={"condition": key, "guidance": guidance_settings(cfg, guidance_scale)},
        )
