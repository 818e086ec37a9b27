"""Flux (FLUX.1 dev / schnell and guidance-distilled relatives): ``FluxTransformer2DModel`` on packed latents.

The Gibbs chain runs on the host's packed latents (2 x 2 latent patches as tokens, ``_pack_latents``); since the
packing is a permutation of coordinates, the noise frame and every covariance are the same as on the image
latents. The transformer is called as the host calls it:

    transformer(hidden_states=x_t, timestep=u, guidance, pooled_projections, encoder_hidden_states, txt_ids, img_ids)

with the timestep as u = t / 1000 in [0, 1], the pooled CLIP embedding, T5's sequence from the host's
``encode_prompt``, ``img_ids`` from ``_prepare_latent_image_ids``, and ``guidance`` = ``guidance_scale`` per sample
when ``transformer.config.guidance_embeds`` (Flux-dev: guidance is an input of a distilled model, one branch, no
CFG). True classifier-free guidance (``true_cfg_scale`` > 1 with a negative prompt, as FluxPipeline has it) runs
both branches in one batched call: v = v_u + g (v_c - v_u), so the Jacobian covariances are those of the guided
denoiser. Levels are shifted by mu from the token count (:class:`FlowMatching`) with the host's default
``sigmas`` = linspace(1, 1/n, n). Decoding is the host's: unpack, z / scaling_factor + shift_factor, VAE, image
processor. ``output_type="latent"`` returns packed latents, as FluxPipeline does.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Job, chain_dtype, check_latents, condition_key, guided
from .flow import FlowMatching


class Flux(FlowMatching):
    name = "Flux (FluxTransformer2DModel)"
    hosts = ("FluxPipeline",)
    model_classes = ("FluxTransformer2DModel",)
    default_max_shift = 1.15
    host_sigmas = True
    always_mu = True
    conditioning = (
        "prompt",
        "prompt_2",
        "negative_prompt",
        "negative_prompt_2",
        "prompt_embeds",
        "pooled_prompt_embeds",
        "negative_prompt_embeds",
        "negative_pooled_prompt_embeds",
    )

    def image_seq_len(self, arguments: dict[str, Any]) -> int:
        """Packed tokens per image: ``latents.shape[1]``, as the host counts it for ``mu``."""
        latents = arguments.get("latents")
        if latents is not None:
            return int(latents.shape[1])
        height, width = self.size(arguments.get("height"), arguments.get("width"))
        factor = self.host.vae_scale_factor * 2
        return (int(height) // factor) * (int(width) // factor)

    def prepare(
        self,
        scheduler: Any,
        *,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: Any = None,
        latents: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        sigmas: list[float] | None = None,
        device: torch.device | None = None,
    ) -> Job:
        """The host's own steps: ``check_inputs``, ``encode_prompt`` (per branch), ``prepare_latents`` (noise,
        packing, image ids); ``sigmas`` were used by :meth:`set_timesteps`."""
        host, transformer = self.host, self.host.transformer
        height, width = self.size(height, width)
        max_sequence_length = self.default("max_sequence_length", max_sequence_length)
        host.check_inputs(
            prompt,
            prompt_2,
            height,
            width,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            max_sequence_length=max_sequence_length,
        )
        true_cfg_scale = self.default("true_cfg_scale", true_cfg_scale)
        guidance_scale = self.default("guidance_scale", guidance_scale)
        has_negative = negative_prompt is not None or (
            negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None
        )
        cfg = true_cfg_scale > 1 and has_negative  # the host's do_true_cfg
        lora_scale = (joint_attention_kwargs or {}).get("scale")
        encode = dict(
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
            lora_scale=lora_scale,
        )
        positive, pooled, text_ids = host.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            **encode,
        )
        context, pooled_context = positive, pooled
        key = [positive, pooled]
        if cfg:
            if isinstance(prompt, list):  # one negative prompt for every prompt, as StableDiffusion3Pipeline does
                negative_prompt = (
                    [negative_prompt] * len(prompt) if isinstance(negative_prompt, str) else negative_prompt
                )
                if isinstance(negative_prompt_2, str):
                    negative_prompt_2 = [negative_prompt_2] * len(prompt)
            negative, negative_pooled, _ = host.encode_prompt(
                prompt=negative_prompt,
                prompt_2=negative_prompt_2,
                prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=negative_pooled_prompt_embeds,
                **encode,
            )
            if negative.shape != positive.shape:
                raise ValueError(
                    "With `true_cfg_scale` > 1 both branches run in one batched call, so the negative prompt "
                    f"embeddings must have the shape of the prompt's: {tuple(negative.shape)} != "
                    f"{tuple(positive.shape)} (pass `negative_prompt_embeds` of the prompt's shape)."
                )
            context, pooled_context = torch.cat([negative, positive]), torch.cat([negative_pooled, pooled])
            key += [negative, negative_pooled]
        channels = transformer.config.in_channels // 4
        check_latents(latents, len(positive), 4 * channels, height, width, host.vae_scale_factor, packed=True)
        start, image_ids = host.prepare_latents(
            len(positive),
            transformer.config.in_channels // 4,
            height,
            width,
            positive.dtype,
            device,
            generator,
            latents,
        )
        guidance = (
            torch.full([1], guidance_scale, device=device, dtype=torch.float32)
            if transformer.config.guidance_embeds
            else None
        )

        def call(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            n = len(model_input)
            return transformer(
                hidden_states=model_input.to(transformer.dtype),
                timestep=timestep.expand(n).to(transformer.dtype) / 1000,
                guidance=None if guidance is None else guidance.expand(n),
                pooled_projections=pooled_context,
                encoder_hidden_states=context,
                txt_ids=text_ids,
                img_ids=image_ids,
                joint_attention_kwargs=joint_attention_kwargs,
                return_dict=False,
            )[0]

        return Job(
            latents=chain_dtype(start),
            predict=guided(call, true_cfg_scale if cfg else None),
            finish=lambda z, output_type: self.decode_packed(z, output_type, height, width),
            extra={
                "condition": condition_key(*key),
                "guidance": {
                    "true_cfg_scale": float(true_cfg_scale) if cfg else None,
                    "guidance_scale": float(guidance_scale) if guidance is not None else None,  # an input of the model
                },
            },
        )

    def decode_packed(self, latents: torch.Tensor, output_type: str, height: int, width: int) -> Any:
        """The host's decoding: ``_unpack_latents``, then :meth:`FlowMatching.decode` (``output_type="latent"``
        returns the packed latents, as the host does)."""
        if output_type == "latent":
            return latents
        host = self.host
        return self.decode(host._unpack_latents(latents, height, width, host.vae_scale_factor), output_type)
