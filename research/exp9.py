import sys
sys.path.insert(0, 'research')
from proto import *
from exp2 import rec
from deficit import DeficitTable

n = 2000
for steps in (10, 20):
    ch = Chain(steps)
    dt = DeficitTable(ch.sigmas, order=2)
    rec(f"{steps} 2M iso_shrunk eta0 final mean", lambda s: run(ch, n, s, cov="iso_shrunk", mean="2M", final="mean"))
    rec(f"{steps} 2M iso_shrunk_deficit eta0 final mean", lambda s: run(ch, n, s, cov="iso_shrunk_deficit", mean="2M", final="mean", deficit_table=dt))
    rec(f"{steps} 1 iso_shrunk eta0 final mean", lambda s: run(ch, n, s, cov="iso_shrunk", mean="1", final="mean"))
