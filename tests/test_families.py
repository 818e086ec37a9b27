"""Model families through `MomentMatchingGibbsPipeline.from_pipe`: every covariance, with and without guidance."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from tiny_pipelines import count_calls, gibbs, tiny_ddpm_pipeline, tiny_stable_diffusion_pipeline

from mmgibbs import MMGibbsScheduler, MomentMatchingGibbsPipeline

JACOBIAN_FREE_AND_CHEAP = ["none", "isotropic", "diagonal", "projection"]


@pytest.fixture(scope="module")
def sd_pipe() -> MomentMatchingGibbsPipeline:
    pipe = gibbs(tiny_stable_diffusion_pipeline())
    return pipe


def test_from_pipe_shares_the_host_components_and_converts_the_scheduler() -> None:
    host = tiny_stable_diffusion_pipeline()
    pipe = MomentMatchingGibbsPipeline.from_pipe(host, covariance="diagonal", gibbs_sweeps=2)
    assert pipe.unet is host.unet and pipe.vae is host.vae and pipe.text_encoder is host.text_encoder
    assert isinstance(pipe.scheduler, MMGibbsScheduler) and pipe.scheduler.config.covariance == "diagonal"
    assert pipe.config.host_pipeline == "StableDiffusionPipeline"
    ddpm = tiny_ddpm_pipeline()
    assert MomentMatchingGibbsPipeline.from_pipe(ddpm).unet is ddpm.unet


@pytest.mark.parametrize("covariance", JACOBIAN_FREE_AND_CHEAP)
@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_stable_diffusion_every_covariance_with_and_without_guidance(sd_pipe, covariance, guidance_scale) -> None:
    with count_calls(sd_pipe.unet) as calls:
        out = sd_pipe(
            ["a red cat", "a blue dog"],
            covariance=covariance,
            guidance_scale=guidance_scale,
            num_inference_steps=2,
            gibbs_sweeps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )
    assert out.images.shape == (2, 16, 16, 3) and (out.images >= 0).all() and (out.images <= 1).all()
    batch = 4 if guidance_scale > 1 else 2  # both guidance branches in one call
    assert calls == [batch] * 4 and out.num_forward == 4
    assert out.num_backward == (4 if covariance in ("diagonal", "projection") else 0)


def test_unsupported_pipelines_and_arguments_get_clear_errors(sd_pipe) -> None:
    class MyPipeline(DDPMPipeline):
        pass

    with pytest.raises(ValueError, match=r"does not support the pipeline MyPipeline\. Supported: .*StableDiffusion"):
        MomentMatchingGibbsPipeline.from_pipe(MyPipeline(unet=tiny_ddpm_pipeline().unet, scheduler=DDPMScheduler()))
    with pytest.raises(ValueError, match="does not take `batch_size`"):
        sd_pipe("a cat", batch_size=2, num_inference_steps=1)
    with pytest.raises(ValueError, match="does not take `prompt`"):
        MomentMatchingGibbsPipeline.from_pipe(tiny_ddpm_pipeline())("a cat", num_inference_steps=1)
    with pytest.raises(ValueError, match="unknown arguments \\['covarience'\\]"):
        MomentMatchingGibbsPipeline.from_pipe(tiny_ddpm_pipeline(), covarience="diagonal")
    with pytest.raises(ValueError, match="must be a diffusers model"):
        MomentMatchingGibbsPipeline(unet=torch.nn.Linear(2, 2), scheduler=DDPMScheduler())


def test_from_pipe_names_the_host_scheduler_class_of_a_config_built_in_code() -> None:
    """A DDPMScheduler built in Python with SD's settings has no `_class_name` in its config, and that config fits
    several schedulers with different levels (from_config asks for `source_scheduler=`); from_pipe knows the class."""
    from diffusers import DDPMScheduler as Native
    from tiny_pipelines import SD_SCHEDULER_CONFIG

    host = tiny_stable_diffusion_pipeline()
    host.scheduler = Native.from_config(SD_SCHEDULER_CONFIG)
    assert "_class_name" not in host.scheduler.config
    pipe = MomentMatchingGibbsPipeline.from_pipe(host)
    assert pipe.scheduler.config.source_scheduler == "DDPMScheduler"
    assert MMGibbsScheduler.from_scheduler(host.scheduler, covariance="none").config.covariance == "none"
