"""Bad inputs (issue 10, item 3): each gets a clear error naming the argument, where it was passed.

Every test here failed on the code before its fix: the input either passed silently (a broadcast sample, an
ignored generator) or failed deep inside torch or diffusers with a message that names no argument.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from tiny_pipelines import tiny_unet2d

from mmgibbs import MMGibbsScheduler


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ MMGibbsScheduler.step
def _stepped(model_output, sample, scheduler: MMGibbsScheduler | None = None, **kwargs) -> torch.Tensor:
    scheduler = scheduler or MMGibbsScheduler()
    scheduler.set_timesteps(3)
    return scheduler.step(model_output, scheduler.timesteps[0], sample, **kwargs).prev_sample


@pytest.mark.parametrize(
    "shape",
    [(2, 1, 8, 8), (1, 3, 8, 8), (3, 8, 8), (), (2, 3, 4, 4), (3, 3, 8, 8), (2, 6, 8, 8)],
    ids=["channels-1", "batch-1", "3-d", "scalar", "spatial", "batch-3", "2C-without-learned-variance"],
)
def test_step_refuses_a_model_output_of_another_shape_than_the_sample(shape: tuple[int, ...]) -> None:
    """(2, 1, 8, 8), (1, 3, 8, 8), (3, 8, 8) and 0-d outputs broadcast against a (2, 3, 8, 8) sample silently; the
    others failed inside torch ("The size of tensor a (3) must match ..."). A 2C-channel output of a config without
    a learned variance names the setting that would accept it."""
    sample = torch.randn(2, 3, 8, 8, generator=_generator())
    match = r"`model_output` has shape .* but `sample` has shape \(2, 3, 8, 8\)"
    if shape == (2, 6, 8, 8):
        match = r"`model_output` has 6 channels for a 3-channel `sample`.*variance_type"
    with pytest.raises(ValueError, match=match):
        _stepped(torch.zeros(shape), sample)


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_step_takes_the_prediction_channels_of_a_learned_variance_output(variance_type: str) -> None:
    """A learned-variance UNet returns [F, v] (2C channels) for a C-channel sample; with the source config's
    ``variance_type`` learned the step uses F, as DDPMScheduler splits it; the learned v is replaced by the
    moment-matched covariance. It used to fail inside torch."""
    config = DDPMScheduler(variance_type=variance_type).config
    sample = torch.randn(2, 3, 8, 8, generator=_generator())
    prediction = 0.1 * torch.randn(2, 3, 8, 8, generator=_generator(1))
    output = torch.cat([prediction, torch.full_like(prediction, 123.0)], dim=1)
    got = _stepped(output, sample, MMGibbsScheduler.from_config(config), generator=_generator(2))
    expected = _stepped(prediction, sample, MMGibbsScheduler.from_config(config), generator=_generator(2))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"`model_output` has shape \(2, 9, 8, 8\)"):
        _stepped(torch.zeros(2, 9, 8, 8), sample, MMGibbsScheduler.from_config(config))


def test_ddpm_pipeline_drop_in_with_a_learned_variance_unet() -> None:
    """DDPMPipeline over a 2C-output UNet and its learned_range config: the step used to broadcast the C-channel
    sample to 2C channels, and the next UNet call failed on its input channels."""
    unet = tiny_unet2d(channels=1, attention=False)
    wide = type(unet).from_config({**unet.config, "out_channels": 2}).eval()
    pipe = DDPMPipeline(unet=wide, scheduler=DDPMScheduler(variance_type="learned_range"))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = MMGibbsScheduler.from_config(pipe.scheduler.config)
    images = pipe(batch_size=2, num_inference_steps=3, generator=_generator(), output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


@pytest.mark.parametrize(
    ("model_output", "sample", "match"),
    [
        (np.zeros((2, 3, 8, 8)), torch.zeros(2, 3, 8, 8), r"`model_output` must be a torch.Tensor; got ndarray"),
        (None, torch.zeros(2, 3, 8, 8), r"`model_output` must be a torch.Tensor; got NoneType"),
        (torch.zeros(2, 3, 8, 8), np.zeros((2, 3, 8, 8)), r"`sample` must be a torch.Tensor; got ndarray"),
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), r"`sample` must be a floating-point tensor"),
    ],
    ids=["numpy-output", "none-output", "numpy-sample", "integer-sample"],
)
def test_step_refuses_inputs_that_are_not_float_tensors(model_output, sample, match: str) -> None:
    """numpy arrays and None failed with AttributeError ("'numpy.ndarray' object has no attribute 'to'"), an integer
    sample came back rounded to integers. DDPMScheduler does not take numpy arrays either."""
    with pytest.raises(TypeError, match=match):
        _stepped(model_output, sample)


@pytest.mark.parametrize(
    ("generator", "match"),
    [
        (0, r"`generator` must be a torch.Generator or a list of them .*; got int"),
        (np.random.default_rng(0), r"`generator` must be a torch.Generator or a list of them .*; got Generator"),
        ("seed", r"`generator` must be a torch.Generator or a list of them .*; got str"),
        ([torch.Generator(), 0], r"`generator\[1\]` must be a torch.Generator; got int"),
        ([torch.Generator()], r"1 generators in `generator` for a batch of 2"),
        ([torch.Generator()] * 3, r"3 generators in `generator` for a batch of 2"),
    ],
    ids=["int", "numpy-rng", "str", "list-with-int", "list-too-short", "list-too-long"],
)
def test_step_refuses_generators_that_are_not_one_per_sample(generator, match: str) -> None:
    """Non-generators failed inside diffusers' randn_tensor ("'int' object has no attribute 'device'"); a list of
    one generator drew every sample from it and a list longer than the batch ignored the rest, both silently."""
    sample = torch.zeros(2, 3, 8, 8)
    with pytest.raises((TypeError, ValueError), match=match):
        _stepped(torch.zeros_like(sample), sample, generator=generator)


@pytest.mark.parametrize("timestep", [None, "500", object()], ids=["none", "str", "object"])
def test_step_refuses_a_timestep_that_is_not_a_number(timestep) -> None:
    scheduler = MMGibbsScheduler()
    scheduler.set_timesteps(3)
    x = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="`timestep` must be a number or a tensor"):
        scheduler.step(x, timestep, x)
