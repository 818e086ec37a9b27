"""PixArt-alpha / PixArt-sigma (Chen et al. 2023, 2024): ``PixArtTransformer2DModel``, a latent DiT with T5 text
cross-attention, in ``PixArtAlphaPipeline`` and ``PixArtSigmaPipeline``.

* Conditioning: the host's ``encode_prompt`` (T5) returns prompt embeddings, their attention mask and the negative
  pair; the transformer sees ``encoder_hidden_states`` and ``encoder_attention_mask``, and ``added_cond_kwargs``
  (resolution and aspect ratio, computed as PixArt-alpha's host does for its 1024 px models, ``sample_size`` 128;
  ``None`` otherwise).
* Guidance: [negative, positive] in one batched call, F = F_u + g (F_c - F_u) for g > 1.
* Learned sigma: ``out_channels = 2 * in_channels``; the chain uses the first C channels (epsilon). The learned
  variance is not used: the moment-matched covariance replaces it.
* Size: ``use_resolution_binning`` (the host's default) maps ``height``/``width`` to the closest trained aspect-ratio
  bin (the host's tables, chosen by ``sample_size``) and resizes the decoded images back, with the host's image
  processor; models of other sample sizes need ``use_resolution_binning=False``, as in the host.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN

from .base import Family, Job, check_latents, condition_key, guidance_settings, guided, learned_sigma_call, work_dtype

#: the hosts' aspect-ratio bins by the transformer's ``sample_size``
ASPECT_RATIO_BINS: dict[str, dict[int, dict[str, list[float]]]] = {
    "PixArtAlphaPipeline": {128: ASPECT_RATIO_1024_BIN, 64: ASPECT_RATIO_512_BIN, 32: ASPECT_RATIO_256_BIN},
    "PixArtSigmaPipeline": {
        256: ASPECT_RATIO_2048_BIN,
        128: ASPECT_RATIO_1024_BIN,
        64: ASPECT_RATIO_512_BIN,
        32: ASPECT_RATIO_256_BIN,
    },
}


class PixArt(Family):
    name = "PixArt-alpha/sigma (PixArtTransformer2DModel, T5)"
    hosts = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    model = "transformer"
    model_classes = ("PixArtTransformer2DModel",)
    embeddings: ClassVar[dict[str, tuple[int, str, str]]] = dict.fromkeys(
        ("prompt_embeds", "negative_prompt_embeds"), (3, "transformer", "caption_channels")
    )
    conditioning = (
        "prompt",
        "negative_prompt",
        "prompt_embeds",
        "prompt_attention_mask",
        "negative_prompt_embeds",
        "negative_prompt_attention_mask",
    )

    def prepare(
        self,
        scheduler: Any,
        *,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int | None = None,
        generator: Any = None,
        latents: torch.Tensor | None = None,
        clean_caption: bool | None = None,
        use_resolution_binning: bool | None = None,
        max_sequence_length: int | None = None,
        device: torch.device | None = None,
    ) -> Job:
        """The chain for these prompts, with PixArt's call arguments and the host's defaults (``guidance_scale``
        4.5, ``negative_prompt`` "", ``use_resolution_binning``, ``clean_caption``, ``max_sequence_length``).
        Embeddings passed instead of prompts need their attention masks, as in the host; ``negative_prompt_embeds``
        replace the default negative prompt."""
        host, model = self.host, self.host.transformer
        config = model.config
        height = height or config.sample_size * host.vae_scale_factor
        width = width or config.sample_size * host.vae_scale_factor
        size = (height, width)
        if self.default("use_resolution_binning", use_resolution_binning):
            bins = ASPECT_RATIO_BINS[type(host).__name__].get(config.sample_size)
            if bins is None:
                raise ValueError(
                    f"`use_resolution_binning` needs a transformer with sample_size in "
                    f"{sorted(ASPECT_RATIO_BINS[type(host).__name__])}; this one has {config.sample_size}: pass "
                    "use_resolution_binning=False."
                )
            height, width = host.image_processor.classify_height_width_bin(height, width, ratios=bins)
        else:
            size = None
        if negative_prompt_embeds is None:  # the host's default "", unless negative embeddings replace it
            negative_prompt = self.default("negative_prompt", negative_prompt)
        host.check_inputs(
            prompt,
            height,
            width,
            negative_prompt,
            1,  # callback_steps: the host checks it; callbacks here are `callback_on_step_end`
            prompt_embeds,
            negative_prompt_embeds,
            prompt_attention_mask,
            negative_prompt_attention_mask,
        )
        guidance_scale = self.default("guidance_scale", guidance_scale)
        cfg = guidance_scale > 1
        embeds, mask, negative_embeds, negative_mask = host.encode_prompt(
            prompt,
            cfg,
            negative_prompt=negative_prompt,
            num_images_per_prompt=self.default("num_images_per_prompt", num_images_per_prompt),
            device=device,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            prompt_attention_mask=prompt_attention_mask,
            negative_prompt_attention_mask=negative_prompt_attention_mask,
            clean_caption=self.default("clean_caption", clean_caption),
            max_sequence_length=self.default("max_sequence_length", max_sequence_length),
        )
        batch = len(embeds)
        check_latents(latents, batch, config.in_channels, height, width, host.vae_scale_factor)
        start = host.prepare_latents(
            batch, config.in_channels, height, width, embeds.dtype, device, generator, latents
        )
        key = condition_key(embeds, mask, *((negative_embeds, negative_mask) if cfg else ()))
        if cfg:
            embeds, mask = torch.cat([negative_embeds, embeds]), torch.cat([negative_mask, mask])
        added: dict[str, torch.Tensor | None] = {"resolution": None, "aspect_ratio": None}
        if type(host).__name__ == "PixArtAlphaPipeline" and config.sample_size == 128:  # as PixArt-alpha's host
            rows = len(embeds)
            added = {
                "resolution": torch.tensor([height, width], dtype=embeds.dtype, device=device).repeat(rows, 1),
                "aspect_ratio": torch.tensor([height / width], dtype=embeds.dtype, device=device).repeat(rows, 1),
            }
        call = learned_sigma_call(
            model, encoder_hidden_states=embeds, encoder_attention_mask=mask, added_cond_kwargs=added
        )
        return Job(
            latents=start.to(work_dtype(model.dtype)),
            predict=guided(call, guidance_scale if cfg else None),
            finish=lambda z, output_type: self.decode(z, output_type, size),
            extra={"condition": key, "guidance": guidance_settings(cfg, guidance_scale)},
        )

    def decode(self, latents: torch.Tensor, output_type: str, size: tuple[int, int] | None) -> Any:
        """The host's decoding: VAE, the resize back from the resolution bin (``size``: the asked height and width),
        the host's image processor."""
        if output_type == "latent":
            return latents
        host, vae = self.host, self.host.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        if size is not None:
            image = host.image_processor.resize_and_crop_tensor(image, size[1], size[0])
        return host.image_processor.postprocess(image, output_type=output_type)
