import sys
sys.path.insert(0, 'research')
from proto import *
from exp2 import rec
from deficit import DeficitTable

n = 2000
for steps in (10, 20):
    ch = Chain(steps)
    tab = table_for(ch, X_TRAIN)
    dt = DeficitTable(ch.sigmas, order=2)
    for final in ("mean", "sample"):
        rec(f"{steps} 2M deficit-calibrated eta0 final {final}", lambda s: run(ch, n, s, cov="deficit", table=tab, mean="2M", final=final, deficit_table=dt))
