"""The candidates on 8 seeds (2000 samples each): the seed-to-seed spread of FD is 0.1-0.2 and deterministic samplers
share a bad seed (seed 2), so 3 seeds cannot separate them."""
import sys
sys.path.insert(0, 'research')
from proto import *
from exp2 import rec
from deficit import DeficitTable

n = 2000
SEEDS = tuple(range(8))
for steps in (10, 20):
    ch = Chain(steps)
    L = len(ch.sigmas)
    tab = table_for(ch, X_TRAIN)
    dt = DeficitTable(ch.sigmas, order=2)
    rec(f"{steps} UniPC", lambda s: diffusers_run("unipc", steps, n, s), SEEDS)
    rec(f"{steps} DPM++2M", lambda s: diffusers_run("dpm", steps, n, s), SEEDS)
    rec(f"{steps} 2M isotropic eta0 final mean", lambda s: run(ch, n, s, cov="isotropic", mean="2M", final="mean"), SEEDS)
    rec(f"{steps} 2M deficit-calibrated eta0 final mean", lambda s: run(ch, n, s, cov="deficit", table=tab, mean="2M", final="mean", deficit_table=dt), SEEDS)
    rec(f"{steps} 2M iso_deficit eta0 final mean", lambda s: run(ch, n, s, cov="iso_deficit", mean="2M", final="mean", deficit_table=dt), SEEDS)
    rec(f"{steps} 2M isotropic eta0 final mean cov levels<{L//2}", lambda s: run(ch, n, s, cov="isotropic", mean="2M", final="mean", cov_levels=set(range(L // 2))), SEEDS)
