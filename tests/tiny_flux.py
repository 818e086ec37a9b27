"""Tiny, random-weight, fully offline Flux pipelines (built locally, seeded, global RNG untouched).

Sizes: 16 x 16 images (pass ``height=width=16``: FluxPipeline's default size is 128 x its VAE factor whatever the
model), VAE factor 2, 4 x 8 x 8 latents packed into 16 tokens of 16 channels; pooled CLIP width 32, T5 width 32.
The scheduler is FLUX.1-dev's: FlowMatchEuler with dynamic shifting between sequence lengths 256 and 4096.
"""

from __future__ import annotations

from typing import Any

from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tiny_pipelines import _seeded, tiny_clip_text_model, tiny_clip_tokenizer
from tiny_sd3 import tiny_flow_vae, tiny_t5_encoder, tiny_t5_tokenizer

__all__ = [
    "FLUX_DEV_SCHEDULER_CONFIG",
    "TINY_FLUX_IMAGE_SIZE",
    "tiny_flux_components",
    "tiny_flux_pipeline",
    "tiny_flux_transformer",
]

#: FLUX.1-dev's ``scheduler_config.json``
FLUX_DEV_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
TINY_FLUX_IMAGE_SIZE = 16
TEXT_WIDTH = 32


def tiny_flux_transformer(seed: int = 0, guidance_embeds: bool = True) -> FluxTransformer2DModel:
    """A 1 + 1 block ``FluxTransformer2DModel`` on 16-channel packed tokens; ``guidance_embeds=True`` is
    FLUX.1-dev's guidance-distilled input, False is schnell's."""
    with _seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TEXT_WIDTH,
            pooled_projection_dim=TEXT_WIDTH,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 4, 8),
        )
    return transformer.eval()


def tiny_flux_components(seed: int = 0, guidance_embeds: bool = True) -> dict[str, Any]:
    """Keyword arguments of ``FluxPipeline`` (CLIPTextModel for the pooled embedding, T5 for the sequence)."""
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    return {
        "transformer": tiny_flux_transformer(seed, guidance_embeds),
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG),
        "vae": tiny_flow_vae(seed + 1),
        "text_encoder": tiny_clip_text_model(
            len(tokenizer), seed + 2, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id
        ),
        "tokenizer": tokenizer,
        "text_encoder_2": tiny_t5_encoder(len(tokenizer_2), TEXT_WIDTH, seed + 3),
        "tokenizer_2": tokenizer_2,
    }


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """A tiny ``FluxPipeline`` (16 x 16 images, FLUX.1-dev's scheduler), progress bar off."""
    pipe = FluxPipeline(**tiny_flux_components(seed, guidance_embeds))
    pipe.set_progress_bar_config(disable=True)
    return pipe
