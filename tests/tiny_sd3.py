"""Tiny, random-weight, fully offline Stable Diffusion 3 pipelines (and the T5/VAE pieces Flux shares).

Everything is built locally from small configs, seeded, without touching the global RNG (as
``tiny_pipelines`` does). The T5 tokenizer is transformers' tokenizers-backed ``T5Tokenizer`` built from a
hand-made Unigram vocabulary (no sentencepiece model, no download).

Sizes: 16 x 16 images, VAE factor 2, 4 x 8 x 8 latents, transformer patch 2 (16 image tokens); the joint text
sequence is 16 CLIP tokens + ``max_sequence_length`` T5 tokens (zeros without ``text_encoder_3``), width 64.
"""

from __future__ import annotations

from typing import Any

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from tiny_pipelines import (
    TEXT_HIDDEN_SIZE,
    TINY_VOCAB_WORDS,
    _seeded,
    tiny_autoencoder_kl,
    tiny_clip_text_model,
    tiny_clip_tokenizer,
)
from transformers import T5Config, T5EncoderModel, T5Tokenizer

__all__ = [
    "SD3_SCHEDULER_CONFIG",
    "TINY_SD3_IMAGE_SIZE",
    "tiny_flow_vae",
    "tiny_sd3_components",
    "tiny_sd3_pipeline",
    "tiny_t5_encoder",
    "tiny_t5_tokenizer",
]

#: SD3-medium's scheduler: FlowMatchEuler with a static shift of 3
SD3_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}
TINY_SD3_IMAGE_SIZE = 16
CLIP_WIDTH = TEXT_HIDDEN_SIZE  # the width of tiny_clip_text_model
JOINT_WIDTH = 2 * CLIP_WIDTH  # the two CLIP widths side by side = the T5 width: no padding, no cropping


def tiny_t5_tokenizer(model_max_length: int = 512) -> T5Tokenizer:
    """A T5 tokenizer over a hand-made Unigram vocabulary: <pad>=0, </s>=1, <unk>=2, the metaspace, the words of
    ``TINY_VOCAB_WORDS`` as whole tokens and single letters as fallbacks; no sentinel tokens."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + word, -1.0) for word in TINY_VOCAB_WORDS]
    vocab += [(chr(c), -5.0) for c in range(ord("a"), ord("z") + 1)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def tiny_t5_encoder(vocab_size: int, d_model: int, seed: int = 0) -> T5EncoderModel:
    """A 1-layer, 4-head ``T5EncoderModel`` of width ``d_model`` in eval mode."""
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with _seeded(seed):
        model = T5EncoderModel(config)
    return model.eval()


def tiny_flow_vae(seed: int = 0) -> AutoencoderKL:
    """The tiny ``AutoencoderKL`` of ``tiny_pipelines`` (factor 2, 4 latent channels, 16 x 16 images) with
    SD3/Flux-style scaling and shift factors and no quant convolutions."""
    return tiny_autoencoder_kl(
        seed, scaling_factor=1.5035, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False
    )


def tiny_sd3_transformer(seed: int = 0) -> SD3Transformer2DModel:
    """A 1-block ``SD3Transformer2DModel`` on 4 x 8 x 8 latents (patch 2), joint width 64, pooled width 64."""
    with _seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=TINY_SD3_IMAGE_SIZE // 2,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=JOINT_WIDTH,
            caption_projection_dim=32,
            pooled_projection_dim=2 * CLIP_WIDTH,
            pos_embed_max_size=16,
        )
    return transformer.eval()


def tiny_sd3_components(seed: int = 0, t5: bool = True) -> dict[str, Any]:
    """Keyword arguments of ``StableDiffusion3Pipeline``; ``t5=False`` leaves ``text_encoder_3`` (and its tokenizer)
    out, which the host replaces by zeros."""
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    tokenizer_3 = tiny_t5_tokenizer() if t5 else None
    return {
        "transformer": tiny_sd3_transformer(seed),
        "scheduler": FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
        "vae": tiny_flow_vae(seed + 1),
        "text_encoder": tiny_clip_text_model(len(tokenizer), seed + 2, projection=True),
        "tokenizer": tokenizer,
        "text_encoder_2": tiny_clip_text_model(len(tokenizer_2), seed + 3, projection=True),
        "tokenizer_2": tokenizer_2,
        "text_encoder_3": tiny_t5_encoder(len(tokenizer_3), JOINT_WIDTH, seed + 4) if t5 else None,
        "tokenizer_3": tokenizer_3,
    }


def tiny_sd3_pipeline(seed: int = 0, t5: bool = True) -> StableDiffusion3Pipeline:
    """A tiny ``StableDiffusion3Pipeline`` (16 x 16 images, FlowMatchEuler shift 3), progress bar off."""
    pipe = StableDiffusion3Pipeline(**tiny_sd3_components(seed, t5))
    pipe.set_progress_bar_config(disable=True)
    return pipe
