"""Section ``energy`` of ``benchmark.py``: one noise level (sigma 0.5, the paper's setting), the score model against
the energy model (issue 17).

    python examples/benchmark.py --section energy --num-samples 256 --seeds 0 1 --threads 1 --out-dir bench

Models: the shipped DSM score UNet (``checkpoints/digits-dsm-sigma0.5``, predicts eps) and the energy-parametrised
one (``checkpoints/digits-energy-sigma0.5``: the same UNet f inside E(y) = 0.5 ||y - f(y)||^2 / sigma^2, trained with
the same data, split, steps, time budget and seeds; eps_hat = sigma grad E). For each model, at equal model
evaluations (:data:`BUDGETS`; a Jacobian product, a backward pass or a Hessian-vector product, counts as 2, the
benchmark's convention, next to the measured cost):

* Langevin on p~ from y ~ N(0, (1 + sigma^2) I) with step ``step * sigma^2``, its samples y after B steps, and
  Langevin + Tweedie jump, x = mu(y) after B - 1 steps; ``step`` tuned over :data:`LANGEVIN_STEPS` on the first
  seed's FD per budget (one chain per step and seed gives every budget: the first B steps of a chain are the chain of
  B steps);
* MMGibbs single-level chains (``MomentMatchingGibbsPipeline``, the model's own pipeline) per covariance, with as many
  sweeps as the budget buys (:data:`COVARIANCE_ROWS`); ``full`` (64 products per sweep) over :data:`FULL_SWEEPS`
  sweeps on the first seed, past every budget.

Paired seeds: for a seed every chain of both models starts from the same noise. Metrics: the benchmark's FD of the
shipped classifier's features against the 397 held-out digits and class KL; the floor is as many train digits.

Beside the table: the Jacobian's asymmetry ||J - J^T||_F / ||J||_F per sample (score model, the energy model as the
control, and the digits DDPM at three levels) at noisy held-out digits, the share of eigenvalues of sigma^2 sym(J)
below 0 (what ``full`` clamps) and above sigma^2, the moments' own quality without any chain (the Gaussian
posterior's NLL of the clean held-out digit x given y = x + sigma eps, isotropic, diagonal and full: does a symmetric
Hessian give a better covariance?), and the wall time of every kind of evaluation in score-model forwards at the
section's batch size (Hessian-vector products by double backward and by forward-over-reverse).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMPipeline
from digits import (
    CLASSIFIER_DIR,
    DDPM_DIR,
    DigitsClassifier,
    classifier_features,
    classifier_predict,
    dsm_dir,
    energy_dir,
    load_digits_split,
)

from mmgibbs import MomentMatchingGibbsPipeline, denoising_moments
from mmgibbs.baselines import langevin, tweedie_score
from mmgibbs.metrics import frechet_distance, kl_from_uniform
from mmgibbs.moments import _forward_mode_safe, _linearise, full_covariance, isotropic_variance, jacobian_matrix

SIGMA = 0.5
BUDGETS = (10, 20, 50)
LANGEVIN_STEPS = (0.2, 0.5, 1.0)
#: (label, pipeline settings, model evaluations per sweep)
COVARIANCE_ROWS: tuple[tuple[str, dict[str, Any], int], ...] = (
    ("none", {"covariance": "none"}, 1),
    ("isotropic", {"covariance": "isotropic"}, 1),
    ("diagonal (1 probe)", {"covariance": "diagonal", "jacobian": "reverse"}, 3),
    ("projection (fin. diff.)", {"covariance": "projection", "jacobian": "finite_difference"}, 2),
)
FULL_SWEEPS = 2
#: the digits DDPM's levels at which its Jacobian's asymmetry is measured too
DDPM_LEVELS = (100, 300, 600)
MODELS = {"score": dsm_dir, "energy": energy_dir}
#: the ridge added to every covariance in the posterior NLL (a pixel-variance floor: clamped directions have 0)
NLL_RIDGE = 1e-3


class Scorer:
    """The benchmark's FD and class KL against the held-out digits."""

    def __init__(self) -> None:
        self.x_train, _, self.x_heldout, _ = load_digits_split()
        self.classifier = DigitsClassifier.from_pretrained(CLASSIFIER_DIR).eval()
        self.heldout = classifier_features(self.classifier, self.x_heldout)

    def __call__(self, images: torch.Tensor) -> dict[str, float]:
        images = images.clamp(-1, 1)
        return {
            "fd": frechet_distance(classifier_features(self.classifier, images), self.heldout),
            "kl": kl_from_uniform(classifier_predict(self.classifier, images), 10),
        }


