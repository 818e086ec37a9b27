"""The paper's 2-D toy, exactly: a mixture of four Gaussians at (+-1, +-1) with std 0.2, a denoiser at one
noise level sigma (here exact: ``GaussianMixtureDenoiser``), and the samplers of Zhang et al. (2023):

* the noisy marginal p~ itself and unadjusted Langevin on its score (started from N(0, I));
* the moment-matching Gibbs chain x -> y = x + sigma eps -> x ~ N(mu(y), Sigma(y)), started from N(0, I),
  with covariance none / isotropic / diagonal (Hutchinson) / exact diagonal / full / projection / calibrated
  (the expected posterior covariance per cluster of mu, from 4000 clean samples) / calibrated + Jacobian,
  run by ``MomentMatchingGibbsPipeline`` exactly as for a UNet;
* the exact-posterior Gibbs chain x ~ p(x | y) (what the moment matching approximates).

Prints MMD^2 and energy distance against fresh clean samples (with the clean-vs-clean floor), the variance
per mode, and model passes; writes one PNG. Reference figures: ``../shared/reference/toy_reference.md``.

    python examples/toy_mog.py --sigma 0.3 --sweeps 10 --out toy_mog.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mmgibbs import COVARIANCES, GaussianMixtureDenoiser, MMGibbsScheduler, MomentMatchingGibbsPipeline
from mmgibbs.baselines import langevin
from mmgibbs.covariances import ESTIMATORS
from mmgibbs.metrics import energy_distance, mmd2, reference_bandwidth


def build_pipeline(sigma: float, covariance: str = "full", num_probes: int = 4) -> MomentMatchingGibbsPipeline:
    """The toy as a pipeline: an exact denoiser at one noise level (VE frame) and a single-level scheduler."""
    scheduler = MMGibbsScheduler(
        noise_family="ve",
        prediction_type="epsilon",
        schedule="single_level",
        sigma=sigma,
        covariance=covariance,
        num_probes=num_probes,
    )
    model = GaussianMixtureDenoiser.paper_toy(scheduler_config=dict(scheduler.config))
    pipe = MomentMatchingGibbsPipeline(unet=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def langevin_on_noisy(
    model: GaussianMixtureDenoiser, sigma: float, n: int, generator: torch.Generator
) -> torch.Tensor:
    """Langevin on p~ from N(0, I); step 0.02 * the smallest variance of p~'s components, at least 10 e-folds of
    the slowest direction (the reference protocol)."""
    evals = torch.linalg.eigvalsh(model.covariances) + sigma**2
    eta = 0.02 * float(evals.min())
    steps = max(1000, int(10 * float(evals.max()) / eta))
    y0 = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return langevin(lambda y: model.score(y, sigma), y0, eta, steps, generator)


def exact_gibbs(model: GaussianMixtureDenoiser, sigma: float, n: int, sweeps: int, generator: torch.Generator):
    """The exact-posterior Gibbs chain from N(0, I): y = x + sigma eps, x ~ p(x | y)."""
    x = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    for _ in range(sweeps):
        y = x + sigma * torch.randn(x.shape, generator=generator, dtype=torch.float64)
        x = model.posterior_sample(y, sigma, generator)
    return x


def run(sigma: float, sweeps: int, num_samples: int, seed: int) -> dict[str, dict[str, object]]:
    """Every sampler of the toy at one noise level; returns samples and costs by name."""
    pipe = build_pipeline(sigma)
    model = pipe.unet
    g = torch.Generator().manual_seed(seed)
    results: dict[str, dict[str, object]] = {}

    def record(name: str, fn) -> None:
        start = time.perf_counter()
        out = fn()
        samples, cost = out if isinstance(out, tuple) else (out, "-")
        results[name] = {"x": samples, "seconds": time.perf_counter() - start, "cost": cost}

    record("clean (floor)", lambda: model.sample(num_samples, g))
    record("noisy marginal p~", lambda: model.sample_noisy(num_samples, sigma, g))
    record("Langevin on p~", lambda: langevin_on_noisy(model, sigma, num_samples, g))
    record("exact-posterior Gibbs", lambda: exact_gibbs(model, sigma, num_samples, sweeps, g))
    # the calibrated covariances read a table: E[Cov[x | y] | cluster of mu(y)] at this level, from 4000 clean samples
    # and one model call each, 4 clusters (the modes); its own generator, so the other rows' draws are unchanged
    g_cal = torch.Generator().manual_seed(10**4 + seed)
    pipe.calibrate_covariance(sweeps, samples=model.sample(4000, g_cal), generator=g_cal, num_clusters=4, rank=2)
    for cov in COVARIANCES:
        if ESTIMATORS[cov].__name__ == "CalibratedStationary":  # image-shaped samples only: the toy is 2-D vectors
            continue

        def gibbs(cov: str = cov):
            out = pipe(
                batch_size=num_samples, num_inference_steps=sweeps, covariance=cov, generator=g, output_type="pt"
            )
            return out.images, f"{out.num_forward} fwd + {out.num_backward} bwd"

        record(f"MMGibbs {cov}", gibbs)
    results["reference"] = {"x": model.sample(num_samples, g)}
    return results


def report(results: dict[str, dict[str, object]], model: GaussianMixtureDenoiser) -> str:
    ref = results["reference"]["x"]
    h0 = reference_bandwidth(ref)
    lines = [
        "| sampler | MMD^2 x1e3 | energy x1e3 | mean per-mode variance (true 0.0400) | model passes | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        if name == "reference":
            continue
        x = res["x"]
        lines.append(
            f"| {name} | {1e3 * mmd2(x, ref, h0):.2f} | {1e3 * energy_distance(x, ref):.2f} "
            f"| {model.component_variance(x):.4f} "
            f"| {res['cost']} | {res['seconds']:.2f} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, dict[str, object]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results if n != "reference"]
    fig, axes = plt.subplots(2, (len(names) + 1) // 2, figsize=(3 * ((len(names) + 1) // 2), 6.2))
    for ax, name in zip(axes.flat, names, strict=False):
        x = results[name]["x"].numpy()
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.3)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(-2.5, 2.5)
        ax.set_ylim(-2.5, 2.5)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sigma", type=float, default=0.3, help="noise level of the denoiser (VE frame)")
    parser.add_argument("--sweeps", type=int, default=10, help="Gibbs sweeps per chain")
    parser.add_argument("--num-samples", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("toy_mog.png"))
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))

    start = time.perf_counter()
    results = run(args.sigma, args.sweeps, args.num_samples, args.seed)
    model = build_pipeline(args.sigma).unet
    print(
        f"Paper toy: 4 modes at (+-1, +-1), std 0.2; exact denoiser at sigma={args.sigma}; chains from N(0, I), "
        f"{args.sweeps} sweeps; N={args.num_samples} per sampler, seed {args.seed}; diagonal = Hutchinson, 4 probes."
    )
    print(report(results, model))
    plot(results, args.out, f"MoG toy, sigma={args.sigma}, {args.sweeps} sweeps")
    print(f"wrote {args.out} ({time.perf_counter() - start:.1f} s in all)")


if __name__ == "__main__":
    main()
