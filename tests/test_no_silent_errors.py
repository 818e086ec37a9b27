"""No silent wrong sample (issue 10): each defect found by trying bad or unusual inputs, with the failing input.

Each test here failed on the code before its fix (the kernel refactor's parent, 4266b64).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, EulerDiscreteScheduler, UNet2DModel
from tiny_pipelines import tiny_ddpm_pipeline, tiny_unet2d

from mmgibbs import MMGibbsScheduler, MomentMatchingGibbsPipeline, denoising_moments
from mmgibbs.families import model_predict

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "checkpoints" / "digits-ddpm"


class _NoGradUNet(UNet2DModel):
    """A UNet whose forward runs under ``torch.no_grad`` (as some wrappers do): reverse mode sees no graph."""

    def forward(self, *args, **kwargs):  # type: ignore[override]
        with torch.no_grad():
            return super().forward(*args, **kwargs)


def _pipeline(unet: UNet2DModel, **settings) -> MomentMatchingGibbsPipeline:
    pipe = MomentMatchingGibbsPipeline(unet=unet, scheduler=MMGibbsScheduler(**settings))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _moments(pipe: MomentMatchingGibbsPipeline, jacobian: str, t_index: int = 3):
    """The diagonal moments of the pipeline's UNet at one level, through the scheduler's frame change."""
    sched = pipe.scheduler
    sched.set_timesteps(10)

    y = sched.to_ve(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), t_index)
    denoiser = sched.denoiser(model_predict(pipe.unet))
    probes = torch.Generator().manual_seed(1)
    return denoising_moments(
        lambda v: denoiser(v, t_index), y, sched.ve_sigmas()[t_index], "diagonal", 4, probes, jacobian
    )


def test_a_network_that_cannot_be_differentiated_is_never_given_the_identity_jacobian() -> None:
    """Under no_grad, mu = (x_t - s eps(x_t)) / alpha still depends on y through x_t: reverse mode used to return
    J = I (Sigma = sigma^2 exactly). Now reverse mode refuses, and `auto` falls back to forward mode, which is
    right, saying why."""
    reference = _moments(_pipeline(tiny_unet2d()), "forward")
    no_grad = _NoGradUNet.from_config(tiny_unet2d().config)
    no_grad.load_state_dict(tiny_unet2d().state_dict())
    pipe = _pipeline(no_grad.eval())
    with pytest.raises(RuntimeError, match="reverse mode: the network output does not depend differentiably"):
        _moments(pipe, "reverse")
    with pytest.warns(UserWarning, match="uses forward Jacobian products because reverse: NotDifferentiableError"):
        fallback = _moments(pipe, "auto")
    torch.testing.assert_close(fallback.variance, reference.variance)
    assert not torch.allclose(fallback.variance, torch.full_like(fallback.variance, fallback.sigma[0] ** 2))
    # detached outputs carry no tangent either: auto ends at finite differences, which see the real network
    detached = _pipeline(tiny_unet2d())
    detached.unet.register_forward_hook(lambda _m, _a, out: type(out)(sample=out.sample.detach()))
    with pytest.warns(UserWarning, match="uses finite_difference Jacobian products because reverse: .* forward: "):
        by_differences = _moments(detached, "auto")
    torch.testing.assert_close(by_differences.variance, reference.variance, rtol=0.05, atol=1e-3)


def test_finite_differences_refuse_half_precision_networks() -> None:
    """(f(y + h v) - f(y)) / h of a bf16 network measured rounding, 12x too large; now a clear error."""
    pipe = _pipeline(tiny_unet2d().to(torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"finite differences: the network outputs torch.bfloat16"):
        _moments(pipe, "finite_difference")


def test_forward_mode_does_not_patch_torch_functions_process_wide() -> None:
    original = torch.nn.functional.group_norm
    seen = []
    pipe = _pipeline(tiny_unet2d())
    pipe.unet.register_forward_pre_hook(lambda *_: seen.append(torch.nn.functional.group_norm is original))
    _moments(pipe, "forward")
    assert seen and all(seen)


def test_isotropic_image_depends_only_on_its_own_generator() -> None:
    """With per-image generators, image i is the same whatever else is in the batch (it changed by up to 0.9)."""
    unet = tiny_unet2d()

    def run(seeds: list[int]) -> np.ndarray:
        pipe = _pipeline(unet)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(batch_size=len(seeds), num_inference_steps=4, generator=gens, output_type="np").images

    alone = run([7])
    with_others = run([3, 7, 11])
    np.testing.assert_allclose(with_others[1], alone[0], atol=1e-5)
    # the drop-in, in an unmodified DDPMPipeline
    ddpm = tiny_ddpm_pipeline()
    ddpm.scheduler = MMGibbsScheduler.from_config(ddpm.scheduler.config)
    one = ddpm(batch_size=1, num_inference_steps=4, generator=[torch.Generator().manual_seed(7)], output_type="np")
    three = ddpm(
        batch_size=3,
        num_inference_steps=4,
        generator=[torch.Generator().manual_seed(s) for s in (3, 7, 11)],
        output_type="np",
    )
    np.testing.assert_allclose(three.images[1], one.images[0], atol=1e-5)


def test_a_nan_stays_in_its_sample() -> None:
    pipe = _pipeline(tiny_unet2d(), covariance="isotropic")
    latents = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    latents[1, 0, 2, 2] = float("nan")
    out = pipe(batch_size=3, latents=latents, num_inference_steps=3, output_type="latent").images
    assert torch.isnan(out[1]).any() and torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("levels", [2, 3, 5])
def test_few_levels_stay_in_the_data_range(levels: int) -> None:
    """The shipped digits DDPM (data in [-1, 1]) under an Euler-type config (linspace spacing, no clipping) with
    <= 5 levels reached |x| = 99 / 74 / 7.8 at 2 / 3 / 5 levels (seed 2, batch 16): at sigma ~ 160 the isotropic
    variance was bounded by sigma^2 only. Now every per-dimension variance is bounded by the data variance (1 on
    [-1, 1]), so the draw stays within a few standard deviations of the mean-only chain, whose own excursion
    (|mu| ~ 10 at 2 levels) is the model's error at pure noise (``clip_sample=True`` bounds that too)."""
    ddpm = DDPMPipeline.from_pretrained(DIGITS)

    def run(**settings) -> torch.Tensor:
        scheduler = MMGibbsScheduler.from_config(EulerDiscreteScheduler().config, **settings)
        pipe = MomentMatchingGibbsPipeline(unet=ddpm.unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(2)
        return pipe(batch_size=16, num_inference_steps=levels, generator=generator, output_type="latent").images

    assert run().abs().max() < run(covariance="none").abs().max() + 4.0
