"""Exact flow-matching predictions of a Gaussian per condition, and the exact law of the Gibbs chain around them.

Data for condition c (a prompt, or the empty / negative prompt for the unconditional branch) is
x ~ N(m_c, s_c^2 I) in the transformer's own latent layout (SD3: C x H x W; Flux: packed tokens). At flow level u
(x_t = (1 - u) x + u eps, VE frame y = x_t / (1 - u) = x + sigma eps, sigma = u / (1 - u)) the exact posterior mean
and the velocity the network is trained to predict are

    k_c(sigma) = s_c^2 / (s_c^2 + sigma^2),   mu_c(y) = m_c + k_c (y - m_c),   v = (x_t - mu_c) / u,

so the denoiser is affine in y with slope k_c and the diagonal of its Jacobian is exactly k_c (Hutchinson probes
return it without error). :class:`ExactGaussians` is a forward hook that replaces the transformer's output by this
v, choosing each batch row's condition by its pooled text embedding.

Classifier-free guidance with scale g: mu_g = mu_u + g (mu_c - mu_u) = a y + b with

    a(sigma) = (1 - g) k_u + g k_c,    b(sigma) = (1 - g)(1 - k_u) m_u + g (1 - k_c) m_c.

For 0 < a < 1 this is the exact denoiser of the Gaussian N(m_g, v_g I) with v_g = sigma^2 a / (1 - a) and
m_g = b / (1 - a), but that Gaussian depends on sigma: as sigma -> 0 it tends to the product of experts
p_c^g p_u^(1-g) (precision g / s_c^2 + (1 - g) / s_u^2), at large sigma it is something else. The annealed chain
therefore samples no single one of them. Every step is affine-Gaussian, though (draw x = a y + b + sqrt(var) z,
re-noise y' = (1 - rho) x + rho y + sigma' sqrt(1 - c^2) z' with rho = c sigma' / sigma), so the law of the final
sample is Gaussian with moments that :func:`chain_law` propagates exactly, step by step, from the start
x_T ~ N(0, I) through the levels the sampler used: that is the target asserted with CFG. Without CFG (g = 1) the
same recursion lands on N(m_c, s_c^2) itself (to the start's mismatch at u = 1 - 1/T, ~1e-3), which is asserted as
well. The draw variance ``var`` is the estimator's: sigma^2 a for ``diagonal`` (exact), and for ``isotropic`` the
batch estimate sigma^2 - E||y - mu||^2 / d clamped to [0, sigma^2], whose expectation over a one-condition batch
the recursion uses (its batch fluctuation is O(1 / sqrt(N d)), far inside the tolerances).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmgibbs import MMGibbsScheduler
from mmgibbs.gibbs import kept_noise_share


@dataclass
class ExactGaussians:
    """Forward hook: the exact flow velocity of N(means[k], stds[k]^2 I) for the row whose pooled embedding is
    ``keys[k]``; ``timestep_scale`` is what u = 1 is in the model's timestep (SD3: 1000, Flux: 1)."""

    keys: torch.Tensor  # (K, p)
    means: torch.Tensor  # (K, *latent shape) float64
    stds: torch.Tensor  # (K,) float64
    timestep_scale: float
    levels: list[float] = field(default_factory=list)  # u of every call, in order

    def condition(self, pooled: torch.Tensor) -> torch.Tensor:
        distance = torch.cdist(pooled.double(), self.keys.double())
        index = distance.argmin(-1)
        assert bool((distance.min(-1).values < 1e-6).all()), "a row's pooled embedding matches no condition"
        return index

    def __call__(self, module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> tuple[torch.Tensor]:
        x_t = kwargs["hidden_states"]
        u = kwargs["timestep"].double() / self.timestep_scale
        self.levels.append(float(u[0]))
        index = self.condition(kwargs["pooled_projections"])
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        u, m, var = u.reshape(shape), self.means[index], self.stds[index].reshape(shape) ** 2
        alpha = 1 - u
        mu = m + alpha * var / (alpha**2 * var + u**2) * (x_t.double() - alpha * m)
        return ((x_t.double() - mu) / u).to(x_t.dtype), *tuple(output)[1:]


def guided_affine(
    sigma: float, means: torch.Tensor, stds: torch.Tensor, cond: int, uncond: int | None, g: float | None
) -> tuple[float, torch.Tensor]:
    """(a, b): mu = a y + b for condition ``cond`` at VE noise ``sigma``, guided by ``uncond`` with scale g."""
    k = stds**2 / (stds**2 + sigma**2)
    a, b = k[cond], (1 - k[cond]) * means[cond]
    if g is None:
        return float(a), b
    a_u, b_u = k[uncond], (1 - k[uncond]) * means[uncond]
    return float(a_u + g * (a - a_u)), b_u + g * (b - b_u)


def chain_law(
    levels: Sequence[float],
    means: torch.Tensor,
    stds: torch.Tensor,
    cond: int,
    covariance: str,
    uncond: int | None = None,
    g: float | None = None,
    transition: str = "ancestral",
    eta: float = 1.0,
) -> tuple[torch.Tensor, float]:
    """Exact mean (per coordinate) and variance of the final sample of the chain over flow levels u (one per
    step), started at x_t ~ N(0, I); see the module docstring."""
    sigmas = [u / (1 - u) for u in levels]
    mean_y = torch.zeros_like(means[cond])
    var_y = 1.0 / (1.0 - levels[0]) ** 2
    for i, sigma in enumerate(sigmas):
        a, b = guided_affine(sigma, means, stds, cond, uncond, g)
        if covariance == "diagonal":
            draw = max(sigma**2 * a, 0.0)
        elif covariance == "isotropic":
            mse = float((((1 - a) * mean_y - b) ** 2).mean()) + (1 - a) ** 2 * var_y
            draw = min(max(sigma**2 - mse, 0.0), sigma**2)
        else:
            raise ValueError(covariance)
        mean_x, var_x, cov_xy = a * mean_y + b, a**2 * var_y + draw, a * var_y
        if i == len(sigmas) - 1:
            return mean_x, var_x
        c = kept_noise_share(sigma, sigmas[i + 1], transition, eta)
        rho = c * sigmas[i + 1] / sigma
        mean_y = (1 - rho) * mean_x + rho * mean_y
        var_y = (
            (1 - rho) ** 2 * var_x + rho**2 * var_y + 2 * rho * (1 - rho) * cov_xy + sigmas[i + 1] ** 2 * (1 - c**2)
        )
    raise ValueError("no levels")


def assert_law(samples: torch.Tensor, mean: torch.Tensor, var: float, what: str) -> None:
    """Samples (N, *shape) match N(mean, var I): pooled standardised mean, per-coordinate means, and the std."""
    n = len(samples)
    residual = (samples.double() - mean).flatten(1)
    std = residual.std().item()
    assert abs(std / var**0.5 - 1) < 0.04, f"{what}: std {std:.4f}, exact {var**0.5:.4f}"
    pooled = residual.mean().item() / (var / residual.numel()) ** 0.5
    assert abs(pooled) < 4.5, f"{what}: mean off by {pooled:.1f} standard errors"
    per_coordinate = residual.mean(0).pow(2).mean().sqrt().item() / (var / n) ** 0.5  # ~1 when right
    assert per_coordinate < 1.25, f"{what}: per-coordinate means off by {per_coordinate:.2f} standard errors (rms)"


# ------------------------------------------------------------------ the checks SD3 and Flux share
# ``run(pipe, prompts, seed=..., **call arguments)`` is the test module's call (seeded generators, its sizes);
# ``guidance`` are the family's guidance arguments (SD3: ``guidance_scale``; Flux: ``negative_prompt`` and
# ``true_cfg_scale``); the hook's conditions 0 and 1 are ``prompts`` and 2 the unconditional branch.
Run = Callable[..., Any]


def assert_exact_laws(
    run: Run, pipe: Any, hook: ExactGaussians, prompts: list[str], covariance: str, g: float | None, **guidance: Any
) -> None:
    """Final latents per prompt at 20 levels have the exact law (module docstring): N(m_c, s_c^2) without guidance
    (``g`` None), the chain's guided Gaussian with it. `isotropic` runs one prompt per batch (its variance is one
    estimate per batch); `diagonal` both prompts in one batch."""
    n = 96
    batches = [[0, 1]] if covariance == "diagonal" else [[0], [1]]
    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            hook.levels.clear()
            latents = run(
                pipe,
                [prompts[c] for c in batch],
                seed=sum(batch),
                covariance=covariance,
                num_inference_steps=20,
                num_images_per_prompt=n,
                max_sequence_length=8,
                output_type="latent",
                **guidance,
            ).images
            assert latents.dtype == torch.float64 and len(hook.levels) == 20
            for j, c in enumerate(batch):
                mean, var = chain_law(hook.levels, hook.means, hook.stds, c, covariance, 2, g)
                if g is None:
                    torch.testing.assert_close(mean, hook.means[c], atol=2e-3, rtol=0)
                    assert abs(var / hook.stds[c].item() ** 2 - 1) < 2e-3
                assert_law(latents[j * n : (j + 1) * n], mean, var, f"{covariance} prompt {c} {guidance}")
    finally:
        handle.remove()


def assert_exact_affine_denoiser(
    pipe: Any, hook: ExactGaussians, arguments: dict[str, Any], shape: tuple[int, ...], g: float
) -> None:
    """Through the family's ``prepare`` for ``arguments`` (two prompts, guidance scale g), on 5 levels: mu = a y + b
    and J^T v = a v with the analytic guided a, b (:func:`guided_affine`) at every level, for y of ``shape`` per
    image."""
    scheduler = MMGibbsScheduler.from_config(pipe.scheduler.config)
    family = pipe.family(scheduler)
    family.set_timesteps(scheduler, 5, "cpu", arguments)
    denoiser = scheduler.denoiser(family.prepare(scheduler, device=torch.device("cpu"), **arguments).predict)
    y = torch.randn(2, *shape, dtype=torch.float64, requires_grad=True)
    v = torch.randn_like(y)
    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        for i, sigma in enumerate(scheduler.ve_sigmas()):
            mu = denoiser(y, i)
            (vjp,) = torch.autograd.grad(mu, y, v)
            for c in (0, 1):
                a, b = guided_affine(sigma, hook.means, hook.stds, c, 2, g)
                torch.testing.assert_close(mu[c], a * y[c].detach() + b, atol=1e-5, rtol=1e-6)
                torch.testing.assert_close(vjp[c], a * v[c], atol=1e-8, rtol=1e-6)
    finally:
        handle.remove()


def assert_per_image_streams(run: Run, pipe: Any, hook: ExactGaussians, prompts: list[str], **guidance: Any) -> None:
    """With one generator per image, image 0 of the float64 ``pipe`` is the same alone and in a batch for `none`,
    `diagonal`, `projection` and `isotropic`, and not for `isotropic_batch` (one variance estimate over the batch;
    run with the exact Gaussians' hook, whose variance estimate is never clamped to 0)."""
    for covariance in ("none", "diagonal", "projection", "isotropic", "isotropic_batch"):
        kwargs = {**guidance, "covariance": covariance, "output_type": "latent", "max_sequence_length": 8}
        with contextlib.ExitStack() as stack:
            if covariance.startswith("isotropic"):
                handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
                stack.callback(handle.remove)
            alone = run(pipe, prompts[:1], seed=[7], **kwargs).images
            batched = run(pipe, prompts, seed=[7, 8], **kwargs).images
        same = torch.allclose(alone[0], batched[0], atol=1e-9, rtol=1e-9)
        assert same == (covariance != "isotropic_batch"), covariance
