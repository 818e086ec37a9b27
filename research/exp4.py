import sys
sys.path.insert(0, 'research')
from proto import *
from exp2 import rec
from unipc import run_unipc

n = 2000
for steps in (10, 20):
    ch = Chain(steps)
    L = len(ch.sigmas)
    pooled = table_for(ch, X_TRAIN, num_clusters=1, rank=1)
    tab = table_for(ch, X_TRAIN)
    rec(f"{steps} unipc-mine none (=UniPC)", lambda s: run_unipc(ch, n, s))
    for sc in (1.0, 1.5):
        rec(f"{steps} unipc isotropic eta0 final mean scale{sc}", lambda s: run_unipc(ch, n, s, cov="isotropic", cov_scale=sc))
        rec(f"{steps} unipc table_iso[pooled] eta0 final mean scale{sc}", lambda s: run_unipc(ch, n, s, cov="table_iso", table=pooled, cov_scale=sc))
    rec(f"{steps} unipc isotropic eta0 final mean cov levels<{L//2}", lambda s: run_unipc(ch, n, s, cov="isotropic", cov_levels=set(range(L // 2))))
    rec(f"{steps} unipc calibrated eta0 final mean", lambda s: run_unipc(ch, n, s, cov="calibrated", table=tab))
