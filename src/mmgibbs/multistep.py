"""The second-order mean inside the draw, and the draw's variance matched to it (``mean_order=2``).

The kernel's ancestral step (``mmgibbs.gibbs``) from level sigma_i to sigma_{i+1} is, with c the kept noise share,

    y_{i+1} = c rho_i y_i + (1 - c rho_i) x + sigma_{i+1} sqrt(1 - c^2) z,   x ~ N(m_i, S_i),
    rho_i = sigma_{i+1} / sigma_i.

**Mean.** With m_i = mu_i (first order) and S_i the exact posterior covariance the step is exact for Gaussian data
(every marginal is the true one). DPM-Solver++(2M) (Lu et al. 2022) replaces the data prediction by its multistep
extrapolation in lambda = -log sigma; ``mean_order=2`` centres the draw on it:

    m_i = mu_i + (mu_i - mu_{i-1}) h_i / (2 h_{i-1}),    h_i = log(sigma_i / sigma_{i+1}),

with mu_{i-1} the mean of the previous transition between levels (sweeps within a level neither use nor change it);
the first transition and the last step stay first order (DPM-Solver++'s warm-up and its first-order final step),
and so does a transition more than twice as long as the one before (h_i > 2 h_{i-1}, e.g. DDPM's "leading" layout
jumping from sigma 0.34 to its last level 0.01 at 10 steps: h_i / (2 h_{i-1}) = 2.3 there, and the extrapolation
took the exact image-like mixture's FD from 0.07 to 1.4). diffusers' own layouts for DPM-Solver keep h_i / (2
h_{i-1}) in 0.45-0.75 at 10 steps.
With S_i = 0 this is DPM-Solver++(2M) step for step at eta 0 and its SDE form ("sde-dpmsolver++", midpoint) at eta 1.

**Variance.** The extrapolation already moves samples along the data directions (it is a better integrator of the
probability-flow ODE, whose samples have the right spread), so drawing the whole posterior covariance on top of it
counts the spread twice: on an exact Gaussian mixture (docs/results.md) the large directions come out 24% too wide.
The draw therefore gets only the variance the step still lacks. For a Gaussian direction of prior variance lam the
chain is linear, mu_i = a_i y_i, a_i = lam / (lam + sigma_i^2), and the pair (y_i, mu_{i-1}) has a 2 x 2 covariance
that the step maps exactly; the draw's variance in that direction is chosen so that Var(y_{i+1}) = lam +
sigma_{i+1}^2, the true marginal:

    s_i(lam) = max(0, lam + sigma_{i+1}^2 c^2 - Var(c rho_i y_i + (1 - c rho_i) m_i)) / (1 - c rho_i)^2

(after the last step, with ``final_output="sample"``: s = max(0, lam - Var(mu_last))). :class:`VarianceMatch` tabulates
f_i(lam) = s_i(lam) / Sigma_i(lam), Sigma_i = lam sigma_i^2 / (lam + sigma_i^2), on a log grid of lam, once per
schedule. Each direction of the estimator's covariance, of posterior variance v, is scaled by f_i(lam(v)),
lam(v) = v sigma_i^2 / (sigma_i^2 - v) (:meth:`mmgibbs.moments.DenoisingMoments.scaled`). For ``mean_order=1`` the
factor is 1 (the first-order step is the exact one), so nothing changes. For Gaussian data the second-order chain
with the exact covariance then has the exact marginals again; f is about 0.4-0.5 for small directions and falls to
0 for large ones at low noise, where the extrapolation alone already spreads the samples enough.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .moments import DenoisingMoments

#: log-spaced prior variances lam the factors are tabulated on (data units: images in [-1, 1] have lam <= 1)
LAMBDA_GRID = np.logspace(-8.0, 6.0, 561)


def _kept_share(sigma: float, sigma_next: float, transition: str, eta: float) -> float:
    from .gibbs import kept_noise_share

    return kept_noise_share(sigma, sigma_next, transition, eta)


def variance_factors(
    sigmas: Sequence[float],
    lam: np.ndarray,
    *,
    order: int = 2,
    transition: str = "ancestral",
    eta: float = 0.0,
    final_output: str = "sample",
) -> np.ndarray:
    """f_i(lam) (module docstring) for every step i of the chain over ``sigmas`` (levels x sweeps) with a mean of
    ``order`` and prior variances ``lam``: an array (len(sigmas), len(lam)). Steps within a level (sigma_{i+1} =
    sigma_i, fresh re-noising, first-order centre) are matched too. ``order=1`` gives 1 everywhere (to rounding):
    the first-order step with the exact covariance is exact."""
    lam = np.asarray(lam, dtype=np.float64)
    n = len(sigmas)
    f = np.ones((n, lam.size))
    var_y = lam + float(sigmas[0]) ** 2  # Var(y_0): the chain starts on the noisy marginal
    cov_ym = np.zeros_like(lam)  # Cov(y_i, mu_prev)
    var_m = np.zeros_like(lam)  # Var(mu_prev)
    h_prev = None
    for i in range(n):
        s = float(sigmas[i])
        a = lam / (lam + s**2)
        posterior = lam * s**2 / (lam + s**2)
        if i == n - 1:
            if final_output == "sample":
                f[i] = np.maximum(lam - a**2 * var_y, 0.0) / np.maximum(posterior, 1e-300)
            break
        s_next = float(sigmas[i + 1])
        transition_step = s_next < s
        h = math.log(s / s_next) if transition_step else None
        k = extrapolation_weight(h, h_prev) if (order == 2 and transition_step) else 0.0
        c = _kept_share(s, s_next, transition, eta)
        keep = c * s_next / s
        # y_{i+1} = keep y_i + (1 - keep) (m_i + xi) + s_next sqrt(1 - c^2) z,  m_i = (1 + k) a y_i - k mu_prev
        alpha, beta = keep + (1 - keep) * (1 + k) * a, -(1 - keep) * k
        var_det = alpha**2 * var_y + 2 * alpha * beta * cov_ym + beta**2 * var_m
        need = np.maximum(lam + s_next**2 * c**2 - var_det, 0.0) / (1 - keep) ** 2
        f[i] = need / np.maximum(posterior, 1e-300)
        if transition_step:  # mu_i becomes the previous mean of the next transition
            cov_ym, var_m = a * (alpha * var_y + beta * cov_ym), a**2 * var_y
            h_prev = h
        else:  # a sweep: the history is untouched; y_{i+1} is new, its covariance with mu_prev follows the step
            cov_ym = alpha * cov_ym + beta * var_m
        var_y = var_det + (1 - keep) ** 2 * need + s_next**2 * (1 - c**2)
    return f


def extrapolation_weight(h: float, h_prev: float | None) -> float:
    """k = h_i / (2 h_{i-1}) of the extrapolation m_i = mu_i + k (mu_i - mu_{i-1}); 0 (first order) for the first
    transition and for a step more than twice as long as the previous one (module docstring)."""
    if h_prev is None or h > 2.0 * h_prev:
        return 0.0
    return h / (2.0 * h_prev)


class VarianceMatch:
    """The factors f_i of one schedule as a lookup ``(i, v, sigma_i) -> f_i(lam(v))`` on the tensors' device."""

    def __init__(self, sigmas: Sequence[float], **settings: object):
        self.sigmas = [float(s) for s in sigmas]
        self.settings = settings
        self._log_grid = torch.from_numpy(np.log(LAMBDA_GRID))
        self._factors = torch.from_numpy(variance_factors(self.sigmas, LAMBDA_GRID, **settings))  # type: ignore[arg-type]

    def factor(self, i: int, variance: torch.Tensor) -> torch.Tensor:
        """f_i at posterior variances ``variance`` (any shape) of step i: linear in log lam, constant outside."""
        s2 = self.sigmas[i] ** 2
        v = variance.clamp(min=0.0)
        lam = v * s2 / (s2 - v.clamp(max=s2 * (1.0 - 1e-9)))
        grid = self._log_grid.to(variance.device, variance.dtype)
        values = self._factors[i].to(variance.device, variance.dtype)
        x = lam.clamp(min=1e-300).log().clamp(grid[0], grid[-1])
        j = torch.searchsorted(grid, x.contiguous()).clamp(1, len(grid) - 1)
        x0, x1 = grid[j - 1], grid[j]
        w = (x - x0) / (x1 - x0)
        return torch.lerp(values[j - 1], values[j], w).clamp(min=0.0)

    def scale(self, i: int, moments: DenoisingMoments) -> DenoisingMoments:
        """The moments with each direction's variance scaled by its factor (module docstring)."""
        return moments.scaled(lambda v: self.factor(i, v))


