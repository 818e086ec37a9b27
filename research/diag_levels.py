"""Per level of the 10- and 20-step DPM layouts on the digits DDPM:
- E||x - mu(x + sigma eps)||^2 / d on train digits, held-out digits and own samples (the residual second moment = the
  expected posterior variance per pixel plus the model's error on that set);
- the per-sample isotropic estimate v on the data's noisy points: mean, fraction clamped at 0 and at the bound;
- per-pixel posterior bimodality under the empirical distribution of the 1797 digits (leave-one-out) against the
  exact mixture's posterior, both with the same bimodality coefficient BC = (skew^2 + 1) / kurt > 5/9.
"""
import sys, json
sys.path.insert(0, 'research')
from proto import *
import image_mixture as im

torch.manual_seed(0)
X_ALL = torch.cat([X_TRAIN, X_HELD])


def residual_moment(chain, x, i, g):
    sig = chain.sigmas[i]
    y = x + sig * torch.randn(x.shape, generator=g)
    m = chain.den(y, i)
    return float((x - m).pow(2).mean()), y, m


def weighted_bc(values, w):
    """Bimodality coefficient per pixel of discrete distributions: values (K, P), weights w (K,) summing to 1."""
    mean = (w[:, None] * values).sum(0)
    c = values - mean
    m2 = (w[:, None] * c**2).sum(0)
    m3 = (w[:, None] * c**3).sum(0)
    m4 = (w[:, None] * c**4).sum(0)
    ok = m2 > 1e-4
    skew = m3 / m2.clamp(min=1e-12) ** 1.5
    kurt = m4 / m2.clamp(min=1e-12) ** 2
    bc = (skew**2 + 1) / kurt.clamp(min=1e-12)
    return bc, ok, m2


def empirical_bimodality(sig, num=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = X_ALL.flatten(1).double()
    idx = torch.randperm(len(flat), generator=g)[:num]
    frac, var = [], []
    for j in idx:
        y = flat[j] + sig * torch.randn(flat.shape[1], generator=g, dtype=torch.float64)
        logw = -((flat - y) ** 2).sum(-1) / (2 * sig**2)
        logw[j] = -math.inf  # leave the digit itself out
        w = torch.softmax(logw, 0)
        bc, ok, m2 = weighted_bc(flat, w)
        frac.append(float(((bc > 5 / 9) & ok).double().mean()))
        var.append(float(m2.mean()))
    return float(np.mean(frac)), float(np.mean(var))


def mixture_bimodality(model, sig, num=200, draws=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = model.sample(num, g).flatten(1)
    y = x + sig * torch.randn(x.shape, generator=g, dtype=torch.float64)
    frac = []
    for j in range(num):
        post = model.posterior_sample(y[j : j + 1].repeat(draws, 1), sig, g)
        bc, ok, _ = weighted_bc(post, torch.full((draws,), 1.0 / draws, dtype=torch.float64))
        frac.append(float(((bc > 5 / 9) & ok).double().mean()))
    return float(np.mean(frac))


if __name__ == "__main__":
    own = torch.load("research/own_samples.pt") if Path("research/own_samples.pt").exists() else None
    mix = im.fit_digits_mixture()
    out = {}
    for steps in (10, 20):
        ch = Chain(steps)
        rows = []
        for i, sig in enumerate(ch.sigmas):
            g = torch.Generator().manual_seed(i)
            r_train, y, m = residual_moment(ch, X_TRAIN, i, g)
            r_held, _, _ = residual_moment(ch, X_HELD, i, g)
            r_own = residual_moment(ch, own, i, g)[0] if own is not None else float("nan")
            v = isotropic_variance(y, m, torch.full((len(y),), sig), 1.0)
            v_free = isotropic_variance(y, m, torch.full((len(y),), sig), None)
            bim, evar = empirical_bimodality(sig)
            mb = mixture_bimodality(mix, sig)
            row = dict(sigma=sig, res_train=r_train, res_held=r_held, res_own=r_own, iso_mean=float(v.mean()),
                       iso_zero=float((v == 0).double().mean()), iso_at_bound=float((v >= min(1.0, sig**2) - 1e-9).double().mean()),
                       iso_unbounded_mean=float(v_free.mean()), emp_post_var=evar, bimodal_emp=bim, bimodal_mix=mb)
            rows.append(row)
            print(steps, " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        out[steps] = rows
    Path("research/diag_levels.json").write_text(json.dumps(out, indent=1))
