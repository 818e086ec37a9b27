"""Tiny, random-weight, fully offline diffusers pipelines for fast scheduler tests.

Everything here is built locally from small configs (no Hub access, no downloads). Weights are
seeded, so two builds with the same ``seed`` are bitwise identical, and the global torch RNG is
left untouched (models are created inside :func:`torch.random.fork_rng`).

Sizes:

* :func:`tiny_unet2d` / :func:`tiny_ddpm_pipeline`: ``channels`` x 8 x 8 pixel-space images.
* :func:`tiny_stable_diffusion_pipeline`: 4 x 8 x 8 latents, VAE downsampling factor 2, so images are
  16 x 16 pixels (the default ``height``/``width`` of the pipeline; both must be multiples of 8).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from mmgibbs import MomentMatchingGibbsPipeline

__all__ = [
    "SD_SCHEDULER_CONFIG",
    "TINY_SD_IMAGE_SIZE",
    "TINY_SD_LATENT_SIZE",
    "TINY_VOCAB_WORDS",
    "count_calls",
    "generator",
    "gibbs",
    "tiny_autoencoder_kl",
    "tiny_clip_text_model",
    "tiny_clip_tokenizer",
    "tiny_ddpm_pipeline",
    "tiny_sd_components",
    "tiny_stable_diffusion_pipeline",
    "tiny_unet2d",
    "tiny_unet2d_condition",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
EOW = "</w>"

#: Words the tiny tokenizer knows as whole tokens; anything else falls back to single characters.
TINY_VOCAB_WORDS: tuple[str, ...] = ("a", "red", "blue", "cat", "dog", "photo", "of", "the", "on", "grass")

#: Typical Stable Diffusion v1 scheduler settings (as in ``scheduler_config.json`` of SD 1.x).
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}

TINY_SD_LATENT_SIZE = 8
#: Pixel size of tiny SD images: latent size times the VAE factor ``2 ** (len(block_out_channels) - 1)``.
TINY_SD_IMAGE_SIZE = 16
TEXT_HIDDEN_SIZE = 32
TOKENIZER_MAX_LENGTH = 16


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG for the block without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_unet2d(sample_size: int = 8, channels: int = 1, attention: bool = True, seed: int = 0) -> UNet2DModel:
    """A tiny unconditional ``UNet2DModel`` (channels 8/16, one downsample) in eval mode.

    With ``attention=True`` the second level uses ``AttnDownBlock2D``/``AttnUpBlock2D`` and the mid block
    has attention; with ``attention=False`` the network is purely convolutional.
    """
    if attention:
        down, up = ("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D")
    else:
        down, up = ("DownBlock2D", "DownBlock2D"), ("UpBlock2D", "UpBlock2D")
    with _seeded(seed):
        unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=channels,
            out_channels=channels,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            attention_head_dim=8,
            add_attention=attention,
        )
    return unet.eval()


def tiny_ddpm_pipeline(seed: int = 0) -> DDPMPipeline:
    """A ``DDPMPipeline`` with :func:`tiny_unet2d` (1 x 8 x 8 images) and a default ``DDPMScheduler()``."""
    pipe = DDPMPipeline(unet=tiny_unet2d(seed=seed), scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_vocab_and_merges(words: tuple[str, ...] = TINY_VOCAB_WORDS) -> tuple[dict[str, int], list[str]]:
    """Build a consistent CLIP BPE vocab/merges pair: every merge result is itself a vocab entry.

    Each word is merged left to right (``r e`` -> ``re``, ``re d</w>`` -> ``red</w>``), so known words become
    one token; all lowercase letters (with and without ``</w>``) are present as fallbacks.
    """
    tokens: list[str] = [BOS_TOKEN, EOS_TOKEN]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens += letters + [ch + EOW for ch in letters]
    merges: list[str] = []
    for word in words:
        pieces = [*word[:-1], word[-1] + EOW]
        current = pieces[0]
        for piece in pieces[1:]:
            rule = f"{current} {piece}"
            current += piece
            if rule not in merges:
                merges.append(rule)
            if current not in tokens:
                tokens.append(current)
    return {tok: i for i, tok in enumerate(tokens)}, merges


def tiny_clip_tokenizer(model_max_length: int = TOKENIZER_MAX_LENGTH) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` loaded from a hand-made ``vocab.json``/``merges.txt`` in a temporary directory.

    Loading through ``from_pretrained(<dir>)`` works with both transformers 4.x (slow, file-based
    tokenizer) and 5.x (``tokenizers``-backed ``CLIPTokenizer`` that takes vocab/merges objects).
    The pad token is the end-of-text token, as in Stable Diffusion v1.
    """
    vocab, merges = _tiny_vocab_and_merges()
    with tempfile.TemporaryDirectory(prefix="tiny_clip_tok_") as tmp:
        path = Path(tmp)
        (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(
            tmp,
            model_max_length=model_max_length,
            bos_token=BOS_TOKEN,
            eos_token=EOS_TOKEN,
            unk_token=EOS_TOKEN,
            pad_token=EOS_TOKEN,
        )
    return tokenizer


def tiny_clip_text_model(
    vocab_size: int, seed: int = 0, eos_token_id: int = 1, bos_token_id: int = 0, projection: bool = False
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A 2-layer, 2-head, 32-wide ``CLIPTextModel`` in eval mode; ``projection=True``: the same as a
    ``CLIPTextModelWithProjection`` (projection 32), SDXL's second encoder and SD3's CLIP encoders."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        projection_dim=TEXT_HIDDEN_SIZE,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    with _seeded(seed):
        model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    return model.eval()


def tiny_unet2d_condition(seed: int = 0, in_channels: int = 4) -> UNet2DConditionModel:
    """A tiny text-conditioned ``UNet2DConditionModel`` on 4 x 8 x 8 latents (cross-attention dim 32);
    ``in_channels=9``: an inpainting UNet (latents, mask, masked-image latents), as ``stable-diffusion-inpainting``
    has."""
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=TINY_SD_LATENT_SIZE,
            in_channels=in_channels,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            cross_attention_dim=TEXT_HIDDEN_SIZE,
            attention_head_dim=2,
            norm_num_groups=8,
        )
    return unet.eval()


def tiny_autoencoder_kl(seed: int = 0, **config: Any) -> AutoencoderKL:
    """A tiny ``AutoencoderKL`` (channels 8/16, 4 latent channels) with downsampling factor 2; ``config``: further
    ``AutoencoderKL`` arguments (e.g. SD3/Flux's scaling and shift factors)."""
    with _seeded(seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=TINY_SD_IMAGE_SIZE,
            **config,
        )
    return vae.eval()


def tiny_sd_components(seed: int = 0) -> dict[str, Any]:
    """All keyword arguments for ``StableDiffusionPipeline(**components)``, built locally and seeded.

    Each model gets its own derived seed so that they are not identical copies of one RNG stream.
    """
    tokenizer = tiny_clip_tokenizer()
    text_encoder = tiny_clip_text_model(
        vocab_size=len(tokenizer),
        seed=seed + 1,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return {
        "vae": tiny_autoencoder_kl(seed=seed + 2),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": tiny_unet2d_condition(seed=seed),
        "scheduler": DDIMScheduler(**SD_SCHEDULER_CONFIG),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def tiny_stable_diffusion_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A tiny ``StableDiffusionPipeline`` (16 x 16 images, DDIM with SD v1 settings), progress bar off."""
    pipe = StableDiffusionPipeline(**tiny_sd_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def count_calls(module: torch.nn.Module) -> Iterator[list[int]]:
    """Record every forward call of ``module`` while the block runs, as it begins (a call that fails inside the
    model counts: "no model call before the error" means none began).

    Yields a list that receives one entry per call: the batch size of the first tensor input
    (positional or keyword), or ``-1`` if there was none. ``len(calls)`` is the number of calls; with
    classifier-free guidance a Stable Diffusion UNet is called once per step on a doubled batch.
    """
    calls: list[int] = []

    def hook(_mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        calls.append(int(first.shape[0]) if first is not None and first.ndim > 0 else -1)

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def gibbs(host: Any, **settings: Any) -> MomentMatchingGibbsPipeline:
    """``MomentMatchingGibbsPipeline.from_pipe(host, jacobian="reverse", **settings)``, progress bar off."""
    pipe = MomentMatchingGibbsPipeline.from_pipe(host, jacobian="reverse", **settings)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generator(seed: int | list[int] = 0) -> torch.Generator | list[torch.Generator]:
    """A CPU generator seeded with ``seed``; a list of seeds gives one generator each (one per image)."""
    if isinstance(seed, list):
        return [torch.Generator().manual_seed(s) for s in seed]
    return torch.Generator().manual_seed(seed)
