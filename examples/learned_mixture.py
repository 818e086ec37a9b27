"""Section ``learned-mixture``: a learned DDPM of smooth data whose truth is known.

    python examples/benchmark.py --section learned-mixture --num-samples 4000 --seeds 0 1

The model: ``examples/checkpoints/mixture-ddpm``, an epsilon-prediction DDPM UNet of the digits DDPM's architecture
trained on fresh samples of the exact image-like mixture of ``image_mixture.py`` (``train_digits.py --data
mixture``; no clipping, since the mixture is not confined to [-1, 1]). The samplers see the network, with its real
errors; the metrics compare their samples with the exact mixture (``image_mixture.mixture_metrics``): excess
per-mode KL (KL minus the mean of the same number for exact samples of the same size), weight TV and pixel FD
against 20000 exact samples. Rows: ``learned_bench`` (the diffusers baselines at 10, 20, 50 calls, DDPM over all
1000 steps, and :data:`MMGIBBS_ROWS`; the calibrated tables from 16000 fresh exact samples).

The model's error per level: at the levels of the 10- and 20-step schedules (the model scheduler's layout, as the
MMGibbs rows without a layout setting use), with y = x + sigma * eps from the exact noisy marginal,

    err(sigma) = E ||mu_theta(y) - mu_exact(y)||^2 / d,    var(sigma) = E tr Cov[x | y] / d,

mu_exact and Cov[x | y] from the exact ``GaussianMixtureDenoiser``. A table calibrated on exact data holds their sum,
E ||x - mu_theta(y)||^2 / d = var + err (the cross term vanishes in expectation), shown as a check.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMPipeline
from digits import CHECKPOINTS
from image_mixture import NUM_CALIBRATION, NUM_REFERENCE, fit_digits_mixture, mixture_metrics, verdicts
from learned_bench import (
    BUDGETS,
    DEFAULT_MMGIBBS_ROWS,
    LIMIT_STEPS,
    LearnedBench,
    MMGibbsRow,
    Summary,
    mean_std_seeds,
    table_lines,
)

from mmgibbs import GaussianMixtureDenoiser, MMGibbsScheduler
from mmgibbs.families.unconditional import model_predict

MODEL_DIR: Path = CHECKPOINTS / "mixture-ddpm"
#: the section's MMGibbs rows: append research settings here (``learned_bench.MMGibbsRow``)
MMGIBBS_ROWS: list[MMGibbsRow] = list(DEFAULT_MMGIBBS_ROWS)
#: step counts whose levels the per-level error table covers
LEVEL_STEPS = (10, 20)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def level_errors(
    unet: torch.nn.Module,
    config: dict,
    truth: GaussianMixtureDenoiser,
    steps: Sequence[int] = LEVEL_STEPS,
    num_samples: int = 2000,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Per distinct level of the ``steps`` schedules (``MMGibbsScheduler.from_config(config)`` layout), from
    ``num_samples`` draws y = x + sigma eps of the exact noisy marginal: ``err`` = E||mu_theta - mu_exact||^2 / d,
    ``var`` = E tr Cov[x|y] / d, ``resid`` = E||x - mu_theta||^2 / d; rows sorted by decreasing sigma, each with
    the schedules it belongs to."""
    levels: dict[int, dict] = {}
    for n_steps in steps:
        scheduler = MMGibbsScheduler.from_config(config)
        scheduler.set_timesteps(n_steps)
        denoiser = scheduler.denoiser(model_predict(unet))
        for i, (t, sigma) in enumerate(zip(scheduler.timesteps.tolist(), scheduler.ve_sigmas(), strict=True)):
            if t in levels:
                levels[t]["steps"].append(n_steps)
                continue
            g = _gen(seed * 1000 + t)
            x = truth.sample(num_samples, g)
            y = x + sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)
            mu_theta = denoiser(y.float(), i).double()
            mu_exact = truth.posterior_mean(y, sigma)
            d = x[0].numel()
            cov_trace = truth.posterior_covariance(y, sigma).diagonal(dim1=-2, dim2=-1).sum(-1)
            levels[t] = {
                "t": t,
                "sigma": sigma,
                "err": float((mu_theta - mu_exact).pow(2).flatten(1).sum(1).mean()) / d,
                "var": float(cov_trace.mean()) / d,
                "resid": float((x - mu_theta).pow(2).flatten(1).sum(1).mean()) / d,
                "steps": [n_steps],
            }
    return sorted(levels.values(), key=lambda r: -r["sigma"])


