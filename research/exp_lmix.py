"""The candidates on the learned mixture (digits UNet trained on fresh draws of the exact image mixture)."""
import sys
sys.path.insert(0, 'research')
from exp_mix import *
from deficit import DeficitTable
from diffusers import DDPMPipeline

LM = DDPMPipeline.from_pretrained("/work/wt-realdata/examples/checkpoints/mixture-ddpm")
LUNET = LM.unet.eval()
LCFG = LM.scheduler.config
CACHE2 = Path('research/results_lmix.json')


def rec2(key, fn, seeds=(0, 1)):
    cache = json.loads(CACHE2.read_text()) if CACHE2.exists() else {}
    out = []
    for s in seeds:
        k = f"{key}|seed={s}"
        if k not in cache:
            cache[k] = im.mixture_metrics(MODEL, fn(s).double(), REF)
            CACHE2.write_text(json.dumps(cache, indent=0))
        out.append(cache[k])
    kl = [o["kl"] for o in out]; f = [o["fd"] for o in out]
    print(f"{key:62s} KL {np.mean(kl):7.2f} ({' / '.join(f'{v:.2f}' for v in kl)})  FD {np.mean(f):.4f}", flush=True)


def diffusers_l(name, steps, n, seed):
    cls = {"dpm": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler, "ddim": DDIMScheduler}[name]
    sch = cls.from_config(LCFG)
    sch.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = randn_tensor((n, 1, 8, 8), generator=g)
    for t in sch.timesteps:
        with torch.no_grad():
            x = sch.step(LUNET(x, t).sample, t, x).prev_sample
    return x


n = 4000
for steps in (10, 20):
    for name in ("ddim", "dpm", "unipc"):
        rec2(f"{steps} {name}", lambda s: diffusers_l(name, steps, n, s))
    dd = Chain(steps, levels="ddpm", model=LUNET, config=LCFG)
    ch = Chain(steps, levels="dpm", model=LUNET, config=LCFG)
    cal = MODEL.sample(4000, torch.Generator().manual_seed(7)).float()
    tab_dd, tab = table_for(dd, cal), table_for(ch, cal)
    dt = DeficitTable(ch.sigmas, order=2)
    rec2(f"{steps} [ddpm layout] 1 calibrated eta0 final sample", lambda s: run(dd, n, s, cov="calibrated", table=tab_dd, final="sample"))
    rec2(f"{steps} 1 calibrated eta0 final sample", lambda s: run(ch, n, s, cov="calibrated", table=tab, final="sample"))
    for final in ("sample", "mean"):
        rec2(f"{steps} 2M deficit-calibrated eta0 final {final}", lambda s: run(ch, n, s, cov="deficit", table=tab, mean="2M", final=final, deficit_table=dt))
    rec2(f"{steps} 2M isotropic eta0 final mean", lambda s: run(ch, n, s, cov="isotropic", mean="2M", final="mean"))
    rec2(f"{steps} 2M iso_deficit eta0 final sample", lambda s: run(ch, n, s, cov="iso_deficit", mean="2M", final="sample", deficit_table=dt))
