import sys
sys.path.insert(0, 'research')
from proto import *
from exp2 import rec

n = 2000
for steps in (10, 20):
    ch = Chain(steps, levels="trailing")
    print(steps, [round(v, 3) for v in ch.sigmas])
    rec(f"{steps} [trailing] 2M none final mean", lambda s: run(ch, n, s, mean="2M", final="mean"))
    rec(f"{steps} [trailing] 2M isotropic eta0 final mean", lambda s: run(ch, n, s, cov="isotropic", mean="2M", final="mean"))
