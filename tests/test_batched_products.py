"""Batched Jacobian products (``product_batch``): k products in one vectorised pass give what k single passes give.

The probes are the same draws from the same generator in the same order, so the batched estimates equal the
sequential ones up to float rounding (summation order, kernels), and the counters say what was computed: k products
are k backward passes / JVPs whether batched or not; ``num_product_passes`` counts the passes that made them.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DModel
from tiny_pipelines import tiny_stable_diffusion_pipeline, tiny_unet2d

from mmgibbs import GaussianMixtureDenoiser, MMGibbsScheduler, MomentMatchingGibbsPipeline, denoising_moments
from mmgibbs.families import model_predict
from mmgibbs.moments import NotDifferentiableError


def _unet_denoiser(unet: torch.nn.Module | None = None, t_index: int = 3):
    """The tiny UNet's VE-frame denoiser at one of 10 DDPM levels, a batch y there and its sigma."""
    sched = MMGibbsScheduler()
    sched.set_timesteps(10)
    denoiser = sched.denoiser(model_predict(unet if unet is not None else tiny_unet2d().eval()))
    sigma = sched.ve_sigmas()[t_index]
    y = sigma * torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return (lambda v: denoiser(v, t_index)), y, sigma


def _estimate(moments) -> torch.Tensor:
    return moments.variance if moments.variance is not None else moments.draw


@pytest.mark.parametrize("jacobian", ["reverse", "forward"])
@pytest.mark.parametrize(
    ("covariance", "num_probes", "product_batch", "passes"),
    [
        ("diagonal", 3, 2, 2),
        ("diagonal", 3, 3, 1),
        ("diagonal", 3, 8, 1),
        ("exact_diagonal", 1, 16, 4),
        ("full", 1, 64, 1),
    ],
)
def test_batched_products_equal_sequential_ones(jacobian, covariance, num_probes, product_batch, passes) -> None:
    denoiser, y, sigma = _unet_denoiser()
    run = {}
    for batch in (1, product_batch):
        generator = torch.Generator().manual_seed(1)
        run[batch] = denoising_moments(
            denoiser, y, sigma, covariance, num_probes, generator, jacobian, None, product_batch=batch
        )
        run[batch].state = generator.get_state()
    seq, bat = run[1], run[product_batch]
    torch.testing.assert_close(_estimate(bat), _estimate(seq), rtol=1e-4, atol=1e-5 * sigma**2)
    torch.testing.assert_close(bat.mu, seq.mu, rtol=1e-5, atol=1e-5)
    assert torch.equal(bat.state, seq.state)  # the same number of draws from the generator
    products = num_probes if covariance == "diagonal" else 64
    counted = (bat.num_backward, bat.num_jvp) if jacobian == "reverse" else (bat.num_jvp, bat.num_backward)
    assert counted == (products, 0) and (seq.num_forward, seq.num_backward, seq.num_jvp) == (
        bat.num_forward,
        bat.num_backward,
        bat.num_jvp,
    )
    assert seq.num_product_passes == products and bat.num_product_passes == passes


def test_batched_full_covariance_is_exact_on_a_gaussian_mixture_in_float64() -> None:
    model = GaussianMixtureDenoiser.random_anisotropic(6, 3, seed=2)
    t = model.noise_schedule.timestep_for_sigma(0.5)
    sigma = float(model.noise_schedule.sigma(t))
    y = model.sample_noisy(5, sigma)
    moments = denoising_moments(model.noise_schedule.denoiser(model, t), y, sigma, "full", product_batch=4)
    exact = model.posterior_covariance(y, sigma)
    assert float((moments.variance - exact).norm() / exact.norm()) <= 1e-9
    assert (moments.num_backward, moments.num_product_passes) == (6, math.ceil(6 / 4))


def test_batched_probes_keep_per_image_generators() -> None:
    """With one generator per image, image i's probes (and so its variance) do not depend on the batching."""
    denoiser, y, sigma = _unet_denoiser()
    out = [
        denoising_moments(
            denoiser,
            y,
            sigma,
            "diagonal",
            4,
            [torch.Generator().manual_seed(i) for i in range(3)],
            "reverse",
            None,
            1024,
            batch,
        ).variance
        for batch in (1, 4)
    ]
    torch.testing.assert_close(out[1], out[0], rtol=1e-4, atol=1e-5 * sigma**2)


def test_one_product_is_never_batched() -> None:
    """projection and a single probe take one product: product_batch changes nothing there (same code path)."""
    denoiser, y, sigma = _unet_denoiser()
    for covariance, probes in (("projection", 1), ("diagonal", 1)):
        a, b = (
            denoising_moments(
                denoiser, y, sigma, covariance, probes, torch.Generator().manual_seed(1), "reverse", product_batch=k
            )
            for k in (1, 8)
        )
        assert torch.equal(_estimate(a), _estimate(b)) and a.num_product_passes == b.num_product_passes == 1


