"""UniPC (bh2, order 2, predictor + corrector) in the VE frame with moment-matched draws, mirroring diffusers'
UniPCMultistepScheduler (predict_x0, lower_order_final): with no draws it must equal diffusers' UniPC."""
import math
import torch
from diffusers.utils.torch_utils import randn_tensor
from proto import start, isotropic_variance


def _coeffs(h, rks, order):
    """UniPC's b and R (bh2), for the data-prediction form: hh = -h."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial_i = 1
    B_h = math.expm1(hh)
    R, b = [], []
    for i in range(1, order + 1):
        R.append([rk ** (i - 1) for rk in rks])
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    return torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), B_h


def run_unipc(chain, n, seed, cov="none", table=None, cov_levels=None, cov_scale=1.0, final="mean", corrector=True):
    s = list(chain.sigmas) + [0.0]
    lam = [(-math.log(v) if v > 0 else math.inf) for v in s]
    y, g = start(n, seed, s[0], chain.dtype)
    L = len(chain.sigmas)
    ms, last_y, last_noise, last_order = [], None, None, None
    for i in range(L):
        m = chain.mu(y, i)
        if corrector and i > 0 and last_y is not None:
            # UniC on the step (i-1) -> i with the new model output m
            order = last_order
            h = lam[i] - lam[i - 1]
            m0 = ms[-1]
            rks, D1s = [], []
            for k in range(1, order):
                rk = (lam[i - 1 - k] - lam[i - 1]) / h
                rks.append(rk)
                D1s.append((ms[-(k + 1)] - m0) / rk)
            rks.append(1.0)
            R, b, B_h = _coeffs(h, rks, order)
            rhos = torch.tensor([0.5], dtype=torch.float64) if order == 1 else torch.linalg.solve(R, b)
            corr = sum(float(rhos[k]) * D1s[k] for k in range(len(D1s))) if D1s else 0.0
            rho = s[i] / s[i - 1]
            d_c = m0 + (-B_h / (1 - rho)) * (corr + float(rhos[-1]) * (m - m0)) if False else None
            # x_t = rho * x + (1 - rho) * m0 - B_h * (...); B_h = expm1(-h) = rho - 1
            y = rho * last_y + (1 - rho) * (m0 + last_noise) - B_h * (corr + float(rhos[-1]) * (m - m0))
        ms.append(m)
        order = min(2, L - i, len(ms))
        last_order, last_y = order, y
        sig, nxt = s[i], s[i + 1]
        h = lam[i + 1] - lam[i] if nxt > 0 else math.inf
        pred = m
        if order == 2 and nxt > 0:
            rk = (lam[i - 1] - lam[i]) / h
            pred = m + 0.5 * (ms[-2] - m) / rk
        use = cov != "none" and (cov_levels is None or i in cov_levels)
        noise = torch.zeros_like(m)
        if use:
            if cov == "isotropic":
                v = isotropic_variance(y, m, torch.full((n,), sig, dtype=y.dtype), 1.0)
                noise = (cov_scale * v.sqrt()).view(-1, 1, 1, 1) * randn_tensor(y.shape, generator=g, dtype=y.dtype)
            elif cov == "table_iso":
                lc = table.level(sig)
                v = ((lc.factor.pow(2).sum((-1, -2)) + lc.diagonal.sum(-1)) / lc.diagonal.shape[-1])[lc.assign(m)]
                noise = (cov_scale * v.sqrt()).view(-1, 1, 1, 1) * randn_tensor(y.shape, generator=g, dtype=y.dtype)
            elif cov == "calibrated":
                noise = cov_scale * table.level(sig).covariance(m).sample(g, m)
        last_noise = noise
        if nxt == 0.0:
            return pred if final == "mean" else pred + noise
        rho = nxt / sig
        y = rho * y + (1 - rho) * (pred + noise)
    return y
