"""Research prototype: variants of the annealed MMGibbs chain on the digits DDPM (VE frame), scored with the
classifier FD against held-out digits. Not part of the package; measured steps land in the package when they win."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from diffusers import DDPMPipeline, DPMSolverMultistepScheduler, UniPCMultistepScheduler, DDIMScheduler  # noqa
from diffusers.utils.torch_utils import randn_tensor  # noqa
from digits import CLASSIFIER_DIR, DDPM_DIR, DigitsClassifier, classifier_features, load_digits_split  # noqa

from mmgibbs import MMGibbsScheduler  # noqa
from mmgibbs.calibration import calibrate_covariance  # noqa
from mmgibbs.metrics import frechet_distance  # noqa
from mmgibbs.moments import isotropic_variance  # noqa

torch.set_num_threads(1)
X_TRAIN, _, X_HELD, _ = load_digits_split()
CLF = DigitsClassifier.from_pretrained(CLASSIFIER_DIR).eval()
HELD_F = classifier_features(CLF, X_HELD)
PIPE = DDPMPipeline.from_pretrained(DDPM_DIR)
UNET = PIPE.unet.eval()
CONFIG = PIPE.scheduler.config


def fd(images):
    return frechet_distance(classifier_features(CLF, images.clamp(-1, 1)), HELD_F)


class Chain:
    """Levels, VE sigmas and a denoiser for n steps (leading spacing, as the benchmark)."""

    def __init__(self, steps, levels="dpm", clip=False, model=None, config=None, dtype=torch.float32):
        config = config or CONFIG
        model = model or UNET
        self.dtype = dtype
        if levels == "dpm":
            self.sched = MMGibbsScheduler.from_scheduler(DPMSolverMultistepScheduler.from_config(config), covariance="none")
        elif levels == "trailing":
            self.sched = MMGibbsScheduler.from_config(config, covariance="none", timestep_spacing="trailing")
        else:
            self.sched = MMGibbsScheduler.from_config(config, covariance="none")
        self.sched.set_timesteps(steps)
        self.sigmas = self.sched.ve_sigmas()
        self.clip = clip

        def predict(model_input, t):
            with torch.no_grad():
                return model(model_input, t).sample

        self.den = self.sched.denoiser(predict)

    def mu(self, y, i):
        m = self.den(y, i)
        return m.clamp(-1, 1) if self.clip else m


def start(n, seed, sigma0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x_t = randn_tensor((n, 1, 8, 8), generator=g, dtype=dtype)
    return x_t * math.sqrt(1 + sigma0**2), g  # VE frame: x_t / alpha


def run(chain, n, seed, cov="none", eta=0.0, mean="1", table=None, cov_levels=None, cov_scale=1.0, draw_clip=False,
        final="sample", deficit_table=None):
    s = chain.sigmas
    y, g = start(n, seed, s[0], chain.dtype)
    prev_d, prev_h = None, None
    L = len(s)
    for i in range(L):
        m = chain.mu(y, i)
        sig = s[i]
        nxt = s[i + 1] if i + 1 < L else 0.0
        d_eff = m
        if mean == "2M" and prev_d is not None and nxt > 0:
            h = math.log(sig / nxt)
            r = prev_h / h
            d_eff = (1 + 0.5 / r) * m - (0.5 / r) * prev_d
        if nxt > 0:
            prev_h = math.log(sig / nxt)
        prev_d = m
        use = cov != "none" and (cov_levels is None or i in cov_levels)
        x = d_eff
        if use:
            z_scale = cov_scale
            if cov in ("isotropic", "iso_deficit", "iso_shrunk", "iso_shrunk_deficit", "iso_shrunk_pos", "iso_shrunk_pos_deficit"):
                v = isotropic_variance(y, m, torch.full((n,), sig, dtype=y.dtype), 1.0)
                if cov.startswith("iso_shrunk"):
                    d = y[0].numel()
                    raw = sig**2 * (1 - ((y - m) / sig).flatten(1).pow(2).mean(-1))
                    if "pos" in cov:
                        raw = raw.clamp(0, sig**2)
                    v0 = sig**2 / (1 + sig**2)
                    w = 1 / (1 + 2 * sig**4 / (d * v0**2))
                    v = (w * raw + (1 - w) * v0).clamp(0, min(1.0, sig**2))
                if cov.endswith("deficit"):
                    v = v * deficit_table.factor(i, v, sig).clamp(min=0)
                x = d_eff + (z_scale * v.sqrt()).view(-1, 1, 1, 1) * randn_tensor(y.shape, generator=g, dtype=y.dtype)
            elif cov == "table_iso":
                lc = table.level(sig)
                v = (lc.factor.pow(2).sum((-1, -2)) + lc.diagonal.sum(-1)) / lc.diagonal.shape[-1]
                v = v[lc.assign(m)]
                x = d_eff + (z_scale * v.sqrt()).view(-1, 1, 1, 1) * randn_tensor(y.shape, generator=g, dtype=y.dtype)
            elif cov == "table_diag":
                lc = table.level(sig)
                dg = (lc.factor.pow(2).sum(-1) + lc.diagonal)[lc.assign(m)].view(y.shape)
                x = d_eff + z_scale * dg.sqrt() * randn_tensor(y.shape, generator=g, dtype=y.dtype)
            elif cov == "deficit":
                from deficit import scaled_table_draw
                x = d_eff + z_scale * scaled_table_draw(table.level(sig), m, deficit_table, i, sig, g)
            elif cov == "calibrated":
                lc = table.level(sig).covariance(m.double() if False else m)
                x = d_eff + z_scale * lc.sample(g, m)
            if draw_clip:
                x = x.clamp(-1, 1)
        if nxt == 0.0 or i == L - 1:
            y = x if final == "sample" else d_eff
            break
        ratio = nxt / sig
        c = math.sqrt(max(0.0, 1 - eta**2 * (1 - ratio**2)))
        r_noise = (y - x) / sig
        z = randn_tensor(y.shape, generator=g, dtype=y.dtype) if eta > 0 else 0.0
        y = x + nxt * (c * r_noise + math.sqrt(1 - c**2) * z)
    return y


def diffusers_run(name, steps, n, seed):
    cls = {"dpm": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler, "ddim": DDIMScheduler}[name]
    sch = cls.from_config(CONFIG)
    sch.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = randn_tensor((n, 1, 8, 8), generator=g) * sch.init_noise_sigma
    for t in sch.timesteps:
        with torch.no_grad():
            out = UNET(sch.scale_model_input(x, t), t).sample
        x = sch.step(out, t, x).prev_sample
    return x


def table_for(chain, samples, seed=5, **kw):
    return calibrate_covariance(chain.den, chain.sigmas, samples, generator=torch.Generator().manual_seed(seed),
                                batch_size=2000, **kw)


if __name__ == "__main__":
    n = 2000
    for steps in (10,):
        ch = Chain(steps)
        print("sigmas", [round(v, 4) for v in ch.sigmas])
        t0 = time.time()
        for seed in (0, 1, 2):
            a = fd(diffusers_run("dpm", steps, n, seed))
            b = fd(run(ch, n, seed, mean="2M"))
            print(seed, "dpm", round(a, 3), "mine-2M", round(b, 3), round(time.time() - t0, 1))
