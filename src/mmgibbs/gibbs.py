"""The Gibbs kernel: moment-matching denoising Gibbs sampling over any denoiser, in one function.

Everything here lives in the variance-exploding frame of Zhang et al. (2023), y = x + sigma * eps; the model's
own frame x_t = alpha_t * y is the business of the caller (:meth:`MMGibbsScheduler.denoiser` builds the closure).
Given steps i = 0 .. n-1 with noise levels sigma_0 >= ... >= sigma_{n-1} (a level repeated once per Gibbs sweep),
a denoiser ``(y, i) -> mu(y) = E[x | y]`` at level i and a covariance estimator (``mmgibbs.covariances``):

    for i in 0 .. n-1:
        1. mu, Sigma = estimator.moments(denoiser at i, y, sigma_i)   Tweedie: Sigma = sigma_i^2 d mu / d y
        2. x ~ N(mu, Sigma)                                           the moment-matched posterior draw
           (with ``known`` = (x_k, keep): x <- keep * x_k + (1 - keep) * x, a Gibbs step on the unknown part)
        3. if i = n-1: return x (or mu)
        4. r = (y - x) / sigma_i                                      the noise that x implies for y
           y <- x + sigma_{i+1} (c r + sqrt(1 - c^2) z),  z ~ N(0, I)  re-noise to the next level

where c, the share of r that is kept, is 0 for the paper's fresh re-noising (``transition="gibbs"``, and every
sweep within a level) and c^2 = 1 - eta^2 (1 - sigma_{i+1}^2 / sigma_i^2) for ``transition="ancestral"``: with
eta = 1 that is the DDPM posterior q(y_{i+1} | y_i, x) with x ~ N(mu, Sigma) integrated out; eta = 0 is a DDIM step
around the drawn x. For every eta an exact posterior draw x would leave y_{i+1} with the exact marginal at level
i+1; the moment-matched Gaussian makes that exact for Gaussian data.

Second-order mean (``mean_order=2``, ancestral transition only): the draw is centred on DPM-Solver++(2M)'s
extrapolated data prediction instead of mu_i, and its covariance keeps only the variance that step still lacks
(``mmgibbs.multistep``); with Sigma = 0 it is DPM-Solver++(2M) step for step (eta 0) and its SDE form (eta 1).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from .covariances import CovarianceEstimator
from .moments import DenoisingMoments, Generator
from .multistep import MultistepMean, VarianceMatch

TRANSITIONS = ("ancestral", "gibbs")
FINAL_OUTPUTS = ("sample", "mean")
#: orders of the data prediction the draw is centred on (module docstring)
MEAN_ORDERS = (1, 2)
#: the cost counts every step's moments carry, summed into :class:`GibbsOutput`
COUNTS = ("num_forward", "num_backward", "num_jvp", "num_product_passes")

#: ``(y, step index) -> mu(y)`` in the variance-exploding frame
LevelDenoiser = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class GibbsOutput:
    """The chain's result and what it cost.

    Args:
        sample: the last draw x (or the last posterior mean, ``final_output="mean"``), in y's dtype.
        mean: the last posterior mean mu.
        num_forward, num_backward, num_jvp: batched model forward passes, backward passes (reverse-mode Jacobian
            products) and forward-mode Jacobian-vector products, summed over all steps; one per Jacobian product
            also when ``product_batch`` computes several in one vectorised pass.
        num_product_passes: the passes that computed the Jacobian products (fewer than the products with
            ``product_batch`` > 1; see :class:`mmgibbs.moments.DenoisingMoments`).
    """

    sample: torch.Tensor
    mean: torch.Tensor
    num_forward: int = 0
    num_backward: int = 0
    num_jvp: int = 0
    num_product_passes: int = 0


def kept_noise_share(sigma: float, sigma_next: float, transition: str = "ancestral", eta: float = 1.0) -> float:
    """c, the share of the implied noise r kept when moving from ``sigma`` to ``sigma_next`` (module docstring).

    0 for ``transition="gibbs"`` and within a level (sigma_next >= sigma); sqrt(1 - eta^2 (1 - (sigma_next /
    sigma)^2)) for ``"ancestral"``.
    """
    ratio = sigma_next / sigma if sigma_next < sigma else 1.0
    if transition == "gibbs" or ratio >= 1.0:
        return 0.0
    return math.sqrt(1.0 - eta**2 * (1.0 - ratio**2))


def check_mean_order(mean_order: object, transition: str, corrector: object = False) -> None:
    """``mean_order`` is 1 or 2, ``corrector`` a bool; both 2 and the corrector need the ancestral transition (fresh
    re-noising keeps nothing of y to integrate or correct)."""
    if isinstance(mean_order, bool) or mean_order not in MEAN_ORDERS:
        raise ValueError(f"`mean_order` must be one of {', '.join(map(repr, MEAN_ORDERS))}; got {mean_order!r}.")
    if not isinstance(corrector, bool):
        raise ValueError(f"`corrector` must be True or False; got {corrector!r}.")
    for name, on in (
        ("`mean_order=2` (DPM-Solver++(2M)'s extrapolated mean)", mean_order == 2),
        ("`corrector`", corrector),
    ):
        if on and transition != "ancestral":
            raise ValueError(
                f"{name} needs transition='ancestral': the paper's fresh re-noising (transition='gibbs') keeps "
                "nothing of y_i, so there is no step to integrate."
            )


def condition_on_known(
    moments: DenoisingMoments, x: torch.Tensor, known: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """A draw (or mean) ``x`` of N(mu, Sigma) turned into one of N(mu, Sigma) conditioned on x_K = x_known, K the
    entries where ``keep`` is 1: a Gibbs step on the unknown entries given the known ones.

    Matheron's rule, x + Sigma P (P Sigma P + I - P)^{-1} P (x_known - x) with P = diag(keep), is exact for any
    Gaussian: on K it gives x_known, on the rest x_U + Sigma_UK Sigma_KK^{-1} (x_known - x)_K. For diagonal or
    isotropic Sigma (and for ``none``) Sigma_UK = 0, so it is the replacement x_K <- x_known; ``full`` applies
    the formula (its Sigma_KK is regularised by 1e-9 of its mean variance, as clamped spectra can be singular);
    ``projection`` holds no Sigma and is replaced, which is not the conditional of its draw.
    """
    x_known, keep = known[0].to(x.dtype), known[1].to(x.dtype).expand_as(x)
    if moments.covariance != "full":
        return torch.lerp(x, x_known, keep)
    n, d = x.shape[0], x[0].numel()
    p = keep.reshape(n, d)
    cov = moments.variance.to(x.dtype)
    ridge = 1e-9 * torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1).clamp(min=1e-30)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    block = p.unsqueeze(-1) * cov * p.unsqueeze(-2) + torch.diag_embed(1.0 - p) + ridge.reshape(n, 1, 1) * eye
    residual = (p * (x_known - x).reshape(n, d)).unsqueeze(-1)
    weights = p.unsqueeze(-1) * torch.linalg.solve(block, residual)
    return torch.lerp(x + (cov @ weights).reshape(x.shape), x_known, keep)


def gibbs_step(
    moments: DenoisingMoments,
    y: torch.Tensor,
    sigma: float,
    sigma_next: float | None,
    *,
    transition: str = "ancestral",
    eta: float = 1.0,
    final_output: str = "sample",
    clip_range: float | None = None,
    known: tuple[torch.Tensor, torch.Tensor] | None = None,
    generator: Generator = None,
    multistep: MultistepMean | None = None,
    rescale: Callable[[DenoisingMoments], DenoisingMoments] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-4 of the kernel: draw x ~ N(mu, Sigma) at level ``sigma``, then re-noise it to ``sigma_next``.

    Returns ``(y_next, mu)``; after the last step (``sigma_next=None``) ``(x, mu)`` (or ``(mu, mu)``).
    ``clip_range`` clamps mu to [-r, r] (diffusers' ``clip_sample``); ``known = (x_known, keep)`` conditions the
    draw (and a final mean) on x = x_known where ``keep`` is 1 (:func:`condition_on_known`); ``multistep`` (a
    :class:`~mmgibbs.multistep.MultistepMean` carried across the steps) centres the draw on the extrapolated mean
    and ``rescale`` gives the covariance the second-order step still needs (``mmgibbs.multistep``). Random numbers
    are drawn in this order: the draw x (unless ``covariance="none"``), then the re-noising z.
    """
    mu = moments.mu.to(y.dtype)
    if clip_range is not None:
        mu = mu.clamp(-clip_range, clip_range)
        moments = dataclasses.replace(moments, mu=mu)
    c = kept_noise_share(sigma, sigma_next, transition, eta) if sigma_next is not None else 0.0
    if multistep is not None:
        y = multistep.correct(y, mu)  # UniPC's corrector, when the chain has one (the last transition's centre)
        share = None if sigma_next is None else 1.0 - c * sigma_next / sigma
        centre = multistep(mu, sigma, sigma_next, share)
    else:
        centre = mu
    if centre is not mu:
        moments = dataclasses.replace(moments, mu=centre)
    if rescale is not None:
        moments = rescale(moments)
    x = moments.sample(generator).to(y.dtype) if moments.covariance != "none" else centre
    if known is not None:
        x = condition_on_known(moments, x, known)
    if sigma_next is None:
        out = x if final_output == "sample" else mu if known is None else condition_on_known(moments, mu, known)
        return (out.clamp(-clip_range, clip_range) if clip_range is not None else out), mu
    z = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    r = (y - x) / sigma
    return x + sigma_next * (c * r + math.sqrt(1.0 - c**2) * z), mu


