"""Exact Gaussian conditions for adapter tests: the exact network output for data N(m_c, s_c^2 I) per condition,
and the exact law of the Gibbs chain when guidance mixes two such conditions.

For x ~ N(m, s^2 I) and y = x + sigma * eps (the VE frame), the denoiser is affine:

    mu(y) = m + a (y - m),    a = s^2 / (s^2 + sigma^2),    Cov[x | y] = sigma^2 a I.

Guidance with scale g mixes the conditional (m_c, s_c) and unconditional (m_u, s_u) branches:

    mu_g(y) = (1 - g) mu_u(y) + g mu_c(y) = A y + B,
    A = (1 - g) a_u + g a_c,    B = (1 - g) (1 - a_u) m_u + g (1 - a_c) m_c,    J = d mu_g / d y = A I.

With 0 < A < 1 this is the exact denoiser, at this sigma, of the Gaussian N(m*, s*^2 I) with s*^2 = sigma^2 A / (1 - A)
and m* = B / (1 - A), i.e. 1 / (s*^2 + sigma^2) = (1 - g) / (s_u^2 + sigma^2) + g / (s_c^2 + sigma^2) and
m* / (s*^2 + sigma^2) = (1 - g) m_u / (s_u^2 + sigma^2) + g m_c / (s_c^2 + sigma^2): the noisy marginals multiply,
p*_sigma ∝ p_u,sigma^(1-g) p_c,sigma^g (the CFG score is the tilted score). Two cases:

* s_u = s_c = s: a_u = a_c, so s* = s and m* = m_u + g (m_c - m_u) at every sigma: one Gaussian for the whole chain,
  which an annealed chain with exact moments samples exactly.
* s_u != s_c: m* and s* move with sigma (as sigma -> 0, the tilted clean Gaussian p_u^(1-g) p_c^g, precision
  (1 - g) / s_u^2 + g / s_c^2). An annealed chain then follows a moving target and ends in neither the tilted clean
  Gaussian nor the last level's target; its exact law is what :func:`chain_law` computes: every step is affine in
  the previous y plus Gaussian noise, so the law stays Gaussian and its mean and variance follow the recursion
  (ancestral transition, kept share c, k = c sigma' / sigma):

      x  = A y + B + sqrt(v) z,                  v = sigma^2 A   (the exact diagonal / isotropic covariance)
      y' = ((1 - k) A + k) y + (1 - k) B + (1 - k) sqrt(v) z + sigma' sqrt(1 - c^2) z'.
"""

from __future__ import annotations

import torch

from mmgibbs import MMGibbsScheduler
from mmgibbs.gibbs import kept_noise_share


def guided_affine(
    sigma: float, m_c: torch.Tensor, s2_c: torch.Tensor, m_u: torch.Tensor, s2_u: torch.Tensor, g: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of mu_g(y) = A y + B per sample (module docstring); m (N, d), s2 (N,); A (N, 1), B (N, d)."""
    a_c = (s2_c / (s2_c + sigma**2)).unsqueeze(-1)
    a_u = (s2_u / (s2_u + sigma**2)).unsqueeze(-1)
    return (1 - g) * a_u + g * a_c, (1 - g) * (1 - a_u) * m_u + g * (1 - a_c) * m_c


def chain_law(
    scheduler: MMGibbsScheduler,
    m_c: torch.Tensor,
    s2_c: torch.Tensor,
    m_u: torch.Tensor,
    s2_u: torch.Tensor,
    g: float,
    start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact per-sample mean (N, d) and variance (N,) of the final draw of the chain over ``scheduler``'s
    steps from model-frame latents N(0, init_noise_sigma^2 I), with the exact guided moments at every step."""
    sigmas = scheduler.ve_sigmas()[start:]
    alpha = scheduler.level(start)[0]
    cfg = scheduler.config
    mean = torch.zeros_like(m_c)
    var = torch.full(s2_c.shape, (scheduler.init_noise_sigma / alpha) ** 2, dtype=m_c.dtype)
    for i, sigma in enumerate(sigmas):
        a, b = guided_affine(sigma, m_c, s2_c, m_u, s2_u, g)
        v = (sigma**2 * a).clamp(min=0).squeeze(-1)
        a = a.squeeze(-1)
        x_mean, x_var = a.unsqueeze(-1) * mean + b, a**2 * var + v
        if i == len(sigmas) - 1:
            return x_mean, x_var
        nxt = sigmas[i + 1]
        c = kept_noise_share(sigma, nxt, cfg.transition, cfg.eta)
        k = c * nxt / sigma
        lin = (1 - k) * a + k
        mean = lin.unsqueeze(-1) * mean + (1 - k) * b
        var = lin**2 * var + (1 - k) ** 2 * v + nxt**2 * (1 - c**2)
    raise ValueError("the scheduler has no steps")


def exact_epsilon(x_t: torch.Tensor, alpha_bar: torch.Tensor, m: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """The exact epsilon prediction at VP model input x_t (N, ...) with alpha_bar_t (N,) for data N(m_n, s2_n I)
    per sample, in float64: y = x_t / sqrt(alpha_bar), mu = m + a (y - m), eps = (x_t - sqrt(alpha_bar) mu) / s_t."""
    flat = x_t.reshape(len(x_t), -1).double()
    alpha_bar = alpha_bar.double().reshape(-1, 1)
    sigma2 = (1 - alpha_bar) / alpha_bar
    a = s2.reshape(-1, 1) / (s2.reshape(-1, 1) + sigma2)
    y = flat / alpha_bar.sqrt()
    mu = m + a * (y - m)
    return ((flat - alpha_bar.sqrt() * mu) / (1 - alpha_bar).sqrt()).reshape(x_t.shape)
