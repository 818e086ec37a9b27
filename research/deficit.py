"""Variance-deficit covariance for the second-order mean: per direction of prior variance lam (a Gaussian model),
the noise s_i that makes Var(y_{i+1}) = lam + sigma_{i+1}^2 exactly after the 2M step, as a factor f_i(lam) of the
posterior variance Sigma_i = lam sigma_i^2 / (lam + sigma_i^2). f = 1 for the first-order chain (its Sigma is exact).
"""
import math

import numpy as np
import torch


def deficit_factors(sigmas, lams, order=2):
    """f[i, j] for step i and prior variance lams[j] (eta 0; the last step's draw keeps f = 1)."""
    lams = np.asarray(lams, dtype=np.float64)
    n = len(sigmas)
    f = np.ones((n, len(lams)))
    v_y = lams + sigmas[0] ** 2  # Var(y_i)
    c_ym = np.zeros_like(lams)  # Cov(y_i, mu_{i-1})
    v_m = np.zeros_like(lams)  # Var(mu_{i-1})
    h_prev = None
    for i in range(n - 1):
        s, s1 = sigmas[i], sigmas[i + 1]
        rho, h = s1 / s, math.log(s / s1)
        k = 0.0 if (order == 1 or h_prev is None) else h / (2 * h_prev)
        a = lams / (lams + s**2)
        post = lams * s**2 / (lams + s**2)
        alpha, beta = rho + (1 - rho) * (1 + k) * a, -(1 - rho) * k
        var_det = alpha**2 * v_y + 2 * alpha * beta * c_ym + beta**2 * v_m
        need = np.maximum(lams + s1**2 - var_det, 0.0) / (1 - rho) ** 2
        f[i] = need / np.maximum(post, 1e-300)
        c_ym, v_m = a * (alpha * v_y + beta * c_ym), a**2 * v_y
        v_y = var_det + (1 - rho) ** 2 * need
        h_prev = h
    a = lams / (lams + sigmas[-1] ** 2)
    post = lams * sigmas[-1] ** 2 / (lams + sigmas[-1] ** 2)
    f[n - 1] = np.maximum(lams - a**2 * v_y, 0.0) / np.maximum(post, 1e-300)  # the final draw x = mu + xi
    return f


class DeficitTable:
    """f_i(lam) on a log grid of lam, interpolated in log lam, for one schedule."""

    def __init__(self, sigmas, order=2, grid=np.logspace(-6, 3, 400)):
        self.sigmas = list(sigmas)
        self.grid = grid
        self.f = deficit_factors(self.sigmas, grid, order)

    def factor(self, i, post_var, sigma):
        """f for posterior variances ``post_var`` (tensor) at step i: lam = Sigma sigma^2 / (sigma^2 - Sigma)."""
        pv = post_var.clamp(min=1e-12, max=sigma**2 * (1 - 1e-9))
        lam = pv * sigma**2 / (sigma**2 - pv)
        x = np.log(self.grid)
        out = np.interp(np.log(lam.double().cpu().numpy()), x, self.f[i])
        return torch.as_tensor(out, dtype=post_var.dtype, device=post_var.device)


def scaled_table_draw(level, mu, dt, i, sigma, generator):
    """A draw from the cluster covariance with every direction scaled by its deficit factor: the factor's columns
    (orthogonal, variance ||F_j||^2) and the diagonal's entries (variance D_p) as independent directions."""
    from mmgibbs.moments import LowRankCovariance

    cov = level.covariance(mu)
    col_var = cov.factor.pow(2).sum(-2)  # (N, r)
    fc = dt.factor(i, col_var, sigma)
    fd = dt.factor(i, cov.diagonal, sigma)
    scaled = LowRankCovariance(cov.factor * fc.clamp(min=0).sqrt().unsqueeze(-2), cov.diagonal * fd.clamp(min=0))
    return scaled.sample(generator, mu)


if __name__ == "__main__":
    s = [60.8, 27.9, 13.9, 7.47, 4.31, 2.64, 1.67, 1.06, 0.64, 0.31]
    for lam in (1e-3, 1e-2, 0.1, 1.0, 4.0):
        print(lam, np.round(deficit_factors(s, [lam], 2)[:, 0], 3), np.round(deficit_factors(s, [lam], 1)[:, 0], 3))
