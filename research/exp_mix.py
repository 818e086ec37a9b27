"""The proto variants on the exact image-like mixture (4000 samples, seeds 0 1, as the benchmark)."""
import json, sys
sys.path.insert(0, 'research')
from proto import *
import image_mixture as im

MODEL = im.fit_digits_mixture()
REF = MODEL.sample(im.NUM_REFERENCE, torch.Generator().manual_seed(10**6))
CFG = im.scheduler_config()
CACHE = Path('research/results_mix.json')


def rec(key, fn, seeds=(0, 1)):
    cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    out = []
    for s in seeds:
        k = f"{key}|seed={s}"
        if k not in cache:
            m = im.mixture_metrics(MODEL, fn(s), REF)
            cache[k] = m
            CACHE.write_text(json.dumps(cache, indent=0))
        out.append(cache[k])
    kl = [o["kl"] for o in out]; f = [o["fd"] for o in out]
    print(f"{key:62s} KL {np.mean(kl):7.2f} ({' / '.join(f'{v:.2f}' for v in kl)})  FD {np.mean(f):.4f}", flush=True)


def floor():
    cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    if "floor" not in cache:
        cache["floor"] = np.mean([im.mixture_metrics(MODEL, MODEL.sample(4000, torch.Generator().manual_seed(100 + s)), REF)["kl"] for s in range(3)])
        CACHE.write_text(json.dumps(cache, indent=0))
    print("floor KL", cache["floor"])


def diffusers_mix(name, steps, n, seed):
    return im.run_diffusers(MODEL, name, steps, n, seed)[0]


if __name__ == "__main__":
    n = 4000
    floor()
    for steps in (10, 20):
        for name in ("DDIM", "DPM-Solver++ (2M)", "UniPC (bh2)"):
            rec(f"{steps} {name}", lambda s: diffusers_mix(name, steps, n, s))
        dd = Chain(steps, levels="ddpm", model=MODEL, config=CFG, dtype=torch.float64)
        ch = Chain(steps, levels="dpm", model=MODEL, config=CFG, dtype=torch.float64)
        cal = MODEL.sample(im.NUM_CALIBRATION, torch.Generator().manual_seed(7))
        tab_dd = table_for(dd, cal)
        tab = table_for(ch, cal)
        rec(f"{steps} [ddpm layout] 1 calibrated eta0 final sample", lambda s: run(dd, n, s, cov="calibrated", table=tab_dd, final="sample"))
        rec(f"{steps} 2M none (=DPM++)", lambda s: run(ch, n, s, mean="2M", final="mean"))
        for mean in ("1", "2M"):
            for final in ("sample", "mean"):
                rec(f"{steps} {mean} calibrated eta0 final {final}", lambda s: run(ch, n, s, cov="calibrated", table=tab, mean=mean, final=final))
        rec(f"{steps} 2M isotropic eta0 final mean", lambda s: run(ch, n, s, cov="isotropic", mean="2M", final="mean"))
        rec(f"{steps} 2M table_iso eta0 final mean", lambda s: run(ch, n, s, cov="table_iso", table=tab, mean="2M", final="mean"))
        rec(f"{steps} 2M table_diag eta0 final mean", lambda s: run(ch, n, s, cov="table_diag", table=tab, mean="2M", final="mean"))