def corrector_weights(h: float, h_prev: float | None) -> tuple[float, float]:
    """UniPC's corrector (UniC, "bh2", Zhao et al. 2023) for the transition of length h = log(sigma_s / sigma_t):
    weights (w_prev, w_new) of the corrected data prediction

        D_c = mu_s + w_prev (mu_{s-1} - mu_s) + w_new (mu_t - mu_s),

    with mu_t the mean at the level reached, mu_{s-1} the previous transition's (length h_prev; None: the step was
    first order, and UniC of order 1 is the trapezoid w_new = 1/2). For order 2, with r = -h_prev / h, B = e^{-h} - 1,
    phi_1 = (e^{-h} - 1) / (-h) - 1, phi_2 = phi_1 / (-h) - 1/2, the weights solve [[1, 1], [r, 1]] rho =
    [phi_1 / B, 2 phi_2 / B] (diffusers' ``multistep_uni_c_bh_update``), w_prev = rho_0 / r, w_new = rho_1."""
    if h_prev is None:
        return 0.0, 0.5
    hh = -h
    b_h = math.expm1(hh)
    phi_1 = math.expm1(hh) / hh - 1.0
    phi_2 = phi_1 / hh - 0.5
    r = -h_prev / h
    b = np.array([phi_1 / b_h, 2.0 * phi_2 / b_h])
    rho = np.linalg.solve(np.array([[1.0, 1.0], [r, 1.0]]), b)
    return float(rho[0] / r), float(rho[1])


