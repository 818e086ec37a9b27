"""Stable Diffusion XL: ``UNet2DConditionModel`` with two text encoders and SDXL's micro-conditioning;
text-to-image, image-to-image and inpainting.

What SDXL adds to :mod:`mmgibbs.families.stable_diffusion` (whose modes, img2img start and inpainting Gibbs step
it shares, see there):

* the host's ``encode_prompt`` returns four tensors: both encoders' hidden states (concatenated) for the UNet's
  cross-attention and the second encoder's pooled projection, for the positive and the negative prompt;
* the UNet takes ``added_cond_kwargs = {"text_embeds": pooled, "time_ids": ids}``, the size conditioning from the
  host's ``_get_add_time_ids`` (original size, crop corner, target size; img2img/inpainting hosts put an aesthetic
  score in place of the target size when ``requires_aesthetics_score``), per branch with CFG: the negative branch
  gets the negative prompt's pooled embedding and the ``negative_*`` size ids;
* decoding as the host does it: the VAE upcast to float32 when it is float16 and ``force_upcast``, latents
  un-normalised with the VAE's ``latents_mean``/``latents_std`` when configured (else divided by its scaling
  factor), the host's watermarker (if any) and image processor;
* ``guidance_rescale`` (Lin et al. 2023) inside the guided prediction, so Jacobian covariances see it too;
* ``negative_prompt_2`` without ``negative_prompt`` is used, with "" for the first text encoder (the host would
  zero the whole negative branch under ``force_zeros_for_empty_prompt``, dropping ``negative_prompt_2``).

The host's defaults hold per mode: e.g. ``StableDiffusionXLInpaintPipeline``'s default ``strength`` is 0.9999,
which (as in the host) skips the first level and starts from the image noised to the second.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import Job, chain_dtype, condition_key, guidance_settings, guided, host_default, sibling_host
from .stable_diffusion import MODES, StableDiffusion, chain_start, mode_of, unet_call

Size = tuple[int, int]


def check_prompt_batches(prompts: dict[str, Any]) -> None:
    """SDXL's second prompts against the first: as many as ``prompt`` (or one string for all), before the host's
    ``encode_prompt`` concatenates their embeddings (a tensor size error otherwise)."""

    def count(value: Any) -> int:
        return 1 if isinstance(value, str) else len(value)

    for first, second in (
        ("prompt", "prompt_2"),
        ("negative_prompt", "negative_prompt_2"),
        ("prompt", "negative_prompt_2"),
    ):
        a, b = prompts.get(first), prompts.get(second)
        if a is not None and isinstance(b, (list, tuple)) and count(b) != count(a):
            raise ValueError(
                f"`{second}` holds {count(b)} prompts and `{first}` {count(a)}: pass one `{second}` per prompt (or "
                "one string for all)."
            )


class StableDiffusionXL(StableDiffusion):
    name = "Stable Diffusion XL (UNet2DConditionModel, two text encoders)"
    hosts = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
    model_classes = ()  # a bare UNet2DConditionModel is taken for SD 1.x/2.x; SDXL comes with its host
    mode_hosts: ClassVar[dict[str, str]] = dict(zip(MODES, hosts, strict=True))
    conditioning = (
        *StableDiffusion.conditioning,
        "prompt_2",
        "negative_prompt_2",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    )
    embeddings: ClassVar[dict[str, tuple[int, str, str]]] = {
        **StableDiffusion.embeddings,
        **dict.fromkeys(
            ("pooled_prompt_embeds", "negative_pooled_prompt_embeds"), (2, "text_encoder_2", "projection_dim")
        ),
    }

    @classmethod
    def host_values(cls, pipeline: Any) -> dict[str, Any]:
        """SDXL hosts keep ``add_watermarker`` out of their config; it shows as ``pipeline.watermark``."""
        return {"add_watermarker": pipeline.watermark is not None} if hasattr(pipeline, "watermark") else {}

    def prepare(
        self,
        scheduler: Any,
        *,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
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
        original_size: Size | None = None,
        crops_coords_top_left: Size | None = None,
        target_size: Size | None = None,
        negative_original_size: Size | None = None,
        negative_crops_coords_top_left: Size | None = None,
        negative_target_size: Size | None = None,
        aesthetic_score: float | None = None,
        negative_aesthetic_score: float | None = None,
        clip_skip: int | None = None,
        device: torch.device | None = None,
    ) -> Job:
        mode = mode_of(image, mask_image, masked_image_latents, strength)
        host = sibling_host(self.host, self.mode_hosts[mode], self.host_values(self.host))
        unet = host.unet
        if mode == "text" and (aesthetic_score is not None or negative_aesthetic_score is not None):
            raise ValueError("`aesthetic_score` conditions image-to-image and inpainting only (pass `image`).")
        guidance_scale = host_default(host, "guidance_scale", guidance_scale)
        guidance_rescale = host_default(host, "guidance_rescale", guidance_rescale) or 0.0
        strength = host_default(host, "strength", strength)
        if negative_prompt is None and negative_prompt_2 is not None:
            negative_prompt = ""  # else the host zeroes the negative branch (force_zeros_for_empty_prompt): dropped
        if mode != "img2img":
            height = height or unet.config.sample_size * host.vae_scale_factor
            width = width or unet.config.sample_size * host.vae_scale_factor
        prompts = (prompt, prompt_2)
        embeds = (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)
        negatives = (negative_prompt, negative_prompt_2)
        if mode == "text":
            host.check_inputs(*prompts, height, width, None, *negatives, *embeds)
        elif mode == "img2img":
            steps = scheduler.num_inference_steps
            host.check_inputs(*prompts, strength, steps, None, *negatives, prompt_embeds, negative_prompt_embeds)
        else:
            sizes = (height, width, strength, None, None)
            host.check_inputs(*prompts, image, mask_image, *sizes, *negatives, prompt_embeds, negative_prompt_embeds)
        cfg = guidance_scale > 1 and unet.config.time_cond_proj_dim is None
        check_prompt_batches(
            {"prompt": prompt, "prompt_2": prompt_2, "negative_prompt": negative_prompt,
             "negative_prompt_2": negative_prompt_2}
        )  # fmt: skip
        positive, negative, pooled, negative_pooled = host.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            clip_skip=clip_skip,
        )
        batch, dtype = len(positive), positive.dtype
        begin = chain_start(
            host,
            scheduler,
            mode,
            batch=batch,
            num_images_per_prompt=num_images_per_prompt,
            dtype=dtype,
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
        size = (begin.latents.shape[-2] * host.vae_scale_factor, begin.latents.shape[-1] * host.vae_scale_factor)
        original_size, target_size = original_size or size, target_size or size
        crops = host_default(host, "crops_coords_top_left", crops_coords_top_left)
        negative_crops = host_default(host, "negative_crops_coords_top_left", negative_crops_coords_top_left)
        projection = (
            int(pooled.shape[-1]) if host.text_encoder_2 is None else host.text_encoder_2.config.projection_dim
        )
        if mode == "text":
            time_ids = host._get_add_time_ids(original_size, crops, target_size, dtype, projection)
            negative_time_ids = time_ids
            if negative_original_size is not None and negative_target_size is not None:
                negative_time_ids = host._get_add_time_ids(
                    negative_original_size, negative_crops, negative_target_size, dtype, projection
                )
        else:
            time_ids, negative_time_ids = host._get_add_time_ids(
                original_size,
                crops,
                target_size,
                host_default(host, "aesthetic_score", aesthetic_score),
                host_default(host, "negative_aesthetic_score", negative_aesthetic_score),
                negative_original_size or original_size,
                negative_crops,
                negative_target_size or target_size,
                dtype=dtype,
                text_encoder_projection_dim=projection,
            )
        key = condition_key(positive, pooled, *((negative, negative_pooled) if cfg else ()))
        # one row per image and branch, in the order of the hidden states: [negative..., positive...]
        time_ids = time_ids.to(device).repeat(batch, 1)
        if cfg:
            time_ids = torch.cat([negative_time_ids.to(device).repeat(batch, 1), time_ids])
            positive, pooled = torch.cat([negative, positive]), torch.cat([negative_pooled, pooled])
        added = {"text_embeds": pooled.to(device), "time_ids": time_ids}
        call = unet_call(unet, positive.to(device), begin.channels, added)
        return Job(
            latents=chain_dtype(begin.latents),
            predict=guided(call, guidance_scale if cfg else None, guidance_rescale),
            finish=lambda z, output_type: self.decode_xl(host, z, output_type),
            start=begin.start,
            known=begin.known,
            extra={
                "condition": key,
                "guidance": guidance_settings(cfg, guidance_scale, guidance_rescale=guidance_rescale),
            },
        )

    @staticmethod
    def decode_xl(host: Any, latents: torch.Tensor, output_type: str) -> Any:
        """The host's decoding (SDXL pipelines do it inline in ``__call__``, so these few lines follow it): the VAE
        in float32 if it is float16 with ``force_upcast``, un-normalised latents, watermark, image processor."""
        if output_type == "latent":
            return latents
        vae = host.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
        z = latents.to(vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            mean = torch.tensor(mean, device=z.device, dtype=z.dtype).view(shape)
            std = torch.tensor(std, device=z.device, dtype=z.dtype).view(shape)
            z = z * std / vae.config.scaling_factor + mean
        else:
            z = z / vae.config.scaling_factor
        image = vae.decode(z, return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        if getattr(host, "watermark", None) is not None:
            image = host.watermark.apply_watermark(image)
        return host.image_processor.postprocess(image, output_type=output_type)
