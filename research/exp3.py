import json, sys, time
sys.path.insert(0, 'research')
from proto import *
from exp2 import rec  # noqa  (exp2 main guarded below)
n = 2000
for steps in (10, 20):
    ch = Chain(steps)
    tab = table_for(ch, X_TRAIN)
    pooled = table_for(ch, X_TRAIN, num_clusters=1, rank=1)
    d16 = table_for(ch, X_TRAIN, num_clusters=16, rank=1)
    for name, t in (("pooled", pooled), ("16cl", tab)):
        for sc in (1.0, 1.5):
            rec(f"{steps} 2M table_iso[{name}] eta0 final mean scale{sc}", lambda s: run(ch, n, s, cov="table_iso", table=t, mean="2M", final="mean", cov_scale=sc))
    rec(f"{steps} 2M table_diag[pooled] eta0 final mean", lambda s: run(ch, n, s, cov="table_diag", table=pooled, mean="2M", final="mean"))
    rec(f"{steps} 2M table_diag[16cl rank0] eta0 final mean", lambda s: run(ch, n, s, cov="table_diag", table=d16, mean="2M", final="mean"))
    rec(f"{steps} 2M calibrated eta0 final mean drawclip", lambda s: run(ch, n, s, cov="calibrated", table=tab, mean="2M", final="mean", draw_clip=True))
    rec(f"{steps} 2M isotropic eta0 final mean drawclip", lambda s: run(ch, n, s, cov="isotropic", mean="2M", final="mean", draw_clip=True))
