"""Tiny, random-weight, fully offline SDXL pipelines and 9-channel inpainting UNets (SD and SDXL).

Built locally from small configs like :mod:`tiny_pipelines` (whose tokenizer, VAE and seeding it reuses):

* :func:`tiny_sdxl_pipeline`: two CLIP text encoders (the second a ``CLIPTextModelWithProjection`` whose pooled
  projection feeds the UNet's ``text_time`` embedding), 4 x 8 x 8 latents, VAE factor 2, so 16 x 16 images;
  Euler with SDXL's scheduler settings; no watermarker (the invisible-watermark package is not needed).
  ``in_channels=9`` gives it an inpainting UNet, as ``stable-diffusion-xl-1.0-inpainting-0.1`` has.
* :func:`tiny_sd_inpaint_pipeline`: SD 1.x's with the 9-channel UNet of ``tiny_unet2d_condition(in_channels=9)``,
  as ``stable-diffusion-inpainting`` has.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    EulerDiscreteScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tiny_pipelines import (
    TEXT_HIDDEN_SIZE,
    TINY_SD_LATENT_SIZE,
    _seeded,
    tiny_autoencoder_kl,
    tiny_clip_text_model,
    tiny_clip_tokenizer,
    tiny_sd_components,
    tiny_unet2d_condition,
)

__all__ = [
    "SDXL_SCHEDULER_CONFIG",
    "TIME_EMBED_DIM",
    "tiny_sd_inpaint_pipeline",
    "tiny_sdxl_components",
    "tiny_sdxl_pipeline",
    "tiny_sdxl_unet",
    "tiny_stand_in_unet",
]

#: SDXL base 1.0's ``scheduler_config.json`` (Euler, scaled-linear betas)
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "use_karras_sigmas": False,
}
#: width of each of the six micro-conditioning ids (original size, crop, target size) in the UNet
TIME_EMBED_DIM = 8


def tiny_sdxl_unet(seed: int = 0, in_channels: int = 4) -> UNet2DConditionModel:
    """A tiny SDXL ``UNet2DConditionModel``: cross-attention on both encoders' hidden states (32 + 32), the
    ``text_time`` added embedding of the pooled projection (32) and six size ids (6 x 8)."""
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=TINY_SD_LATENT_SIZE,
            in_channels=in_channels,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            cross_attention_dim=2 * TEXT_HIDDEN_SIZE,
            attention_head_dim=2,
            norm_num_groups=8,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_HIDDEN_SIZE,
        )
    return unet.eval()


def tiny_sdxl_components(seed: int = 0, in_channels: int = 4) -> dict[str, Any]:
    """All keyword arguments for ``StableDiffusionXLPipeline(**components)``, built locally and seeded."""
    tokenizer = tiny_clip_tokenizer()
    ids = {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}
    return {
        "vae": tiny_autoencoder_kl(seed=seed + 2),
        "text_encoder": tiny_clip_text_model(vocab_size=len(tokenizer), seed=seed + 1, **ids),
        "text_encoder_2": tiny_clip_text_model(len(tokenizer), seed + 3, **ids, projection=True),
        "tokenizer": tokenizer,
        "tokenizer_2": tiny_clip_tokenizer(),
        "unet": tiny_sdxl_unet(seed=seed, in_channels=in_channels),
        "scheduler": EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
        "image_encoder": None,
        "feature_extractor": None,
        "add_watermarker": False,
    }


def tiny_sdxl_pipeline(seed: int = 0, in_channels: int = 4) -> StableDiffusionXLPipeline:
    """A tiny ``StableDiffusionXLPipeline`` (16 x 16 images), progress bar off; ``in_channels=9`` gives it an
    inpainting UNet (for ``StableDiffusionXLInpaintPipeline(**pipe.components)``)."""
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed, in_channels))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd_inpaint_pipeline(seed: int = 0) -> StableDiffusionInpaintPipeline:
    """A tiny ``StableDiffusionInpaintPipeline`` with a 9-channel UNet (16 x 16 images), progress bar off."""
    components = {**tiny_sd_components(seed), "unet": tiny_unet2d_condition(seed, in_channels=9)}
    pipe = StableDiffusionInpaintPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_stand_in_unet(sdxl: bool = False, seed: int = 0) -> UNet2DConditionModel:
    """The cheapest ``UNet2DConditionModel`` with SD's (or, ``sdxl=True``, SDXL's) conditioning interface: one
    convolutional level, no attention, ~10x faster than :func:`tiny_pipelines.tiny_unet2d_condition`. For tests
    that replace its output by a forward hook (the exact-Gaussian tests), where only the interface matters."""
    extra: dict[str, Any] = {}
    if sdxl:
        extra = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": TIME_EMBED_DIM,
            "projection_class_embeddings_input_dim": 6 * TIME_EMBED_DIM + TEXT_HIDDEN_SIZE,
        }
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=TINY_SD_LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D",),
            up_block_types=("UpBlock2D",),
            mid_block_type=None,
            block_out_channels=(8,),
            layers_per_block=1,
            cross_attention_dim=(2 if sdxl else 1) * TEXT_HIDDEN_SIZE,
            norm_num_groups=4,
            **extra,
        )
    return unet.eval()
