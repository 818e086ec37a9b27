"""Tiny, random-weight, offline PixArt pipelines.

* :func:`tiny_pixart_pipeline`: ``PixArtAlphaPipeline`` or ``PixArtSigmaPipeline`` with the T5 tokenizer and a
  1-layer T5 encoder (32 wide) of ``tiny_sd3`` (a hand-made Unigram vocabulary, no sentencepiece, no download), a
  1-layer ``PixArtTransformer2DModel`` (8 wide, learned sigma: 8 output channels) on 4 x 8 x 8 latents, the tiny VAE
  of ``tiny_pipelines`` (factor 2: 16 x 16 images) and PixArt's DPM-Solver settings. With ``binning=True``:
  ``sample_size`` 32 and a factor-8 VAE, the smallest model whose size has a resolution-bin table.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)
from tiny_pipelines import _seeded, tiny_autoencoder_kl
from tiny_sd3 import tiny_t5_encoder, tiny_t5_tokenizer

__all__ = ["PIXART_SCHEDULER_CONFIG", "T5_HIDDEN_SIZE", "tiny_pixart_pipeline"]

#: PixArt-alpha's scheduler_config.json (DPM-Solver++, linear betas, epsilon)
PIXART_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}
T5_HIDDEN_SIZE = 32


def tiny_pixart_transformer(seed: int = 0, sample_size: int = 8, heads: int = 2) -> PixArtTransformer2DModel:
    """A 1-layer PixArt transformer with ``heads`` heads of width 4 on 4-channel latents, learned sigma, T5 captions
    of width 32 (the size conditions of ``sample_size`` 128 need a width divisible by 3: ``heads=3``)."""
    with _seeded(seed):
        model = PixArtTransformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=4,
            in_channels=4,
            out_channels=8,
            num_layers=1,
            cross_attention_dim=4 * heads,
            caption_channels=T5_HIDDEN_SIZE,
            sample_size=sample_size,
            patch_size=2,
        )
    return model.eval()


def _factor8_vae(seed: int) -> AutoencoderKL:
    with _seeded(seed):
        vae = AutoencoderKL(
            block_out_channels=(4, 4, 4, 4),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=2,
        )
    return vae.eval()


def tiny_pixart_pipeline(
    seed: int = 0, sigma: bool = False, binning: bool = False
) -> PixArtAlphaPipeline | PixArtSigmaPipeline:
    """A tiny PixArt-alpha (or, ``sigma=True``, PixArt-sigma) pipeline, progress bar off (module docstring)."""
    tokenizer = tiny_t5_tokenizer()
    host = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = host(
        tokenizer=tokenizer,
        text_encoder=tiny_t5_encoder(len(tokenizer), T5_HIDDEN_SIZE, seed + 1),
        vae=_factor8_vae(seed + 2) if binning else tiny_autoencoder_kl(seed + 2),
        transformer=tiny_pixart_transformer(seed, sample_size=32 if binning else 8),
        scheduler=DPMSolverMultistepScheduler(**PIXART_SCHEDULER_CONFIG),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