def load(name: str) -> tuple[MomentMatchingGibbsPipeline, Callable[[torch.Tensor], torch.Tensor]]:
    """The model's pipeline and its denoiser y -> mu(y) at sigma 0.5."""
    pipe = MomentMatchingGibbsPipeline.from_pretrained(MODELS[name](SIGMA))
    pipe.set_progress_bar_config(disable=True)
    schedule = pipe.scheduler.noise_schedule
    t = schedule.timestep_for_sigma(SIGMA)
    return pipe, schedule.denoiser(pipe.unet, t)  # an energy model's: y - sigma^2 grad E~(y)


class Cache:
    """Results per key in ``out_dir/energy.json`` (``force``: recompute)."""

    def __init__(self, out_dir: Path, force: bool) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path, self.force = out_dir / "energy.json", force
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, key: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if key not in self.data or self.force:
            start = time.perf_counter()
            self.data[key] = {**run(), "seconds": time.perf_counter() - start}
            self.path.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        return self.data[key]


def langevin_results(
    denoiser: Callable, scorer: Scorer, n: int, seed: int, step: float, budgets: Sequence[int]
) -> dict[str, dict[str, float]]:
    """One Langevin chain of max(budgets) steps: per budget B the FD of y_B ("langevin") and of mu(y_{B-1})
    ("jump"), as ``baselines.langevin`` would give them run B or B - 1 steps from the same start."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn((n, 1, 8, 8), generator=g) * math.sqrt(1 + SIGMA**2)
    score = tweedie_score(denoiser, SIGMA)
    out: dict[str, dict[str, float]] = {}
    for k in range(1, max(budgets) + 1):
        if k in budgets:  # the jump spends the B-th evaluation on x = mu(y_{B-1})
            with torch.no_grad():
                out[f"jump|{k}"] = scorer(denoiser(y))
        y = langevin(score, y, step * SIGMA**2, 1, g)
        if k in budgets:
            out[f"langevin|{k}"] = scorer(y)
    return out


def mmgibbs_result(
    pipe: MomentMatchingGibbsPipeline, scorer: Scorer, n: int, seed: int, sweeps: int, settings: dict[str, Any]
) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    out = pipe(batch_size=n, num_inference_steps=sweeps, generator=g, output_type="latent", **settings)
    return {**scorer(out.images), "forwards": out.num_forward, "backward": out.num_backward}


def gaussian_nll(x: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor) -> float:
    """Mean -log N(x; mu, cov + ridge I) per dimension (nats), cov (N, d, d); ridge :data:`NLL_RIDGE`."""
    r = (x - mu).flatten(1).double()
    d = r.shape[-1]
    chol = torch.linalg.cholesky(cov.double() + NLL_RIDGE * torch.eye(d, dtype=torch.float64))
    maha = (r * torch.cholesky_solve(r[..., None], chol)[..., 0]).sum(-1)
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return float(0.5 * ((maha + logdet) / d + math.log(2 * math.pi)).mean())


def jacobians(denoiser: Callable, y: torch.Tensor, sigma: float, x: torch.Tensor) -> dict[str, Any]:
    """J per sample (reverse products) at noisy points ``y`` of clean ``x``: its asymmetry, the spectrum of
    sigma^2 sym(J), and the Gaussian posterior's NLL of x given y for the isotropic, diagonal and full covariances
    (no variance bound; full symmetrised and clamped at 0, as ``covariance="full"`` draws)."""
    sigmas = torch.full((len(y),), sigma)
    lin = _linearise(denoiser, y, "reverse", sigmas)
    jac = jacobian_matrix(lin.product, y, lin.transpose).double()
    mu = lin.mean()
    asym = ((jac - jac.mT).flatten(1).norm(dim=-1) / jac.flatten(1).norm(dim=-1)).numpy()
    evals = torch.linalg.eigvalsh(0.5 * (jac + jac.mT)) * sigma**2
    iso = isotropic_variance(y, mu, sigmas).double()
    eye = torch.eye(jac.shape[-1], dtype=torch.float64)
    diag = torch.diagonal(jac, dim1=-2, dim2=-1).clamp(min=0) * sigma**2
    return {
        "asymmetry": {
            "mean": float(asym.mean()),
            "median": float(np.median(asym)),
            "p10": float(np.quantile(asym, 0.1)),
            "p90": float(np.quantile(asym, 0.9)),
            "min": float(asym.min()),
            "max": float(asym.max()),
        },
        "negative_share": float((evals < 0).double().mean()),
        "above_sigma2_share": float((evals > sigma**2).double().mean()),
        "trace_over_d": float(torch.diagonal(jac, dim1=-2, dim2=-1).mean() * sigma**2),
        "nll": {
            "isotropic": gaussian_nll(x, mu, iso[:, None, None] * eye),
            "diagonal": gaussian_nll(x, mu, torch.diag_embed(diag)),
            "full": gaussian_nll(x, mu, full_covariance(jac, sigmas.double(), None)),
        },
    }


def jacobian_figures(scorer: Scorer, num_points: int) -> dict[str, Any]:
    """:func:`jacobians` at ``num_points`` noisy held-out digits (seeded): both single-level models at sigma 0.5 and
    the digits DDPM at :data:`DDPM_LEVELS`."""
    g = torch.Generator().manual_seed(0)
    x = scorer.x_heldout[:num_points]
    eps = torch.randn(x.shape, generator=g)
    figures = {name: jacobians(load(name)[1], x + SIGMA * eps, SIGMA, x) for name in MODELS}
    ddpm = DDPMPipeline.from_pretrained(DDPM_DIR)
    from mmgibbs import MMGibbsScheduler

    schedule = MMGibbsScheduler.from_config(ddpm.scheduler.config).noise_schedule
    for t in DDPM_LEVELS:
        sigma = float(schedule.sigma(torch.tensor(t)))
        figures[f"ddpm t={t}"] = {
            "sigma": sigma,
            **jacobians(schedule.denoiser(ddpm.unet, torch.tensor(t)), x + sigma * eps, sigma, x),
        }
    return figures


def costs(n: int) -> dict[str, float]:
    """Wall time of each kind of evaluation at batch ``n`` (best of 3), in score-model forwards."""

    def clock(fn: Callable[[], Any]) -> float:
        fn()
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    y = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    (_, score), (energy_pipe, energy) = load("score"), load("energy")
    fwd = clock(lambda: denoising_moments(score, y, SIGMA, "none"))
    vjp = clock(lambda: denoising_moments(score, y, SIGMA, "diagonal", jacobian="reverse")) - fwd
    evaluation = clock(lambda: denoising_moments(energy, y, SIGMA, "none"))
    kept = clock(lambda: denoising_moments(energy, y, SIGMA, "diagonal", jacobian="reverse"))
    model, t = energy_pipe.unet, torch.full((n,), SIGMA)

    def forward_over_reverse() -> None:
        v = torch.ones_like(y)
        with _forward_mode_safe():
            torch.func.jvp(torch.func.grad(lambda x: model(x, t).energy.sum()), (y,), (v,))

    return {
        "batch": n,
        "score_forward_s": fwd,
        "score_vjp": vjp / fwd,
        "energy_evaluation": evaluation / fwd,
        "energy_evaluation_kept_graph_plus_hvp": kept / fwd,
        "energy_hvp": (kept - evaluation) / fwd,
        "energy_forward_over_reverse_score_and_hvp": clock(forward_over_reverse) / fwd,
    }


def _summary(name: str, model: str, steps: int, evals: float, results: list[dict[str, float]], **extra: Any) -> dict:
    return {
        "name": name,
        "model": model,
        "steps": steps,
        "equiv": evals,
        "fd": [r["fd"] for r in results],
        "kl": [r["kl"] for r in results],
        "seconds": float(np.mean([r.get("seconds", 0.0) for r in results])),
        **extra,
    }


def model_rows(
    model: str,
    scorer: Scorer,
    cache: Cache,
    n: int,
    seeds: Sequence[int],
    budgets: Sequence[int],
    langevin_steps: Sequence[float],
    full_sweeps: int,
) -> list[dict[str, Any]]:
    """One model's rows: Langevin and Langevin + jump (tuned step) and the MMGibbs covariances per budget, then
    ``full``."""
    pipe, denoiser = load(model)
    rows: list[dict[str, Any]] = []
    chains = {
        (step, seed): cache.get(
            f"{model}|langevin|step={step}|budgets={list(budgets)}|seed={seed}|n={n}",
            lambda step=step, seed=seed: langevin_results(denoiser, scorer, n, seed, step, budgets),
        )
        for step in langevin_steps
        for seed in seeds
    }
    for budget in budgets:
        for kind, label in (("langevin", "Langevin (y samples)"), ("jump", "Langevin + Tweedie jump")):
            best = min(langevin_steps, key=lambda s, k=f"{kind}|{budget}": chains[(s, seeds[0])][k]["fd"])
            results = [chains[(best, s)][f"{kind}|{budget}"] for s in seeds]
            rows.append(_summary(label, model, budget, budget, results, step=best))
        for label, settings, per_sweep in COVARIANCE_ROWS:
            sweeps = budget // per_sweep
            results = [
                cache.get(
                    f"{model}|mmgibbs|{json.dumps(settings, sort_keys=True)}|sweeps={sweeps}|seed={s}|n={n}",
                    lambda s=s, sw=sweeps, st=settings: mmgibbs_result(pipe, scorer, n, s, sw, st),
                )
                for s in seeds
            ]
            evals = results[0]["forwards"] + 2 * results[0]["backward"]
            rows.append(_summary(f"MMGibbs {label}", model, sweeps, evals, results))
    full_settings = {"covariance": "full", "jacobian": "reverse"}
    full = cache.get(
        f"{model}|mmgibbs|{json.dumps(full_settings, sort_keys=True)}|sweeps={full_sweeps}|seed={seeds[0]}|n={n}",
        lambda: mmgibbs_result(pipe, scorer, n, seeds[0], full_sweeps, full_settings),
    )
    rows.append(_summary("MMGibbs full", model, full_sweeps, full["forwards"] + 2 * full["backward"], [full]))
    return rows


def section_data(
    args: argparse.Namespace,
    budgets: Sequence[int] = BUDGETS,
    langevin_steps: Sequence[float] = LANGEVIN_STEPS,
    full_sweeps: int = FULL_SWEEPS,
    jacobian_points: int = 397,
) -> dict[str, Any]:
    """Run (or read from the cache) every row; returns the section's results file (:func:`render`)."""
    start = time.perf_counter()
    n, seeds = args.num_samples, list(args.seeds)
    budgets = [b for b in budgets if b <= 20] if getattr(args, "quick", False) else list(budgets)
    scorer, cache = Scorer(), Cache(Path(args.out_dir), args.force)
    g = torch.Generator().manual_seed(seeds[0])
    floor = scorer(scorer.x_train[torch.randperm(len(scorer.x_train), generator=g)[:n]])
    rows = [
        row
        for model in MODELS
        for row in model_rows(model, scorer, cache, n, seeds, budgets, langevin_steps, full_sweeps)
    ]
    jac = cache.get(f"jacobians|points={jacobian_points}", lambda: jacobian_figures(scorer, jacobian_points))
    cost = cache.get(f"costs|n={n}", lambda: costs(n))
    return {
        "section": "energy",
        "num_samples": n,
        "seeds": seeds,
        "budgets": budgets,
        "langevin_steps": list(langevin_steps),
        "floor": floor,
        "rows": rows,
        "jacobians": {k: v for k, v in jac.items() if k != "seconds"},
        "jacobian_points": jacobian_points,
        "costs": {k: v for k, v in cost.items() if k != "seconds"},
        "seconds": time.perf_counter() - start,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _fd(row: dict[str, Any]) -> str:
    fd = np.array(row["fd"])
    spread = f" ± {fd.std(ddof=1):.3f}" if len(fd) > 1 else ""
    return f"{fd.mean():.3f}{spread} ({' / '.join(f'{v:.3f}' for v in fd)})"


def verdicts(data: dict[str, Any]) -> list[str]:
    """Per model and budget: Langevin + jump against the best MMGibbs row within the budget (FD, paired by seed)."""
    lines = []
    for model in MODELS:
        for budget in data["budgets"]:
            rows = [r for r in data["rows"] if r["model"] == model and len(r["fd"]) == len(data["seeds"])]
            jump = next(r for r in rows if r["name"] == "Langevin + Tweedie jump" and r["steps"] == budget)
            mm = [r for r in rows if r["name"].startswith("MMGibbs") and r["equiv"] <= budget]
            best = min(mm, key=lambda r: np.mean(r["fd"]))
            diff = np.array(best["fd"]) - np.array(jump["fd"])
            verdict = "MMGibbs ahead" if np.all(diff < 0) else "Langevin + jump ahead" if np.all(diff > 0) else "mixed"
            lines.append(
                f"* {model} model, {budget} evaluations: Langevin + jump {np.mean(jump['fd']):.3f}, best MMGibbs "
                f"{np.mean(best['fd']):.3f} ({best['name'][8:]}, {best['steps']} sweeps); MMGibbs - jump per seed "
                f"{' / '.join(f'{v:+.3f}' for v in diff)}: {verdict}."
            )
    return lines


def render(data: dict[str, Any]) -> str:
    """The section's markdown, from its results file alone."""
    n, seeds = data["num_samples"], data["seeds"]
    lines = [
        f"### One noise level: score against energy model at sigma 0.5 ({n} samples per seed, seeds {seeds}, paired)",
        "",
        "Score model `checkpoints/digits-dsm-sigma0.5` (eps prediction), energy model "
        "`checkpoints/digits-energy-sigma0.5` (E = 0.5 ||y - f(y)||^2 / sigma^2, same UNet, data, split, steps and "
        "seeds; eps_hat = sigma grad E). Evaluations are each model's own (a score-model forward; an energy "
        "evaluation, forward + backward), a Jacobian product counted as 2 (the measured costs are below). "
        f"Langevin's step is step * sigma^2, tuned over {data['langevin_steps']} on the first seed per budget; `full` "
        f"runs on the first seed only. Floor: {n} train digits, FD {data['floor']['fd']:.3f}.",
        "",
        "| model | sampler | steps / sweeps | evaluations | FD mean ± std (per seed) | class KL |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        name = r["name"] + (f" (step={r['step']})" if "step" in r else "")
        lines.append(
            f"| {r['model']} | {name} | {r['steps']} | {r['equiv']:.0f} | {_fd(r)} | {np.mean(r['kl']):.3f} |"
        )
    lines += ["", "At equal evaluations (rows above; `full` is past every budget):", "", *verdicts(data), ""]
    lines += [
        f"Jacobians at {data['jacobian_points']} noisy held-out digits y = x + sigma eps (J from 64 reverse products "
        "per sample; asymmetry ||J - J^T||_F / ||J||_F per sample; spectrum of sigma^2 sym(J); NLL: the Gaussian "
        "posterior's -log N(x; mu(y), Sigma(y) + 1e-3 I) per dimension in nats, without a variance bound, `full` "
        "symmetrised and clamped as it draws):",
        "",
        "| model | asymmetry mean | median | 10-90% | max | eigenvalues < 0 | eigenvalues > sigma^2 | tr(Sigma) / d | "
        "NLL isotropic | NLL diagonal | NLL full |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, f in data["jacobians"].items():
        a, nll = f["asymmetry"], f["nll"]
        label = name + (f" (sigma {f['sigma']:.3g})" if "sigma" in f else " (sigma 0.5)")
        lines.append(
            f"| {label} | {a['mean']:.3g} | {a['median']:.3g} | {a['p10']:.3g}-{a['p90']:.3g} | {a['max']:.3g} | "
            f"{100 * f['negative_share']:.1f}% | {100 * f['above_sigma2_share']:.1f}% | {f['trace_over_d']:.4f} | "
            f"{nll['isotropic']:.3f} | {nll['diagonal']:.3f} | {nll['full']:.3f} |"
        )
    c = data["costs"]
    lines += [
        "",
        f"Cost at batch {c['batch']} in score-model forwards ({1e3 * c['score_forward_s']:.0f} ms, one thread): a "
        f"score-model Jacobian product (backward) {c['score_vjp']:.2f}; an energy evaluation (forward + backward) "
        f"{c['energy_evaluation']:.2f}; an energy evaluation with its graph kept plus one Hessian-vector product "
        f"(double backward) {c['energy_evaluation_kept_graph_plus_hvp']:.2f}, i.e. an HVP costs "
        f"{c['energy_hvp']:.2f} forwards ({c['energy_hvp'] / c['energy_evaluation']:.2f} energy evaluations); "
        f"forward-over-reverse (torch.func.jvp of grad, score and HVP together) "
        f"{c['energy_forward_over_reverse_score_and_hvp']:.2f}.",
        "",
        f"({data['seconds']:.0f} s with cached rows; torch {data['torch']}, {data['threads']} thread(s))",
    ]
    return "\n".join(lines) + "\n"
