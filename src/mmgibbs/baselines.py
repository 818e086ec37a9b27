"""Baselines the Gibbs sampler is measured against, each a short function on the same denoiser y -> mu(y).

The score of the noisy marginal follows from the denoiser by Tweedie: grad log p~(y) = (mu(y) - y) / sigma^2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

from .moments import Denoiser, Generator


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
