"""No host-device synchronisation per step, shown without a GPU: the sampling loops run on the ``meta`` device.

A meta tensor has a shape and a dtype but no data, so every operation that would read device memory on the host
(``.item()``, ``bool()``/``float()``/``int()`` of a tensor, ``.cpu()``, ``.tolist()``, ``.numpy()``, ``nonzero``,
indexing a Python sequence with a tensor) raises there, exactly where on CUDA it would block the host until the
device catches up. A loop that runs on meta therefore makes no such read. What this does not show: host-to-device
copies (a CPU ``generator`` makes diffusers' ``randn_tensor`` draw on the CPU and copy, as it does for every diffusers
scheduler) and kernels that synchronise inside (e.g. ``torch.linalg.eigh``'s error check, used by ``full``).

The drop-in's first step finds its index from the timestep (one read per loop, as diffusers' own schedulers do),
unless the pipeline set ``set_begin_index``; the loops here set it, so every step is checked.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_CONFIGS
from diffusers import DDPMScheduler
from tiny_pipelines import tiny_ddpm_pipeline, tiny_stable_diffusion_pipeline, tiny_unet2d

from mmgibbs import MMGibbsScheduler, MomentMatchingGibbsPipeline

META = torch.device("meta")


@pytest.mark.parametrize("family", ["vp", "ve", "edm", "flow"])
@pytest.mark.parametrize("covariance", ["none", "isotropic"])
def test_drop_in_steps_read_nothing_from_the_device(family: str, covariance: str) -> None:
    """diffusers' loop (scale_model_input, model, step) over every step, all tensors on meta."""
    scheduler = MMGibbsScheduler.from_config(FAMILY_CONFIGS[family], covariance=covariance, gibbs_sweeps=2)
    scheduler.set_timesteps(4, device=META)
    scheduler.set_begin_index(0)
    unet = tiny_unet2d().eval().to(META)
    sample = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)).to(META) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(sample, t), t).sample
            sample = scheduler.step(out, t, sample, generator=torch.Generator().manual_seed(1)).prev_sample
    assert sample.device == META and sample.shape == (2, 1, 8, 8)


def test_diffusers_ddpm_step_reads_the_timestep_on_the_host() -> None:
    """The reference the drop-in is compared with in ``examples/benchmark.py --section speed``: DDPMScheduler's step
    looks its timestep up with ``nonzero`` (a read of device memory at every step); this test documents it."""
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(4, device=META)
    sample = torch.zeros(2, 1, 8, 8, device=META)
    with pytest.raises((NotImplementedError, RuntimeError)):
        scheduler.step(sample, scheduler.timesteps[0], sample)


@pytest.mark.parametrize(
    ("covariance", "jacobian", "product_batch"),
    [
        ("none", "auto", 1),
        ("isotropic", "auto", 1),
        ("diagonal", "reverse", 1),
        ("diagonal", "reverse", 2),
        ("diagonal", "forward", 2),
        ("diagonal", "finite_difference", 1),
        ("projection", "reverse", 1),
        ("full", "reverse", 4),
    ],
)
def test_the_gibbs_pipeline_reads_nothing_from_the_device(covariance: str, jacobian: str, product_batch: int) -> None:
    """MomentMatchingGibbsPipeline's whole loop (frame change, Jacobian products, draw, transition) on meta."""
    pipe = MomentMatchingGibbsPipeline.from_pipe(tiny_ddpm_pipeline()).to(META)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        batch_size=2,
        num_inference_steps=3,
        gibbs_sweeps=2,
        covariance=covariance,
        num_probes=2,
        jacobian=jacobian,
        product_batch=product_batch,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    assert out.images.device == META and out.images.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("covariance", ["isotropic", "diagonal"])
def test_stable_diffusion_with_guidance_reads_nothing_from_the_device(covariance: str) -> None:
    """Prompt encoding, both guidance branches in one call, and the Jacobian products through them, on meta."""
    pipe = MomentMatchingGibbsPipeline.from_pipe(tiny_stable_diffusion_pipeline(), jacobian="reverse").to(META)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        ["a red cat", "a blue dog"],
        guidance_scale=5.0,
        num_inference_steps=2,
        gibbs_sweeps=2,
        covariance=covariance,
        num_probes=2,
        product_batch=2,
        output_type="latent",
    )
    assert out.images.device == META and out.images.shape == (2, 4, 8, 8)