class _NoGradUNet(UNet2DModel):
    """A UNet whose forward runs under ``torch.no_grad``: reverse mode sees no graph."""

    def forward(self, *args, **kwargs):  # type: ignore[override]
        with torch.no_grad():
            return super().forward(*args, **kwargs)


def test_batched_products_still_refuse_a_network_without_derivatives() -> None:
    """torch.func's transforms must not hide a network run under no_grad (reverse) or a detached output (forward):
    both would give J = c_skip alpha I through the skip term, i.e. Sigma = sigma^2 I, silently."""
    no_grad = _NoGradUNet.from_config(tiny_unet2d().config)
    no_grad.load_state_dict(tiny_unet2d().state_dict())
    denoiser, y, sigma = _unet_denoiser(no_grad.eval())
    with pytest.raises(NotDifferentiableError, match="reverse mode: the network output does not depend"):
        denoising_moments(denoiser, y, sigma, "diagonal", 2, jacobian="reverse", product_batch=2)
    detached = tiny_unet2d().eval()
    detached.register_forward_hook(lambda _m, _a, out: type(out)(sample=out.sample.detach()))
    denoiser, y, sigma = _unet_denoiser(detached)
    with pytest.raises(NotDifferentiableError, match="forward mode: the network output carries no tangent"):
        denoising_moments(denoiser, y, sigma, "diagonal", 2, jacobian="forward", product_batch=2)


def test_product_batch_is_checked_where_it_is_passed() -> None:
    y = torch.zeros(2, 3)
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="`product_batch` must be a positive integer"):
            denoising_moments(lambda v: v, y, 1.0, "diagonal", 2, product_batch=bad)
        with pytest.raises(ValueError, match="`product_batch` must be a positive integer"):
            MMGibbsScheduler(product_batch=bad)
    with pytest.raises(ValueError, match="finite differences take one forward per product"):
        denoising_moments(lambda v: v, y, 1.0, "diagonal", 2, jacobian="finite_difference", product_batch=2)


def test_pipeline_with_guidance_batches_the_probes_of_the_guided_denoiser() -> None:
    """Stable Diffusion with CFG through from_pipe: both branches in each batched backward; same images."""
    pipe = MomentMatchingGibbsPipeline.from_pipe(tiny_stable_diffusion_pipeline(), jacobian="reverse")
    pipe.set_progress_bar_config(disable=True)
    out = {
        k: pipe(
            ["a red cat", "a blue dog"],
            guidance_scale=5.0,
            covariance="diagonal",
            num_probes=4,
            product_batch=k,
            num_inference_steps=2,
            gibbs_sweeps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        )
        for k in (1, 4)
    }
    torch.testing.assert_close(out[4].images, out[1].images, rtol=1e-4, atol=1e-4)
    assert (out[1].num_forward, out[1].num_backward, out[1].num_product_passes) == (4, 16, 16)
    assert (out[4].num_forward, out[4].num_backward, out[4].num_product_passes) == (4, 16, 4)
    saved = MMGibbsScheduler.from_config(pipe.scheduler.config, product_batch=4)
    assert saved.config.product_batch == 4 and saved.gibbs_settings()["product_batch"] == 4


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux", "dit", "pixart"])
def test_batched_probes_through_every_transformer_and_unet_family(family: str) -> None:
    """torch.func's transforms run through every family's adapter with guidance (packed latents, ids, class labels,
    attention masks): the batched probes give the sequential probes' latents, at a quarter of the product passes."""
    from tiny_dit import tiny_dit_pipeline
    from tiny_flux import tiny_flux_pipeline
    from tiny_pixart import tiny_pixart_pipeline
    from tiny_sd3 import tiny_sd3_pipeline
    from tiny_sdxl import tiny_sdxl_pipeline

    prompts = ["a red cat", "a blue dog"]
    build, call = {
        "sdxl": (tiny_sdxl_pipeline, {"prompt": prompts, "guidance_scale": 5.0}),
        "sd3": (tiny_sd3_pipeline, {"prompt": prompts, "guidance_scale": 5.0}),
        "flux": (tiny_flux_pipeline, {"prompt": prompts, "negative_prompt": "", "true_cfg_scale": 4.0, "height": 16}),
        "dit": (tiny_dit_pipeline, {"class_labels": [1, 5], "guidance_scale": 4.0}),
        "pixart": (
            tiny_pixart_pipeline,
            {"prompt": prompts, "guidance_scale": 4.0, "clean_caption": False, "use_resolution_binning": False},
        ),
    }[family]
    pipe = MomentMatchingGibbsPipeline.from_pipe(build(), jacobian="reverse")
    pipe.set_progress_bar_config(disable=True)
    out = {
        k: pipe(
            **call,
            covariance="diagonal",
            num_probes=4,
            product_batch=k,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        )
        for k in (1, 4)
    }
    torch.testing.assert_close(out[4].images, out[1].images, rtol=1e-4, atol=1e-4)
    assert out[1].num_backward == out[4].num_backward == 8
    assert (out[1].num_product_passes, out[4].num_product_passes) == (8, 2)
