"""Learned-variance denoisers (out_channels = 2 * in_channels, e.g. improved-DDPM checkpoints): the Gibbs chain
uses the first C channels (the epsilon / x0 / v prediction) and ignores the learned variance, whose job the
moment-matched covariance does."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from tiny_pipelines import count_calls, gibbs, tiny_unet2d


def _learned_variance_ddpm(channels: int) -> DDPMPipeline:
    unet = tiny_unet2d(channels=channels, attention=False)
    wide = type(unet).from_config({**unet.config, "out_channels": 2 * channels})
    wide.eval()
    pipe = DDPMPipeline(unet=wide, scheduler=DDPMScheduler(variance_type="learned_range"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("covariance", ["none", "diagonal"])
def test_unconditional_learned_variance_keeps_the_first_channels(channels: int, covariance: str) -> None:
    """With C = 1 the 2C-channel output used to broadcast into a 2-channel sample, with C = 3 it failed; now the
    sample keeps C channels and equals the chain of a model that returns only its first C output channels."""
    pipe = gibbs(_learned_variance_ddpm(channels))
    run = dict(batch_size=2, num_inference_steps=3, covariance=covariance, output_type="latent")
    with count_calls(pipe.unet) as calls:
        out = pipe(generator=torch.Generator().manual_seed(0), **run).images
    assert out.shape == (2, channels, 8, 8) and torch.isfinite(out).all() and calls == [2] * 3

    def first_half(_module, _args, output):
        return type(output)(sample=output.sample[:, :channels])

    handle = pipe.unet.register_forward_hook(first_half)
    try:
        truncated = pipe(generator=torch.Generator().manual_seed(0), **run).images
    finally:
        handle.remove()
    torch.testing.assert_close(out, truncated, rtol=0, atol=0)
