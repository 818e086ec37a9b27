"""Baselines the Gibbs sampler is measured against, each a short function on the same denoiser y -> mu(y).

The score of the noisy marginal follows from the denoiser by Tweedie: grad log p~(y) = (mu(y) - y) / sigma^2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

from .moments import Denoiser, Generator
from .scheduler import MMGibbsScheduler


def tweedie_score(denoiser: Denoiser, sigma: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """grad log p~(y) = (mu(y) - y) / sigma^2."""
    return lambda y: (denoiser(y) - y) / sigma**2


@torch.no_grad()
def langevin(
    score: Callable[[torch.Tensor], torch.Tensor],
    y: torch.Tensor,
    step_size: float,
    num_steps: int,
    generator: Generator = None,
) -> torch.Tensor:
    """Unadjusted Langevin dynamics on p~: y <- y + eta grad log p~(y) + sqrt(2 eta) z, ``num_steps`` times."""
    for _ in range(num_steps):
        z = randn_tensor(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        y = y + step_size * score(y) + math.sqrt(2 * step_size) * z
    return y


@torch.no_grad()
def annealed_langevin(
    denoisers: Sequence[tuple[Denoiser, float]],
    y: torch.Tensor,
    steps_per_level: int,
    step_scale: float,
    generator: Generator = None,
    denoise: bool = True,
) -> torch.Tensor:
    """Annealed Langevin (Song & Ermon 2019): at each level (denoiser, sigma), from high to low noise,
    ``steps_per_level`` Langevin steps of size ``step_scale * sigma^2``; then, if ``denoise``, one Tweedie jump
    x = mu(y) at the last level (one more model call). ``y`` starts in the first level's VE frame."""
    for denoiser, sigma in denoisers:
        y = langevin(tweedie_score(denoiser, sigma), y, step_scale * sigma**2, steps_per_level, generator)
    return denoisers[-1][0](y) if denoise else y


@torch.no_grad()
def predictor_corrector(
    model: torch.nn.Module,
    scheduler: MMGibbsScheduler,
    sample: torch.Tensor,
    snr: float,
    generator: Generator = None,
    corrector_steps: int = 1,
) -> torch.Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Alg. 2-3) in the model's frame x_t.

    At each of ``scheduler.timesteps`` (set beforehand): ``corrector_steps`` Langevin steps on p(x_t),
    x_t <- x_t + eps grad log p(x_t) + sqrt(2 eps) z with eps = 2 (snr ||z|| / ||grad||)^2 (batch norms) and
    grad log p(x_t) = (alpha_t mu - x_t) / s_t^2 from the model (Tweedie); then the predictor, ``scheduler.step`` (use
    ``covariance="none"``, ``transition="ancestral"``: DDPM's ancestral step). ``corrector_steps + 1`` model calls
    per level.
    """

    def predict(model_input: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(model_input, t.expand(len(model_input))).sample

    denoiser = scheduler.denoiser(predict)
    for i, t in enumerate(scheduler.timesteps):
        alpha, s = scheduler.level(i)
        score_y = tweedie_score(lambda y, i=i: denoiser(y, i), s / alpha)
        for _ in range(corrector_steps):
            grad = score_y(sample / alpha) / alpha  # x_t = alpha_t y: grad log p(x_t) = grad log p~(y) / alpha_t
            z = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            ratio = z.flatten(1).norm(dim=-1).mean() / grad.flatten(1).norm(dim=-1).mean()
            eps = 2 * (snr * ratio) ** 2
            sample = sample + eps * grad + (2 * eps).sqrt() * z
        sample = scheduler.step(predict(scheduler.scale_model_input(sample, t), t), t, sample, generator).prev_sample
    return sample