class MultistepMean:
    """DPM-Solver++(2M)'s extrapolated data prediction across the chain's transitions (module docstring), and
    UniPC's corrector on it.

    ``order=1`` leaves mu as it is. Call it once per step, with the step's clipped mean: it returns the mean to
    centre the draw on, and remembers (mu_i, h_i) of every transition between levels.

    ``corrector=True`` adds UniC (:func:`corrector_weights`): once the model has given mu_t at the level a transition
    reached, :meth:`correct` moves y_t by (1 - c rho)(D_c - m_s), the corrected minus the used centre times the
    centre's share in the step (y_t = c rho y_s + (1 - c rho) x + noise, x ~ N(m_s, S_s)): the draw and the noise
    are kept, only their centre is corrected, with no extra model call (mu_t is the mean at the uncorrected y_t, as in
    UniPC). With S = 0 and eta 0 the chain is UniPC (bh2, data prediction, its own order per step) step for step.
    """

    def __init__(self, order: int = 1, corrector: bool = False):
        self.order = order
        self.corrector = corrector
        self.previous: tuple[torch.Tensor, float] | None = None
        #: the last transition, for the corrector: (centre used, mu_s, mu_{s-1} or None, h, h_prev or None, share)
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float, float | None, float] | None = None

    def __call__(
        self, mu: torch.Tensor, sigma: float, sigma_next: float | None, share: float | None = None
    ) -> torch.Tensor:
        """The centre of this step's draw; ``share`` (1 - c rho, the centre's weight in the step) is recorded for
        the corrector."""
        transition = sigma_next is not None and sigma_next < sigma
        if not transition or (self.order == 1 and not self.corrector):
            return mu
        h = math.log(sigma / sigma_next)
        previous, self.previous = self.previous, (mu, h)
        k = extrapolation_weight(h, previous[1] if previous is not None else None) if self.order == 2 else 0.0
        centre = mu if k == 0.0 else mu + (mu - previous[0].to(mu.dtype)) * k
        if self.corrector and share is not None:
            second = k != 0.0  # a second-order step had a previous transition (extrapolation_weight)
            self._pending = (centre, mu, previous[0] if second else None, h, previous[1] if second else None, share)
        return centre

    def correct(self, y: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """y at the level the last transition reached, corrected by UniC with ``mu`` = mu_t (the class docstring);
        unchanged without a corrector, at the first step and after a sweep within a level."""
        pending, self._pending = self._pending, None
        if pending is None:
            return y
        centre, mu_s, mu_prev, h, h_prev, share = pending
        w_prev, w_new = corrector_weights(h, h_prev)
        corrected = mu_s + w_new * (mu.to(mu_s.dtype) - mu_s)
        if mu_prev is not None:
            corrected = corrected + w_prev * (mu_prev.to(mu_s.dtype) - mu_s)
        return y + share * (corrected - centre).to(y.dtype)