def level_table(rows: list[dict[str, float]], num_samples: int) -> str:
    lines = [
        f"The model's error per level ({num_samples} draws of the exact noisy marginal per level; d = 64):\n",
        "| t | sigma (VE) | schedules | E‖mu_theta − mu_exact‖²/d | E tr Cov[x|y]/d | error / variance "
        "| E‖x − mu_theta‖²/d |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["err"] / r["var"] if r["var"] > 0 else math.inf
        lines.append(
            f"| {r['t']} | {r['sigma']:.4g} | {', '.join(map(str, r['steps']))} | {r['err']:.3e} | {r['var']:.3e} | "
            f"{ratio:.3f} | {r['resid']:.3e} |"
        )
    return "\n".join(lines)


def section_data(
    args: argparse.Namespace,
    mmgibbs_rows: Sequence[MMGibbsRow] | None = None,
    budgets: Sequence[int] = BUDGETS,
    limit_steps: int | None = LIMIT_STEPS,
    limit_seeds: int | None = 1,
    num_calibration: int = NUM_CALIBRATION,
    level_steps: Sequence[int] = LEVEL_STEPS,
    model_dir: Path = MODEL_DIR,
) -> dict[str, Any]:
    """Run (or read from the cache) every row; returns the section's results file (:func:`render`). ``args``:
    ``num_samples``, ``seeds``, ``out_dir``, ``force``, ``only``, ``quick`` (budgets up to 20, no limit row)."""
    start = time.perf_counter()
    n, seeds = args.num_samples, list(args.seeds)
    if getattr(args, "quick", False):
        budgets, limit_steps = [b for b in budgets if b <= 20], None
    truth = fit_digits_mixture()
    reference = truth.sample(NUM_REFERENCE, _gen(10**6))
    pipe = DDPMPipeline.from_pretrained(model_dir)
    unet, config = pipe.unet.eval(), dict(pipe.scheduler.config)
    bench = LearnedBench(
        "learned-mixture",
        unet,
        config,
        clean=lambda: truth.sample(num_calibration, _gen(12345)).float(),
        score=lambda x: mixture_metrics(truth, x, reference),
        num_samples=n,
        seeds=seeds,
        out_dir=args.out_dir,
        force=args.force,
        only=getattr(args, "only", None),
        clean_id=f"{num_calibration} exact samples, seed 12345",
    )
    floor = [bench.result("floor|exact", s, lambda s, m: (truth.sample(m, _gen(777 + s)), 0.0)) for s in seeds]
    summaries = bench.run_rows(
        list(MMGIBBS_ROWS if mmgibbs_rows is None else mmgibbs_rows), budgets, limit_steps, limit_seeds=limit_seeds
    )
    num_level = min(n, 2000)
    return {
        "section": "learned-mixture",
        "num_samples": n,
        "seeds": seeds,
        "budgets": list(budgets),
        "floor": floor,
        "rows": [s.as_dict() for s in summaries],
        "calibration_notes": bench.calibration_notes,
        "levels": level_errors(unet, config, truth, level_steps, num_level) if level_steps else [],
        "level_samples": num_level,
        "seconds": time.perf_counter() - start,
        "torch": torch.__version__,
    }


def render(data: dict[str, Any]) -> str:
    """The section's markdown, from its results file alone."""
    n, seeds, floor = data["num_samples"], data["seeds"], data["floor"]
    summaries = [Summary.from_dict(r) for r in data["rows"]]
    floor_kl = float(np.mean([f["kl"] for f in floor]))

    def excess(results: list[dict]) -> list[float]:
        return [r["kl"] - floor_kl if math.isfinite(r["kl"] + floor_kl) else math.inf for r in results]

    columns = [
        ("excess per-mode KL (nats)", lambda res: mean_std_seeds(excess(res), 2)),
        ("weight TV", lambda res: f"{np.mean([r['tv'] for r in res]):.3f}"),
        ("FD", lambda res: mean_std_seeds([r["fd"] for r in res], 3)),
    ]
    lines = [
        f"### Learned mixture DDPM (`checkpoints/mixture-ddpm`: the digits DDPM's UNet trained on fresh samples of "
        f"the exact image-like mixture; {n} samples per seed, seeds {seeds}, paired)\n",
        f"Floor (exact samples, {n} per seed): per-mode KL {mean_std_seeds([f['kl'] for f in floor], 2)} nats, weight "
        f"TV {np.mean([f['tv'] for f in floor]):.3f}, FD {np.mean([f['fd'] for f in floor]):.3f}. Excess KL = KL − "
        "mean floor; FD in pixels against 20000 exact samples; model calls per sample (a backward pass or JVP = 2)."
        + (
            ""
            if math.isfinite(floor_kl)
            else " The per-mode KL needs more than d + 1 = 65 samples in every mode (inf here): use 1500 or more."
        )
        + "\n",
        *table_lines(columns, summaries, seeds, first=[("exact samples (floor)", floor)]),
    ]
    if data["calibration_notes"]:
        lines += ["", "Calibration (fresh exact samples, generator seed 12345):", *data["calibration_notes"]]
    in_budget = [s.as_dict() for s in summaries if s.budget in data["budgets"]]
    lines += ["", *verdicts(in_budget, floor_kl, seeds), ""]
    if data["levels"]:
        lines.append(level_table(data["levels"], data["level_samples"]))
    lines.append(f"\n({data['seconds']:.0f} s with cached rows; torch {data['torch']})")
    return "\n".join(lines) + "\n"


def section(args: argparse.Namespace, *options: Any, **settings: Any) -> str:
    """:func:`render` of :func:`section_data` (same arguments)."""
    return render(section_data(args, *options, **settings))
