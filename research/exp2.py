import json, sys, time
sys.path.insert(0, 'research')
from proto import *

CACHE = Path('research/results.json')

def rec(key, fn, seeds=(0, 1, 2)):
    cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
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
if __name__ == '__main__':
  for steps in (10, 20):
      ch = Chain(steps)
      tab = table_for(ch, X_TRAIN)
      L = len(ch.sigmas)
      for sc in (0.5, 0.75, 1.25, 1.5):
          rec(f"{steps} 2M isotropic eta0 final mean scale{sc}", lambda s: run(ch, n, s, cov="isotropic", mean="2M", final="mean", cov_scale=sc))
      for sc in (0.5, 0.75):
          rec(f"{steps} 2M calibrated eta0 final mean scale{sc}", lambda s: run(ch, n, s, cov="calibrated", table=tab, mean="2M", final="mean", cov_scale=sc))
      for k in (L // 3, L // 2, 2 * L // 3):
          rec(f"{steps} 2M isotropic eta0 final mean cov levels<{k}", lambda s: run(ch, n, s, cov="isotropic", mean="2M", final="mean", cov_levels=set(range(k))))
          rec(f"{steps} 2M isotropic eta0 final mean cov levels>={k}", lambda s: run(ch, n, s, cov="isotropic", mean="2M", final="mean", cov_levels=set(range(k, L))))
      for eta in (0.25, 0.5):
          rec(f"{steps} 2M isotropic eta{eta} final mean", lambda s: run(ch, n, s, cov="isotropic", mean="2M", final="mean", eta=eta))
      ch.clip = True
      rec(f"{steps} 2M isotropic eta0 final mean clip", lambda s: run(ch, n, s, cov="isotropic", mean="2M", final="mean"))
      ch.clip = False
