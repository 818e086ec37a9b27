"""Issue 16.4: how often the per-sample isotropic variance is 0 (a mean-only step) or at the bound, per level, before
(v = sigma^2 (1 - ||eps_hat||^2/d) clamped to [0, min(sigma^2, 1)]) and after the shrinkage of
mmgibbs.moments.isotropic_variance, on the digits DDPM (d = 64, noisy held-out digits) and the exact image mixture
(d = 64, exact samples), 10-step DPM-Solver layout; and the mean estimate against the measured E||x - mu||^2 / d."""
import sys
sys.path.insert(0, "research")
from proto import *  # noqa
import image_mixture as im
from mmgibbs.moments import isotropic_variance


def rows(chain, x, name):
    g = torch.Generator().manual_seed(0)
    print(f"\n{name}: level sigma | resid E||x-mu||^2/d | before: mean v, at 0, at bound | after: mean v, at 0, at bound")
    for i, sig in enumerate(chain.sigmas):
        sig = float(sig)
        y = x + sig * torch.randn(x.shape, generator=g, dtype=x.dtype)
        with torch.no_grad():
            mu = chain.den(y, i)
        resid = float((x - mu).pow(2).mean())
        eps_sq = ((y - mu) / sig).flatten(1).pow(2).mean(-1)
        bound = min(sig**2, 1.0)
        old = (sig**2 * (1 - eps_sq)).clamp(0, bound)
        new = isotropic_variance(y, mu, torch.tensor(sig, dtype=y.dtype), variance_bound=1.0)
        f = lambda v: f"{float(v.mean()):.4f}, {float((v <= 0).double().mean()):.0%}, {float((v >= bound * (1 - 1e-6)).double().mean()):.0%}"
        print(f"{sig:7.3f} | {resid:.4f} | {f(old)} | {f(new)}")


rows(Chain(10, levels="dpm"), X_HELD, "digits DDPM, 397 held-out digits")
mix = im.fit_digits_mixture()
x = mix.sample(2000, torch.Generator().manual_seed(1)).float()
rows(Chain(10, levels="dpm", model=mix, config=im.scheduler_config(), dtype=torch.float64), x.double(), "exact image mixture, 2000 exact samples")