def sample(
    denoiser: LevelDenoiser,
    sigmas: Sequence[float],
    y: torch.Tensor,
    estimator: CovarianceEstimator,
    *,
    transition: str = "ancestral",
    eta: float = 1.0,
    mean_order: int = 1,
    corrector: bool = False,
    final_output: str = "sample",
    clip_range: float | None = None,
    known: tuple[torch.Tensor, torch.Tensor] | None = None,
    generator: Generator = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
    progress: Callable[[Sequence[float]], Sequence[float]] = iter,
) -> GibbsOutput:
    """Run the chain (module docstring) from ``y`` at ``sigmas[0]``; one step per entry of ``sigmas``.

    Args:
        denoiser: ``(y, i) -> mu`` at step i (``MMGibbsScheduler.denoiser`` builds it from a model).
        sigmas: the noise level of every step, a Python sequence of floats (levels x sweeps entries).
        y: the starting point in the frame of ``sigmas[0]``; the chain runs in its dtype (float32 or float64).
        estimator: how mu and Sigma are estimated at each step (``mmgibbs.covariances``, e.g.
            ``make_estimator("diagonal", num_probes=4)``, or ``MMGibbsScheduler.estimator()``); it checks the
            levels (a calibrated table must hold every one) before the first model call.
        transition, eta, final_output, clip_range, known: see :func:`gibbs_step`.
        mean_order: 1 centres each draw on mu_i; 2 on DPM-Solver++(2M)'s extrapolation (module docstring).
        corrector: UniPC's corrector on the centre (:class:`~mmgibbs.multistep.MultistepMean`): with
            ``mean_order=2``, no covariance and eta 0 the chain is UniPC (bh2) step for step; no extra model call.
        generator: torch generator(s) for probes and draws; a list gives each sample its own stream.
        callback: called as ``callback(i, y_next, mu)`` after every step (``y_next`` is the final sample after the
            last); a returned tensor replaces ``y_next``.
        progress: wraps the steps, e.g. a pipeline's ``progress_bar``.
    """
    if not isinstance(estimator, CovarianceEstimator):
        raise TypeError(
            f"`estimator` must be a covariance estimator (`mmgibbs.covariances.make_estimator(name, ...)`); got "
            f"{type(estimator).__name__}."
        )
    check_mean_order(mean_order, transition, corrector)
    estimator.check_run(sigmas, y)
    multistep = MultistepMean(mean_order, corrector)
    match = None
    if mean_order == 2:
        match = VarianceMatch(sigmas, order=2, transition=transition, eta=eta, final_output=final_output)
    counts = dict.fromkeys(COUNTS, 0)
    mu, n = y, len(sigmas)
    for i in progress(range(n)):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1]) if i + 1 < n else None
        moments = estimator.moments(lambda v, i=i: denoiser(v, i), y, sigma, generator)
        for key in COUNTS:
            counts[key] += getattr(moments, key)
        y, mu = gibbs_step(
            moments,
            y,
            sigma,
            sigma_next,
            transition=transition,
            eta=eta,
            final_output=final_output,
            clip_range=clip_range,
            known=known,
            generator=generator,
            multistep=multistep,
            rescale=(lambda m, i=i: match.scale(i, m)) if match is not None else None,
        )
        if callback is not None:
            replaced = callback(i, y, mu)
            y = y if replaced is None else replaced
    return GibbsOutput(sample=y, mean=mu, **counts)
