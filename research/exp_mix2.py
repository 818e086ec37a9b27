import sys
sys.path.insert(0, 'research')
from exp_mix import *
from deficit import DeficitTable

n = 4000
for steps in (10, 20):
    ch = Chain(steps, levels="dpm", model=MODEL, config=CFG, dtype=torch.float64)
    cal = MODEL.sample(im.NUM_CALIBRATION, torch.Generator().manual_seed(7))
    tab = table_for(ch, cal)
    dt = DeficitTable(ch.sigmas, order=2)
    for final in ("sample", "mean"):
        rec(f"{steps} 2M deficit-calibrated eta0 final {final}", lambda s: run(ch, n, s, cov="deficit", table=tab, mean="2M", final=final, deficit_table=dt))
    dt1 = DeficitTable(ch.sigmas, order=1)
    rec(f"{steps} 1 deficit-calibrated(order1: f=1 check) eta0 final sample", lambda s: run(ch, n, s, cov="deficit", table=tab, mean="1", final="sample", deficit_table=dt1))
