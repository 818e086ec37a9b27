import sys
sys.path.insert(0, 'research')
from exp_mix import *
from deficit import DeficitTable

n = 4000
for steps in (10, 20):
    dd = Chain(steps, levels="ddpm", model=MODEL, config=CFG, dtype=torch.float64)
    cal = MODEL.sample(im.NUM_CALIBRATION, torch.Generator().manual_seed(7))
    tab = table_for(dd, cal)
    dt = DeficitTable(dd.sigmas, order=2)
    for final in ("sample", "mean"):
        rec(f"{steps} [ddpm layout] 2M deficit-calibrated eta0 final {final}", lambda s: run(dd, n, s, cov="deficit", table=tab, mean="2M", final=final, deficit_table=dt))
    rec(f"{steps} [ddpm layout] 1 calibrated eta0 final mean", lambda s: run(dd, n, s, cov="calibrated", table=tab, mean="1", final="mean"))
