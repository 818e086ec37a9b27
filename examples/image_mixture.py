"""The exact image-like benchmark: a full-covariance Gaussian mixture fitted to the 8x8 digits, sampled as a DDPM.

    python examples/benchmark.py --section image-mixture            # 4000 samples, seeds 0 1 (about 1 h, 2 cores)
    python examples/image_mixture.py --num-samples 4000 --seeds 0 1  # the same, on its own

The model: one Gaussian per digit class, fitted to the 1400 train digits scaled to [-1, 1] (class mean, class
covariance + 2e-3 I; weights the class frequencies), d = 64. Its pixel variances run from 2e-3 (the borders, and
~17 near-degenerate directions per class) to ~4 along the main directions, the structure of images. Wrapped as an
exact :class:`GaussianMixtureDenoiser` under DDPM's linear-beta schedule (1000 steps, epsilon prediction, no
clipping), every sampler sees the exact posterior mean, so every gap to the exact samples is the sampler's.

Metrics (each sample set against the true mixture; samples are assigned to the component of largest posterior
responsibility at sigma = 0):

* per-mode KL: sum_k f_k KL(N(m_hat_k, C_hat_k) || N(m_k, C_k)), the Gaussian fit of the samples of mode k against
  the true component, f_k the share of samples in mode k; the floor is the same number for exact samples of the same
  size (finite-sample bias ~ d^2 / (4 n_k)), and "excess" is KL minus the mean floor.
* weight TV: 1/2 sum_k |f_k - w_k|.
* FD: Frechet distance in pixel space against 20000 fresh exact samples.
* variance ratio: per mode, the samples' variance along the true component's eigenvectors over its eigenvalue;
  geometric mean over the 16 smallest, the 40 middle and the 8 largest directions, averaged with weights f_k
  (1 for exact samples; < 1 where a sampler collapses the small directions).

Cost: model-evaluation equivalents per sample, a forward pass 1, a backward pass or a JVP 2 (the usual autodiff
bound), a finite-difference product 1. Calibration of the ``calibrated`` covariance is reported apart, amortised:
its cost is paid once per model and schedule.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor
from digits import load_digits_split

from mmgibbs import GaussianMixtureDenoiser, MMGibbsScheduler, MomentMatchingGibbsPipeline
from mmgibbs.gibbs import gibbs_step
from mmgibbs.metrics import frechet_distance
from mmgibbs.moments import DenoisingMoments, denoising_moments

#: diffusers' samplers, each with its own defaults (spacing, solver order, final step) on the DDPM config
BASELINES: dict[str, tuple[type, dict[str, Any]]] = {
    "DDPM": (DDPMScheduler, {}),
    "DDIM": (DDIMScheduler, {}),
    "DPM-Solver++ (2M)": (DPMSolverMultistepScheduler, {}),
    "UniPC (bh2)": (UniPCMultistepScheduler, {}),
    "Euler-ancestral": (EulerAncestralDiscreteScheduler, {}),
    "SDE-DPM-Solver++ (2M)": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
}
BUDGETS = (10, 20, 50)
#: step counts the calibrated tables cover: the budgets, and the level counts of the 1-JVP-per-level rows
CALIBRATED_STEPS = sorted(set(BUDGETS) | {b // 3 for b in BUDGETS})
REGULARISATION = 2e-3
NUM_REFERENCE = 20000
NUM_CALIBRATION = 16000
#: (name, slice of eigen-directions sorted by increasing variance) of the variance-ratio groups
DIRECTION_GROUPS = (("small", slice(0, 16)), ("mid", slice(16, 56)), ("large", slice(56, 64)))


def scheduler_config() -> dict[str, Any]:
    """DDPM, linear betas, 1000 steps, epsilon; no clipping (the mixture is not confined to [-1, 1])."""
    return dict(DDPMScheduler(clip_sample=False).config)


def fit_digits_mixture(regularisation: float = REGULARISATION) -> GaussianMixtureDenoiser:
    """One full-covariance Gaussian per digit class of the train split: class mean, class covariance +
    ``regularisation`` I, weight the class frequency; samples shaped (1, 8, 8)."""
    x_train, y_train, _, _ = load_digits_split()
    x = x_train.reshape(len(x_train), -1).double()
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    classes = sorted(int(c) for c in torch.unique(y_train))
    means = torch.stack([x[y_train == c].mean(0) for c in classes])
    covs = torch.stack([torch.cov(x[y_train == c].T) + regularisation * eye for c in classes])
    weights = torch.tensor([float((y_train == c).sum()) for c in classes], dtype=torch.float64)
    return GaussianMixtureDenoiser.from_components(
        means, covs, weights, sample_shape=[1, 8, 8], scheduler_config=scheduler_config()
    )


# ------------------------------------------------------------------------------------------------ metrics
def gaussian_kl(m1: torch.Tensor, c1: torch.Tensor, m2: torch.Tensor, c2: torch.Tensor) -> float:
    """KL(N(m1, c1) || N(m2, c2)) in nats (inf if c1 is singular)."""
    l2 = torch.linalg.cholesky(c2)
    diff = (m2 - m1)[:, None]
    sign, logdet1 = torch.linalg.slogdet(c1)
    if sign <= 0:
        return math.inf
    trace = torch.cholesky_solve(c1, l2).diagonal().sum()
    maha = (diff * torch.cholesky_solve(diff, l2)).sum()
    logdet2 = 2 * torch.log(l2.diagonal()).sum()
    return float(0.5 * (trace + maha - len(m1) + logdet2 - logdet1))


def mixture_metrics(model: GaussianMixtureDenoiser, samples: torch.Tensor, reference: torch.Tensor) -> dict:
    """Per-mode KL, weight TV, FD and variance ratios of ``samples`` (module docstring)."""
    x = samples.reshape(len(samples), -1).double()
    finite = torch.isfinite(x).all(-1)
    x = x[finite]
    comp = model.component(x)
    k_all = len(model.weights)
    share = torch.bincount(comp, minlength=k_all).double() / len(x)
    kl, ratios = 0.0, dict.fromkeys((name for name, _ in DIRECTION_GROUPS), 0.0)
    for k in range(k_all):
        xs = x[comp == k]
        if len(xs) <= x.shape[1] + 1:  # too few samples for a Gaussian fit: the mode counts as lost
            kl = math.inf
            continue
        kl += float(share[k]) * gaussian_kl(xs.mean(0), torch.cov(xs.T), model.means[k], model.covariances[k])
        evals, evecs = torch.linalg.eigh(model.covariances[k])
        ratio = ((xs - xs.mean(0)) @ evecs).var(0) / evals
        for name, group in DIRECTION_GROUPS:
            ratios[name] += float(share[k]) * float(ratio[group].log().mean().exp())
    return {
        "kl": kl,
        "tv": 0.5 * float((share - model.weights).abs().sum()),
        "fd": frechet_distance(x, reference.reshape(len(reference), -1)),
        "nonfinite": int((~finite).sum()),
        **{f"vr_{name}": v for name, v in ratios.items()},
    }


# ------------------------------------------------------------------------------------------------ samplers
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def run_diffusers(
    model: torch.nn.Module, name: str, steps: int, n: int, seed: int, config: dict[str, Any] | None = None
) -> tuple[torch.Tensor, float]:
    """diffusers' sampling loop (init_noise_sigma, scale_model_input) with one of :data:`BASELINES`, at its defaults
    on ``config`` (default: :func:`scheduler_config`). ``model``: the exact mixture (float64 samples) or a learned
    UNet2DModel (samples in its dtype, shaped as its config's sample_size); the start noise is
    ``randn_tensor((n, *shape), generator=Generator().manual_seed(seed), dtype)``, the pipeline's."""
    import inspect

    cls, kwargs = BASELINES[name]
    scheduler = cls.from_config(config if config is not None else scheduler_config(), **kwargs)
    scheduler.set_timesteps(steps)
    g = _gen(seed)
    if isinstance(model, GaussianMixtureDenoiser):
        shape, dtype = model.sample_shape, torch.float64
    else:
        side = model.config.sample_size
        shape, dtype = (model.config.in_channels, *((side, side) if isinstance(side, int) else side)), model.dtype
    sample = randn_tensor((n, *shape), generator=g, dtype=dtype) * scheduler.init_noise_sigma
    step_kwargs = {"generator": g} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(sample, t), t).sample
        sample = scheduler.step(out, t, sample, **step_kwargs).prev_sample
    return sample, float(len(scheduler.timesteps))


