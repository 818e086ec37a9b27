import json, sys, time
sys.path.insert(0, 'research')
from proto import *

CACHE = Path('research/results.json')
cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}

def rec(key, fn, seeds=(0, 1, 2)):
    vals = []
    for s in seeds:
        k = f"{key}|seed={s}"
        if k not in cache:
            cache[k] = fd(fn(s))
            CACHE.write_text(json.dumps(cache, indent=0))
        vals.append(cache[k])
    print(f"{key:70s} {np.mean(vals):.3f}  " + " / ".join(f"{v:.3f}" for v in vals), flush=True)
    return vals

n = 2000
for steps in (10, 20):
    ch = Chain(steps)
    tab = table_for(ch, X_TRAIN)
    rec(f"{steps} UniPC", lambda s: diffusers_run("unipc", steps, n, s))
    rec(f"{steps} DPM++2M", lambda s: diffusers_run("dpm", steps, n, s))
    rec(f"{steps} mine DDIM@dpm final mean", lambda s: run(ch, n, s, mean="1", final="mean"))
    for mean in ("1", "2M"):
        for cov, t in (("isotropic", None), ("calibrated", tab)):
            for final in ("mean", "sample"):
                rec(f"{steps} {mean} {cov} eta0 final {final}", lambda s: run(ch, n, s, cov=cov, mean=mean, table=t, final=final))
