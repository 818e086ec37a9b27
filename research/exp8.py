import sys
sys.path.insert(0, 'research')
from proto import *
from exp2 import rec
from deficit import DeficitTable

n = 2000
for steps in (10, 20):
    ch = Chain(steps)
    dt = DeficitTable(ch.sigmas, order=2)
    rec(f"{steps} 2M iso_deficit eta0 final mean", lambda s: run(ch, n, s, cov="iso_deficit", mean="2M", final="mean", deficit_table=dt))
    if steps == 20:
        tab = table_for(ch, X_TRAIN)
        for final in ("mean",):
            rec(f"{steps} 2M deficit-calibrated eta0 final {final}", lambda s: run(ch, n, s, cov="deficit", table=tab, mean="2M", final=final, deficit_table=dt))