def _pipeline(model: GaussianMixtureDenoiser, **settings: Any) -> MomentMatchingGibbsPipeline:
    pipe = MomentMatchingGibbsPipeline(
        unet=model, scheduler=MMGibbsScheduler.from_config(scheduler_config(), **settings)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def equivalents(forwards: float, backward: float = 0, jvps: float = 0) -> float:
    """Model-evaluation equivalents: a forward 1, a backward pass or a JVP 2."""
    return forwards + 2 * backward + 2 * jvps


@torch.no_grad()
def run_mmgibbs(
    pipe: MomentMatchingGibbsPipeline, steps: int, n: int, seed: int, **settings: Any
) -> tuple[torch.Tensor, float]:
    """The pipeline (the Gibbs kernel) with per-call settings; returns samples and equivalents per sample."""
    out = pipe(batch_size=n, num_inference_steps=steps, generator=_gen(seed), output_type="latent", **settings)
    return out.images, equivalents(out.num_forward, out.num_backward, out.num_jvp)


@torch.no_grad()
def run_levelwise(
    model: GaussianMixtureDenoiser,
    steps: int,
    n: int,
    seed: int,
    moments_at: Callable[[torch.Tensor, float, Callable], DenoisingMoments],
    eta: float = 0.0,
) -> torch.Tensor:
    """The kernel's loop with a per-level choice of moments (the oracle full covariance and the hybrids):
    ``moments_at(y, sigma, denoiser) -> DenoisingMoments``; same start noise and draw order as the pipeline."""
    scheduler = MMGibbsScheduler.from_config(scheduler_config(), eta=eta)
    scheduler.set_timesteps(steps)
    sigmas = scheduler.ve_sigmas()
    g = _gen(seed)
    y = scheduler.to_ve(randn_tensor((n, *model.sample_shape), generator=g, dtype=torch.float64), 0)
    for i, sigma in enumerate(sigmas):
        moments = moments_at(y, sigma, lambda v, s=sigma: model.posterior_mean(v, s))
        y, _ = gibbs_step(moments, y, sigma, sigmas[i + 1] if i + 1 < len(sigmas) else None, eta=eta, generator=g)
    return y


def oracle_full(model: GaussianMixtureDenoiser) -> Callable:
    """``full`` covariance sigma^2 J: the exact posterior covariance, here in closed form (a model would need d = 64
    Jacobian products per level: 1 + 2 * 64 equivalents)."""

    def moments_at(y: torch.Tensor, sigma: float, denoiser: Callable) -> DenoisingMoments:
        flat = y.reshape(len(y), -1)
        cov = model.posterior_covariance(flat, sigma)
        sig = torch.full((len(y),), sigma, dtype=y.dtype)
        return DenoisingMoments(mu=denoiser(y), sigma=sig, covariance="full", variance=cov)

    return moments_at


def hybrid(table: Any, threshold: float) -> Callable:
    """Mean-only (a deterministic DDIM step, the ODE) above ``threshold``, the calibrated covariance below."""

    def moments_at(y: torch.Tensor, sigma: float, denoiser: Callable) -> DenoisingMoments:
        if sigma > threshold:
            return denoising_moments(denoiser, y, sigma, "none")
        return denoising_moments(denoiser, y, sigma, "calibrated", calibration=table.level(sigma))

    return moments_at


# ------------------------------------------------------------------------------------------------ the section
class ImageMixtureBench:
    """The model, reference sets, calibration tables and a result cache (``out_dir/image_mixture.json``)."""

    def __init__(self, n: int, seeds: list[int], out_dir: Path, force: bool = False, quick: bool = False):
        self.n, self.seeds, self.out_dir, self.force, self.quick = n, seeds, out_dir, force, quick
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model = fit_digits_mixture()
        self.reference = self.model.sample(NUM_REFERENCE, _gen(10**6))
        self.cache_path = out_dir / "image_mixture.json"
        self.cache = json.loads(self.cache_path.read_text()) if self.cache_path.exists() else {}
        self.tables: dict[str, Any] = {}
        self.calibration_notes: list[str] = []

    def key(self, key: str, seed: int) -> str:
        """The result cache's key of row ``key`` at ``seed`` (and this run's sample count)."""
        return f"{key}|seed={seed}|n={self.n}"

    def result(self, key: str, seed: int, run: Callable[[int], tuple[torch.Tensor, float]]) -> dict:
        full_key = self.key(key, seed)
        if full_key in self.cache and not self.force:
            return self.cache[full_key]
        start = time.perf_counter()
        samples, equiv = run(seed)
        res = {**mixture_metrics(self.model, samples, self.reference), "equiv": equiv}
        res["seconds"] = time.perf_counter() - start
        self.cache[full_key] = res
        self.cache_path.write_text(json.dumps(self.cache, indent=1))
        return res

    # calibration -----------------------------------------------------------------------------------------
    def table(
        self,
        source: str,
        num_clusters: int = 16,
        rank: int = 16,
        num_samples: int = NUM_CALIBRATION,
        factor_iterations: int = 1,
        layout: dict[str, Any] | None = None,
    ) -> Any:
        """A calibrated table for :data:`CALIBRATED_STEPS` from ``source``: "data" (exact samples) or "own" (the
        model's own samples: DDPM's ancestral sampler over all 1000 steps, the pipeline's default), at the levels of
        ``layout`` (``source_scheduler`` / ``timestep_spacing`` settings; default the DDPM's own)."""
        key = f"{source}, {num_clusters} clusters, rank {rank}, {num_samples} samples"
        key += f", {factor_iterations} factor iterations" if factor_iterations != 1 else ""
        key += "".join(f", {k} {v}" for k, v in sorted((layout or {}).items()))
        if key in self.tables:
            return self.tables[key]
        num = num_samples // 8 if self.quick else num_samples
        pipe = _pipeline(self.model, covariance="calibrated", eta=0.0, **(layout or {}))
        start = time.perf_counter()
        if source == "data":
            samples = self.model.sample(num, _gen(12345))
            note = f"{num} exact samples"
        else:
            steps_own = 100 if self.quick else 1000
            path = self.out_dir / f"own_samples_{num}_{steps_own}.pt"
            if path.exists():
                samples = torch.load(path)
            else:
                samples = _pipeline(self.model, covariance="none", eta=1.0)(
                    batch_size=num, num_inference_steps=steps_own, generator=_gen(4242), output_type="latent"
                ).images
                torch.save(samples, path)
            note = f"{num} own samples (DDPM ancestral over {steps_own} steps: {num * steps_own} forwards, once)"
        table = pipe.calibrate_covariance(
            CALIBRATED_STEPS,
            samples=samples,
            generator=_gen(5),
            num_clusters=num_clusters,
            rank=rank,
            batch_size=4000,
            factor_iterations=factor_iterations,
        )
        seconds = time.perf_counter() - start
        self.calibration_notes.append(
            f"- `{key}`: {note}; {len(table.levels)} levels x {table.num_samples} samples = "
            f"{table.sample_forwards} forwards, {seconds:.0f} s (for a budget of L levels: L x {table.num_samples})."
        )
        self.tables[key] = table
        return table

    def calibrated_pipe(self, source: str, **table_settings: Any) -> MomentMatchingGibbsPipeline:
        pipe = _pipeline(self.model, covariance="calibrated", eta=0.0)
        pipe.scheduler.set_covariance_table(self.table(source, **table_settings))
        return pipe


def rows(bench: ImageMixtureBench) -> list[tuple[str, int, str, Callable[[int], tuple[torch.Tensor, float]]]]:
    """(name, budget, cache key, run) per row; budgets are model-evaluation equivalents per sample."""
    model, n = bench.model, bench.n
    out: list = []
    for budget in BUDGETS:
        for name in BASELINES:
            out.append(
                (
                    name,
                    budget,
                    f"diffusers|{name}|{budget}",
                    lambda s, a=name, b=budget: run_diffusers(model, a, b, n, s),
                )
            )
    iso = _pipeline(model, covariance="isotropic")
    mmgibbs = [
        ("MMGibbs isotropic (per sample, variance <= 1), eta 1", lambda b, s: run_mmgibbs(iso, b, n, s)),
        ("MMGibbs isotropic (per sample, variance <= 1), eta 0", lambda b, s: run_mmgibbs(iso, b, n, s, eta=0.0)),
        (
            "MMGibbs calibrated pooled (1 cluster, rank 64), data, eta 0",
            lambda b, s: run_mmgibbs(bench.calibrated_pipe("data", num_clusters=1, rank=64), b, n, s),
        ),
        (
            "MMGibbs calibrated (16 clusters, rank 16), data, eta 0",
            lambda b, s: run_mmgibbs(bench.calibrated_pipe("data"), b, n, s),
        ),
        (
            "MMGibbs calibrated (16 clusters, rank 16), data, eta 1",
            lambda b, s: run_mmgibbs(bench.calibrated_pipe("data"), b, n, s, eta=1.0),
        ),
        (
            "MMGibbs calibrated (16 clusters, rank 4), data, eta 0",
            lambda b, s: run_mmgibbs(bench.calibrated_pipe("data", rank=4), b, n, s),
        ),
        (
            "MMGibbs calibrated (16 clusters, rank 16), own samples, eta 0",
            lambda b, s: run_mmgibbs(bench.calibrated_pipe("own"), b, n, s),
        ),
        (
            "MMGibbs hybrid: DDIM above sigma 1, calibrated (16, 16, data) below",
            lambda b, s: (run_levelwise(model, b, n, s, hybrid(bench.table("data"), 1.0)), float(b)),
        ),
    ]
    for name, run in mmgibbs:
        for budget in BUDGETS:
            out.append((name, budget, f"mmgibbs|{name}|{budget}", lambda s, r=run, b=budget: r(b, s)))
    unbounded = _pipeline(model, covariance="isotropic", variance_bound=None)
    ablations = [  # at 10 and 20 only
        (
            "MMGibbs isotropic_batch (Analytic-DPM's batch mean; couples the batch), eta 0",
            lambda b, s: run_mmgibbs(iso, b, n, s, eta=0.0, covariance="isotropic_batch"),
        ),
        (
            "MMGibbs isotropic without the data-range bound (variance_bound=None), eta 0",
            lambda b, s: run_mmgibbs(unbounded, b, n, s, eta=0.0),
        ),
        (
            "MMGibbs calibrated (16 clusters, rank 64), data, eta 0",
            lambda b, s: run_mmgibbs(bench.calibrated_pipe("data", rank=64), b, n, s),
        ),
        (
            "MMGibbs calibrated (16 clusters, rank 16), data, 4000 calibration samples, eta 0",
            lambda b, s: run_mmgibbs(bench.calibrated_pipe("data", num_samples=4000), b, n, s),
        ),
        (
            "MMGibbs calibrated (16 clusters, rank 16), data, principal-factor fit (8 iterations), eta 0",
            lambda b, s: run_mmgibbs(bench.calibrated_pipe("data", factor_iterations=8), b, n, s),
        ),
    ]
    for name, run in ablations:
        for budget in (10, 20):
            out.append((name, budget, f"mmgibbs|{name}|{budget}", lambda s, r=run, b=budget: r(b, s)))
    from learned_bench import LEVER_ROWS, layout_of  # learned_bench imports this module

    for lever in LEVER_ROWS:  # the real-data levers (learned_bench.LEVER_ROWS), as on every learned model
        pipe = _pipeline(model, **lever.settings)
        if lever.calibration is not None:
            pipe.scheduler.set_covariance_table(
                bench.table("data", **lever.calibration, layout=layout_of(lever.settings))
            )
        for budget in (10, 20):
            out.append(
                (
                    lever.label,
                    budget,
                    f"mmgibbs|{json.dumps(dict(lever.settings), sort_keys=True)}|{budget}",
                    lambda s, p=pipe, b=budget: run_mmgibbs(p, b, n, s),
                )
            )
    # a per-sample correction with one forward-mode JVP per level: 3 equivalents per level
    for budget in BUDGETS:
        levels = budget // 3
        out.append(
            (
                f"MMGibbs calibrated (16, 16, data) + 1 JVP/level ({levels} levels)",
                budget,
                f"mmgibbs|calibrated_jacobian|{levels}",
                lambda s, k=levels: run_mmgibbs(
                    bench.calibrated_pipe("data"), k, n, s, covariance="calibrated_jacobian", jacobian="forward"
                ),
            )
        )
    # the reference: the exact full posterior covariance (64 Jacobian products per level)
    for levels in (10, 20):
        out.append(
            (
                f"MMGibbs full covariance (oracle), eta 0, {levels} levels",
                levels,
                f"oracle|full|{levels}",
                lambda s, k=levels: (run_levelwise(model, k, n, s, oracle_full(model)), equivalents(k, 64 * k)),
            )
        )
    if bench.quick:
        out = [r for r in out if r[1] <= 20 and "rank 4" not in r[0] and "eta 1" not in r[0]]
    return out


def _mean(values: list[float]) -> float:
    return float(np.mean(values))


def _spread(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def section_data(n: int, seeds: list[int], out_dir: Path, force: bool = False, quick: bool = False) -> dict:
    """Run (or read from the cache) every row; returns the section's results file (:func:`render`): the rows, the
    cache entries they use, the calibration notes and the run's wall time."""
    start = time.perf_counter()
    bench = ImageMixtureBench(n, seeds, out_dir, force, quick)
    model = bench.model
    floor_keys = [bench.key("floor|exact", s) for s in seeds]
    floor = [bench.result("floor|exact", s, lambda s: (model.sample(n, _gen(777 + s)), 0.0)) for s in seeds]
    floor_kl = _mean([f["kl"] for f in floor])
    table_rows = []
    for name, budget, key, run in rows(bench):
        results = [bench.result(key, s, run) for s in seeds]
        table_rows.append({"name": name, "budget": budget, "keys": [bench.key(key, s) for s in seeds]})
        print(f"  {name} {budget}: excess KL {_mean([r['kl'] for r in results]) - floor_kl:.2f}", flush=True)
    used = floor_keys + [k for r in table_rows for k in r["keys"]]
    return {
        "section": "image-mixture",
        "num_samples": n,
        "seeds": seeds,
        "floor_keys": floor_keys,
        "rows": table_rows,
        "results": {k: bench.cache[k] for k in used},
        "calibration_notes": bench.calibration_notes,
        "seconds": time.perf_counter() - start,
        "torch": torch.__version__,
    }


def render(data: dict) -> str:
    """The section's markdown, from its results file alone."""
    n, seeds, results = data["num_samples"], data["seeds"], data["results"]
    floor = [results[k] for k in data["floor_keys"]]
    floor_kl = _mean([f["kl"] for f in floor])
    summaries = [
        {"name": r["name"], "budget": r["budget"], "results": [results[k] for k in r["keys"]]} for r in data["rows"]
    ]

    def line(name: str, budget: Any, results: list[dict]) -> str:
        kl = [r["kl"] - floor_kl for r in results]
        fd = [r["fd"] for r in results]
        per_seed = " / ".join(f"{v:.2f}" for v in kl)
        return (
            f"| {name} | {budget} | {results[0]['equiv']:.0f} | {_mean(kl):.2f} ± {_spread(kl):.2f} ({per_seed}) | "
            f"{_mean([r['tv'] for r in results]):.3f} | {_mean(fd):.3f} ± {_spread(fd):.3f} | "
            + " / ".join(f"{_mean([r[f'vr_{g}'] for r in results]):.2f}" for g, _ in DIRECTION_GROUPS)
            + " |"
        )

    lines = [
        f"### Exact image-like mixture (digits, 10 full-covariance components, d = 64; {n} samples per seed, "
        f"seeds {seeds}, paired)\n",
        f"Floor (exact samples, {n} per seed): per-mode KL {floor_kl:.2f} ± {_spread([f['kl'] for f in floor]):.2f} "
        f"nats, weight TV {_mean([f['tv'] for f in floor]):.3f}, FD {_mean([f['fd'] for f in floor]):.3f}. "
        "Excess KL = KL - mean floor (per seed in brackets). Equivalents per sample: forward 1, backward/JVP 2.\n",
        "| sampler | budget | equiv. | excess per-mode KL (nats) | weight TV | FD (pixels) | var. ratio small / mid / "
        "large |",
        "|---|---|---|---|---|---|---|",
        line("exact samples (floor)", "-", floor),
    ]
    lines += [line(s["name"], s["budget"], s["results"]) for s in summaries]
    lines += ["", "Calibration (once per model and schedule, not in the budgets):", *data["calibration_notes"], ""]
    lines += verdicts(summaries, floor_kl, seeds)
    lines.append(f"\n({data['seconds']:.0f} s with cached rows; torch {data['torch']})")
    return "\n".join(lines) + "\n"


def section(n: int, seeds: list[int], out_dir: Path, force: bool = False, quick: bool = False) -> str:
    return render(section_data(n, seeds, out_dir, force, quick))


def verdicts(summaries: list[dict], floor_kl: float, seeds: list[int]) -> list[str]:
    """Per budget: the best diffusers sampler (by excess KL, and by FD) against the best MMGibbs setting at equal or
    lower equivalents, paired by seed; the aim: excess KL at most half the best baseline's, FD no worse."""
    out = []
    for budget in BUDGETS:
        base = [s for s in summaries if s["name"] in BASELINES and s["budget"] == budget]
        ours = [s for s in summaries if s["name"] not in BASELINES and s["results"][0]["equiv"] <= budget + 1e-9]
        if not base or not ours:
            continue

        def excess(s: dict) -> np.ndarray:
            return np.array([r["kl"] - floor_kl for r in s["results"]])

        def fd(s: dict) -> np.ndarray:
            return np.array([r["fd"] for r in s["results"]])

        best_kl = min(base, key=lambda s: excess(s).mean())
        best_fd = min(base, key=lambda s: fd(s).mean())
        best = min(ours, key=lambda s: excess(s).mean())
        kl_ok = excess(best) <= 0.5 * excess(best_kl)
        fd_ok = fd(best) <= fd(best_fd)
        out.append(
            f"- **{budget} equivalents**: best MMGibbs `{best['name']}` excess KL "
            f"{' / '.join(f'{v:.2f}' for v in excess(best))} vs best diffusers by KL `{best_kl['name']}` "
            f"{' / '.join(f'{v:.2f}' for v in excess(best_kl))} (at most half on {int(kl_ok.sum())} of {len(seeds)} "
            f"seeds); FD {' / '.join(f'{v:.3f}' for v in fd(best))} vs best diffusers FD `{best_fd['name']}` "
            f"{' / '.join(f'{v:.3f}' for v in fd(best_fd))} (no worse on {int(fd_ok.sum())} of {len(seeds)} seeds)."
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=4000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out-dir", type=Path, default=Path("benchmark_out"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1500 samples, one seed, budgets <= 20, fewer rows")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.num_samples, args.seeds = 1500, args.seeds[:1]
    torch.set_num_threads(args.threads)
    report = section(args.num_samples, args.seeds, args.out_dir, args.force, args.quick)
    print(report)
    (args.out_dir / "report_image-mixture.md").write_text(report)


if __name__ == "__main__":
    main()
