"""Sampler benchmark on the shipped digits models and the exact toy; prints markdown tables with their setup.

    python examples/benchmark.py                      # everything (about 2-3 hours on 2 CPU cores)
    python examples/benchmark.py --section digits     # one section: digits | single-level | toy | image-mixture
    python examples/benchmark.py --section conditional  # exact class- and prompt-conditional models (conditional.py)
    python examples/benchmark.py --quick              # a smoke run: 200 samples, 1 seed, few rows
    python examples/benchmark.py --section speed      # speed and memory (speed.py; also --section families)

Sections:

* ``digits``: the shipped DDPM (``checkpoints/digits-ddpm``). Frechet distance (FD) between the shipped
  classifier's 64-d penultimate features of ``--num-samples`` samples and of the 397 held-out digits, mean and
  std over ``--seeds`` (paired: every sampler starts from the same noise for a seed); KL(predicted classes ||
  uniform); model passes per sample (forwards, backward passes and JVPs counted apart, and forward equivalents
  with a backward or a JVP counted as 2 forwards; the measured ratios are printed); wall time.
* ``single-level``: the shipped DSM model at sigma 0.5 (``checkpoints/digits-dsm-sigma0.5``, the paper's
  setting). MMGibbs per covariance and number of sweeps against Langevin on the same model at equal model
  evaluations (its step size tuned over a grid on seed 0's FD, the choice reported), Langevin followed by one
  Tweedie denoising jump, and the noisy marginal itself (train digits plus noise).
* ``image-mixture``: an exact image-like model, a full-covariance Gaussian mixture fitted to the digits (d = 64),
  as a DDPM: every diffusers sampler and the MMGibbs covariances (isotropic, calibrated, full) at 10, 20 and 50
  model-evaluation equivalents, per-mode KL against the true components and its exact-sample floor, weight TV,
  pixel FD and per-direction variance ratios (``image_mixture.py``; 4000 samples per seed by default).
* ``toy``: the paper's 2-D mixture with the exact denoiser (``toy_mog.py``): MMD^2 against clean samples for every
  MMGibbs covariance, the exact-posterior Gibbs chain and Langevin, at sigma 0.3 and 0.5.

Results are cached per (row, seed, samples) in ``--out-dir/results.json``, so a run can be resumed or extended;
``--force`` recomputes. Sample grids go to ``--out-dir/*.png``; every section's results file (what its tables are
rendered from: the rows, the cache entries they use and the run's setup) to ``--out-dir/results_<section>.json``.

The docs' tables are written by this script, never by hand (``results_doc.py``):

    python examples/benchmark.py --section digits --write-docs   # also docs/results/digits.json + its block
    python examples/benchmark.py --render-docs                   # re-render every block from docs/results/*.json
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import results_doc
import speed
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor
from digits import (
    CLASSIFIER_DIR,
    DDPM_DIR,
    DigitsClassifier,
    classifier_features,
    classifier_predict,
    dsm_dir,
    load_digits_split,
)
from learned_bench import LEVER_ROWS, layout_of

from mmgibbs import GaussianMixtureDenoiser, MMGibbsScheduler, MomentMatchingGibbsPipeline, denoising_moments
from mmgibbs.baselines import langevin, predictor_corrector, tweedie_score
from mmgibbs.metrics import energy_distance, frechet_distance, kl_from_uniform, mmd2, reference_bandwidth

DIFFUSERS_SCHEDULERS = {
    "DDPM": DDPMScheduler,
    "DDIM": DDIMScheduler,
    "DPM-Solver++ (2M)": DPMSolverMultistepScheduler,
    "Euler-ancestral": EulerAncestralDiscreteScheduler,
    "UniPC (bh2)": UniPCMultistepScheduler,
}
TOY_SCHEDULERS = ("DDPM", "DDIM", "DPM-Solver++ (2M)", "UniPC (bh2)")
#: sections on the learned models (learned_bench.py; energy_bench.py: score against energy model at one level): name
#: -> module with ``section_data(args)`` (the results file) and ``render(data)`` (its markdown)
LEARNED_SECTIONS = {"learned-mixture": "learned_mixture", "mnist": "mnist_bench", "energy": "energy_bench"}
#: step counts of the calibrated digits rows (one table covers them all)
CALIBRATED_STEPS = (10, 20, 50)


@torch.no_grad()
def standard_loop(
    model: Callable, scheduler: Any, shape: tuple[int, ...], generator: torch.Generator, dtype=torch.float32
) -> torch.Tensor:
    """diffusers' sampling loop with init_noise_sigma and scale_model_input (DDPMPipeline skips both, which breaks
    Euler-type schedulers; for DDPM, DDIM and DPM-Solver it is the same loop)."""
    sample = randn_tensor(shape, generator=generator, dtype=dtype) * scheduler.init_noise_sigma
    # UniPC's step takes no generator (it is deterministic)
    kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(sample, t), t).sample
        sample = scheduler.step(out, t, sample, **kwargs).prev_sample
    return sample


@dataclass
class Row:
    """One sampler setting; ``kind``: diffusers, mmgibbs, pc, single-mmgibbs, langevin, langevin+jump or noisy."""

    name: str
    kind: str
    steps: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.kind}|{self.name}|{self.steps}|{json.dumps(self.settings, sort_keys=True)}"


# ------------------------------------------------------------------------------------------------ rows
def digits_rows(quick: bool) -> list[Row]:
    rows = [Row(name, "diffusers", n) for name, ns in [("DDPM", (1000, 100, 50, 20))] for n in ns]
    rows += [Row("DDIM", "diffusers", n) for n in (50, 20, 10)]
    rows += [Row("DPM-Solver++ (2M)", "diffusers", n) for n in (20, 10)]
    rows += [Row("Euler-ancestral", "diffusers", 20)]
    # the strongest deterministic solvers at the top of the budget, so "best baseline <= 50" is not a straw man
    rows += [Row("DPM-Solver++ (2M)", "diffusers", 50)]
    rows += [Row("UniPC (bh2)", "diffusers", n) for n in (10, 20, 50)]
    rows += [Row("Langevin PC", "pc", n) for n in (5, 10, 25)]  # 2 model calls per level
    iso = {"covariance": "isotropic"}
    for label, settings in [
        ("MMGibbs annealed, ancestral, isotropic", {**iso, "transition": "ancestral"}),
        ("MMGibbs annealed, ancestral eta=0, isotropic", {**iso, "transition": "ancestral", "eta": 0.0}),
        ("MMGibbs annealed, gibbs (paper), isotropic", {**iso, "transition": "gibbs"}),
        ("MMGibbs annealed, gibbs (paper), mean only", {"covariance": "none", "transition": "gibbs"}),
    ]:
        rows += [Row(label, "mmgibbs", n, settings) for n in (10, 20, 50)]
    rows += [
        Row("MMGibbs annealed, ancestral, isotropic, 2 sweeps", "mmgibbs", n, {**iso, "gibbs_sweeps": 2})
        for n in (10, 25)
    ]
    rows += [
        Row("MMGibbs annealed, ancestral, diagonal (1 probe)", "mmgibbs", n, {"covariance": "diagonal"})
        for n in (10, 20)
    ]
    proj = {"covariance": "projection", "jacobian": "finite_difference"}  # one extra forward per level
    for label, settings in [
        ("MMGibbs annealed, ancestral, projection (fin. diff.)", proj),
        ("MMGibbs annealed, ancestral eta=0, projection (fin. diff.)", {**proj, "eta": 0.0}),
        (
            "MMGibbs annealed, ancestral eta=0, projection (fin. diff.), trailing",
            {**proj, "eta": 0.0, "timestep_spacing": "trailing"},
        ),
        ("MMGibbs annealed, gibbs (paper), projection (fin. diff.)", {**proj, "transition": "gibbs"}),
    ]:
        rows += [Row(label, "mmgibbs", n, settings) for n in (10, 25)]
    rows += [Row("MMGibbs annealed, ancestral, full (64 backward/level)", "mmgibbs", 10, {"covariance": "full"})]
    rows += [
        Row(
            "MMGibbs annealed, ancestral, exact diagonal (64 backward/level)",
            "mmgibbs",
            10,
            {"covariance": "exact_diagonal"},
        )
    ]
    rows += [
        Row("MMGibbs single level sigma=0.5 (t=158), isotropic", "mmgibbs", n, {**iso, "schedule": "single_level"})
        for n in (20, 50)
    ]
    # the expected posterior covariance per level, calibrated once (mmgibbs.calibration; zero extra calls)
    for label, settings in [
        (
            "MMGibbs annealed, ancestral eta=0, calibrated (16 clusters, rank 16, train digits)",
            {"covariance": "calibrated", "eta": 0.0, "calibration": "data"},
        ),
        (
            "MMGibbs annealed, ancestral eta=0, calibrated (16 clusters, rank 16, own samples)",
            {"covariance": "calibrated", "eta": 0.0, "calibration": "own"},
        ),
    ]:
        rows += [Row(label, "mmgibbs", n, settings) for n in CALIBRATED_STEPS]
    for label, structure in [  # with 1400 calibration samples, fewer clusters estimate each covariance better
        ("1 cluster, rank 64", {"num_clusters": 1, "rank": 64}),
        ("4 clusters, rank 16", {"num_clusters": 4, "rank": 16}),
    ]:
        rows += [
            Row(
                f"MMGibbs annealed, ancestral eta=0, calibrated ({label}, train digits)",
                "mmgibbs",
                n,
                {"covariance": "calibrated", "eta": 0.0, "calibration": "data", **structure},
            )
            for n in (10, 20)
        ]
    if quick:
        rows = [r for r in rows if r.steps <= 20 and "64 backward" not in r.name][::3]
    return rows


def levers_rows(quick: bool) -> list[Row]:
    """The ``digits-levers`` section: the diffusers samplers at 10 and 20 calls, the digits section's isotropic (eta 0)
    and calibrated rows as they were, and the real-data levers (``learned_bench.LEVER_ROWS``, the same settings on
    every learned model) one at a time."""
    budgets = (10,) if quick else (10, 20)
    rows = [Row(name, "diffusers", n) for name in ("DDIM", "DPM-Solver++ (2M)", "UniPC (bh2)") for n in budgets]
    before = [
        (
            "MMGibbs annealed, ancestral eta=0, isotropic",
            {"covariance": "isotropic", "transition": "ancestral", "eta": 0.0},
        ),
        (
            "MMGibbs annealed, ancestral eta=0, calibrated (16 clusters, rank 16, train digits)",
            {"covariance": "calibrated", "eta": 0.0, "calibration": "data"},
        ),
    ]
    levers = [
        (f"MMGibbs annealed, {row.name}", {**row.settings, **({"calibration": "data"} if row.calibration else {})})
        for row in LEVER_ROWS
    ]
    rows += [Row(name, "mmgibbs", n, settings) for name, settings in before + levers for n in budgets]
    return rows


def single_level_rows(quick: bool) -> list[Row]:
    sweeps = (1, 3, 10) if quick else (1, 3, 10, 20, 50)
    rows = [Row("noisy marginal (train digits + noise)", "noisy")]
    for n in sweeps:
        rows += [Row("Langevin (y samples)", "langevin", n), Row("Langevin + Tweedie jump", "langevin+jump", n)]
        rows += [Row(f"MMGibbs {c}", "single-mmgibbs", n, {"covariance": c}) for c in ("none", "isotropic")]
        rows += [Row("MMGibbs diagonal (1 probe)", "single-mmgibbs", n, {"covariance": "diagonal"})]
        rows += [
            Row(
                "MMGibbs projection (fin. diff.)",
                "single-mmgibbs",
                n,
                {"covariance": "projection", "jacobian": "finite_difference"},
            )
        ]
        if n <= 10 and not quick:
            rows += [Row("MMGibbs full", "single-mmgibbs", n, {"covariance": "full"})]
    return rows


# ------------------------------------------------------------------------------------------------ harness
class Bench:
    """Models, data, features and the result cache."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.n = args.num_samples
        self.out_dir: Path = args.out_dir
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.cache_path = self.out_dir / "results.json"
        self.cache: dict[str, Any] = json.loads(self.cache_path.read_text()) if self.cache_path.exists() else {}
        self.x_train, _, x_heldout, _ = load_digits_split()
        self.classifier = DigitsClassifier.from_pretrained(CLASSIFIER_DIR).eval()
        self.heldout_features = classifier_features(self.classifier, x_heldout)
        self.ddpm = DDPMPipeline.from_pretrained(DDPM_DIR)
        self.ddpm.set_progress_bar_config(disable=True)
        self.unet = self.ddpm.unet.eval()
        self.ddpm_config = self.ddpm.scheduler.config
        self.dsm = MomentMatchingGibbsPipeline.from_pretrained(dsm_dir(0.5))
        self.dsm.set_progress_bar_config(disable=True)
        self.tables: dict[str, Any] = {}
        self.costs = self._measure_costs()

    def _measure_costs(self) -> dict[str, float]:
        """Wall-time cost of a backward pass and of a JVP relative to a forward, at this batch size."""
        sched = MMGibbsScheduler.from_config(self.ddpm_config)
        t = torch.tensor(500)
        denoiser = sched.noise_schedule.denoiser(self.unet, t)
        y = torch.randn(self.n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        sigma = float(sched.noise_schedule.sigma(t))

        def clock(fn: Callable[[], Any]) -> float:
            fn()
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        fwd = min(clock(lambda: denoising_moments(denoiser, y, sigma, "none")) for _ in range(3))
        rev = min(
            clock(lambda: denoising_moments(denoiser, y, sigma, "diagonal", 2, jacobian="reverse")) for _ in range(3)
        )
        jvp = clock(lambda: denoising_moments(denoiser, y, sigma, "diagonal", 1, jacobian="forward"))
        return {"forward_s": fwd, "backward": max(rev - fwd, 0.0) / 2 / fwd, "jvp": jvp / fwd}

    @staticmethod
    def equivalents(r: dict[str, float]) -> float:
        """Forward equivalents per sample: a backward pass or a JVP counts as 2 forwards (the usual autodiff
        bound; the measured ratios are printed with each table)."""
        return r["forwards"] + 2 * r["backward"] + 2 * r["jvps"]

    def score(self, images: torch.Tensor) -> dict[str, float]:
        images = images.clamp(-1, 1)
        features = classifier_features(self.classifier, images)
        labels = classifier_predict(self.classifier, images)
        return {"fd": frechet_distance(features, self.heldout_features), "kl": kl_from_uniform(labels, 10)}

    def key(self, row: Row, seed: int) -> str:
        """The result cache's key of ``row`` at ``seed`` (and this run's sample count)."""
        return f"{row.key}|seed={seed}|n={self.n}"

    def result(self, row: Row, seed: int, run: Callable[[int], tuple[torch.Tensor, dict[str, float]]]) -> dict:
        key = self.key(row, seed)
        if key in self.cache and not self.args.force:
            return self.cache[key]
        start = time.perf_counter()
        images, counts = run(seed)
        res = {**self.score(images), **counts, "seconds": time.perf_counter() - start}
        grid = self.out_dir / "grids" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"
        grid.parent.mkdir(exist_ok=True)
        torch.save(images[:36].float().cpu(), grid)
        res["grid"] = str(grid)
        self.cache[key] = res
        self.cache_path.write_text(json.dumps(self.cache, indent=1))
        return res

    # ---------------------------------------------------------------------------------------- samplers
    def _gen(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    def run_diffusers(self, row: Row, seed: int) -> tuple[torch.Tensor, dict[str, float]]:
        scheduler = DIFFUSERS_SCHEDULERS[row.name].from_config(self.ddpm_config)
        scheduler.set_timesteps(row.steps)
        sample = standard_loop(self.unet, scheduler, (self.n, 1, 8, 8), self._gen(seed))
        return sample, {"forwards": len(scheduler.timesteps), "backward": 0, "jvps": 0}

    def covariance_table(
        self, source: str, num_clusters: int = 16, rank: int = 16, layout: dict[str, Any] | None = None
    ) -> Any:
        """The digits DDPM's calibrated covariance for :data:`CALIBRATED_STEPS`, from the 1400 train digits
        ("data") or from 1400 of the model's own samples ("own": DDPM over all 1000 steps), at the levels of
        ``layout`` (``source_scheduler`` / ``timestep_spacing``; default the DDPM's own); cached on disk."""
        from mmgibbs.calibration import CovarianceTable

        key = source if (num_clusters, rank) == (16, 16) else f"{source}-{num_clusters}-clusters-rank-{rank}"
        if layout:
            key += "-" + "-".join(f"{k}-{v}" for k, v in sorted(layout.items()))
        path = self.out_dir / f"digits_covariance_{key}.safetensors"
        if key in self.tables:
            return self.tables[key]
        if path.exists() and not self.args.force:
            table = CovarianceTable.load(path)
        else:
            scheduler = MMGibbsScheduler.from_config(self.ddpm_config, covariance="calibrated", **(layout or {}))
            pipe = MomentMatchingGibbsPipeline(unet=self.unet, scheduler=scheduler)
            pipe.set_progress_bar_config(disable=True)
            start = time.perf_counter()
            samples = self.x_train if source == "data" else None
            table = pipe.calibrate_covariance(
                list(CALIBRATED_STEPS),
                samples=samples,
                num_samples=len(self.x_train),
                generator=self._gen(5),
                batch_size=2000,
                num_clusters=num_clusters,
                rank=rank,
            )
            table.settings["seconds"] = time.perf_counter() - start
            table.save(path)
        self.tables[key] = table
        return table

    def run_mmgibbs(self, row: Row, seed: int) -> tuple[torch.Tensor, dict[str, float]]:
        settings = dict(row.settings)
        if settings.get("schedule") == "single_level":
            settings["sigma"] = 0.5
        source = settings.pop("calibration", None)
        structure = {k: settings.pop(k) for k in ("num_clusters", "rank") if k in settings}
        scheduler = MMGibbsScheduler.from_config(self.ddpm_config, **settings)
        if source is not None:
            scheduler.set_covariance_table(self.covariance_table(source, **structure, layout=layout_of(settings)))
        pipe = MomentMatchingGibbsPipeline(unet=self.unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(batch_size=self.n, num_inference_steps=row.steps, generator=self._gen(seed), output_type="latent")
        return out.images, {"forwards": out.num_forward, "backward": out.num_backward, "jvps": out.num_jvp}

    def run_pc(self, row: Row, seed: int) -> tuple[torch.Tensor, dict[str, float]]:
        scheduler = MMGibbsScheduler.from_config(self.ddpm_config, covariance="none")
        scheduler.set_timesteps(row.steps)
        g = self._gen(seed)
        sample = randn_tensor((self.n, 1, 8, 8), generator=g)
        images = predictor_corrector(self.unet, scheduler, sample, row.settings["snr"], g)
        return images, {"forwards": 2 * row.steps, "backward": 0, "jvps": 0}

    # the single-level model ------------------------------------------------------------------------------
    def run_single(self, row: Row, seed: int) -> tuple[torch.Tensor, dict[str, float]]:
        sigma = 0.5
        g = self._gen(seed)
        denoiser = self.dsm.scheduler.noise_schedule.denoiser(self.dsm.unet, torch.tensor(sigma))
        if row.kind == "noisy":
            idx = torch.randint(len(self.x_train), (self.n,), generator=g)
            return self.x_train[idx] + sigma * torch.randn((self.n, 1, 8, 8), generator=g), {
                "forwards": 0,
                "backward": 0,
                "jvps": 0,
            }
        if row.kind == "single-mmgibbs":
            out = self.dsm(
                batch_size=self.n, num_inference_steps=row.steps, generator=g, output_type="latent", **row.settings
            )
            return out.images, {"forwards": out.num_forward, "backward": out.num_backward, "jvps": out.num_jvp}
        # Langevin on p~ from y ~ N(0, (1 + sigma^2) I); "+jump" spends its last evaluation on x = mu(y)
        y = torch.randn((self.n, 1, 8, 8), generator=g) * math.sqrt(1 + sigma**2)
        jump = row.kind == "langevin+jump"
        steps = row.steps - 1 if jump else row.steps
        y = langevin(tweedie_score(denoiser, sigma), y, row.settings["step"] * sigma**2, steps, g)
        if jump:
            with torch.no_grad():
                y = denoiser(y)
        return y, {"forwards": row.steps, "backward": 0, "jvps": 0}


# ------------------------------------------------------------------------------------------------ sections
def summarise(row: Row, results: list[dict]) -> dict[str, Any]:
    fd = np.array([r["fd"] for r in results])
    kl = np.array([r["kl"] for r in results])
    per_sample = {k: results[0][k] for k in ("forwards", "backward", "jvps")}
    return {
        "row": row,
        "fd": fd.mean(),
        "fd_std": _spread(fd),
        "fd_seeds": fd,
        "kl": kl.mean(),
        "equiv": Bench.equivalents(per_sample),
        **per_sample,
        "seconds": np.mean([r["seconds"] for r in results]),
        "grid": results[0].get("grid"),
    }


def _row_record(bench: Bench, row: Row) -> dict[str, Any]:
    """A table row for the section's results file: the row and the cache keys of its seeds."""
    return {
        "name": row.name,
        "kind": row.kind,
        "steps": row.steps,
        "settings": row.settings,
        "keys": [bench.key(row, s) for s in bench.args.seeds],
    }


def _results_subset(bench: Bench, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The cache entries the rows use (without the local paths of their sample grids)."""
    return {k: {f: v for f, v in bench.cache[k].items() if f != "grid"} for row in rows for k in row["keys"]}


def summaries_of(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per table row of a section's results file: its summary over seeds (:func:`summarise`)."""
    return [
        summarise(Row(r["name"], r["kind"], r["steps"], r["settings"]), [data["results"][k] for k in r["keys"]])
        for r in data["rows"]
    ]


def tuned(bench: Bench, row: Row, grid: list[dict[str, Any]], run) -> tuple[Row, list[dict]]:
    """Pick the setting with the best seed-0 FD (favours the baseline), then run every seed with it."""
    first = bench.args.seeds[0]
    trials = []
    for settings in grid:
        candidate = Row(row.name, row.kind, row.steps, {**row.settings, **settings})
        trials.append((bench.result(candidate, first, lambda s, c=candidate: run(c, s))["fd"], candidate))
    best = min(trials, key=lambda item: item[0])[1]
    return best, [bench.result(best, s, lambda s, c=best: run(c, s)) for s in bench.args.seeds]


def table(summaries: list[dict[str, Any]], with_kl: bool = True) -> str:
    head = "| sampler | steps | FD mean ± std | FD per seed | class KL | fwd | bwd | jvp | equiv. | s/seed |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summaries:
        row = s["row"]
        extra = ", ".join(f"{k}={v}" for k, v in row.settings.items() if k in ("snr", "step"))
        name = row.name + (f" ({extra})" if extra else "")
        per_seed = " / ".join(f"{v:.3f}" for v in s["fd_seeds"])
        lines.append(
            f"| {name} | {row.steps or '-'} | {s['fd']:.3f} ± {s['fd_std']:.3f} | {per_seed} | "
            f"{s['kl']:.3f} | {s['forwards']} | {s['backward']} | {s['jvps']} | {s['equiv']:.0f} | "
            f"{s['seconds']:.1f} |"
        )
    return "\n".join(lines)


def _only(bench: Bench, rows: list[Row]) -> list[Row]:
    """The rows ``--only`` keeps (all without it)."""
    keep = bench.args.only
    return rows if not keep else [r for r in rows if any(k in r.name for k in keep)]


#: the sections on the digits DDPM and their rows (``digits-levers`` is not in ALL)
DIGITS_ROWS: dict[str, Callable[[bool], list[Row]]] = {"digits": digits_rows, "digits-levers": levers_rows}


def digits_section(bench: Bench, section: str = "digits") -> dict[str, Any]:
    """Run (or read from the cache) every row of the digits ``section`` (:data:`DIGITS_ROWS`); returns the section's
    results file (:func:`render_digits`)."""
    rows, summaries = [], []
    for row in _only(bench, DIGITS_ROWS[section](bench.args.quick)):
        if row.kind == "pc":
            row, results = tuned(bench, row, [{"snr": v} for v in (0.04, 0.08, 0.16)], bench.run_pc)
        else:
            run = bench.run_diffusers if row.kind == "diffusers" else bench.run_mmgibbs
            results = [bench.result(row, s, lambda s, r=row, f=run: f(r, s)) for s in bench.args.seeds]
        rows.append(_row_record(bench, row))
        summaries.append(summarise(row, results))
        print(f"  {row.name} {row.steps}: FD {summaries[-1]['fd']:.3f}", flush=True)
    save_grids(summaries, bench.out_dir / f"{section}_samples.png")
    floor = frechet_distance(classifier_features(bench.classifier, bench.x_train), bench.heldout_features)
    calibration = [
        {
            "name": source,
            "num_samples": cal.num_samples,
            "source": cal.settings.get("source"),
            "levels": len(cal.levels),
            "sample_forwards": cal.sample_forwards,
            "sampler_sample_forwards": cal.settings.get("sampler_sample_forwards", 0),
            "seconds": cal.settings.get("seconds", float("nan")),
        }
        for source, cal in bench.tables.items()
    ]
    return {
        "section": section,
        "num_samples": bench.n,
        "seeds": bench.args.seeds,
        "floor_fd": floor,
        "costs": bench.costs,
        "calibration": calibration,
        "rows": rows,
        "results": _results_subset(bench, rows),
    }


def render_digits(data: dict[str, Any]) -> str:
    """The digits section's markdown, from its results file alone."""
    summaries = summaries_of(data)
    best_baseline = _best_under(summaries, lambda r: r.kind in ("diffusers", "pc"), 50)
    best_mmgibbs = _best_under(summaries, lambda r: r.kind == "mmgibbs", 50)
    verdict = ""
    if best_baseline is not None and best_mmgibbs is not None:
        # same seeds, same start noise: the per-seed difference is the fair comparison
        diff = best_mmgibbs["fd_seeds"] - best_baseline["fd_seeds"]
        verdict = (
            f"Best at <= 50 forward equivalents (by mean FD): baseline {best_baseline['row'].name} "
            f"{best_baseline['row'].steps} steps, FD {best_baseline['fd']:.3f} ± {best_baseline['fd_std']:.3f}; "
            f"{best_mmgibbs['row'].name} {best_mmgibbs['row'].steps} steps, FD {best_mmgibbs['fd']:.3f} ± "
            f"{best_mmgibbs['fd_std']:.3f}. Paired by seed, MMGibbs minus baseline: "
            f"{' / '.join(f'{d:+.3f}' for d in diff)} (MMGibbs lower on {int((diff < 0).sum())} of {len(diff)} "
            "seeds)."
        )
    for cal in data["calibration"]:
        verdict += (
            f"\n\nCalibrated covariance `{cal['name']}` (once per model, not in the equivalents): "
            f"{cal['num_samples']} samples ({cal['source']}), {cal['levels']} levels, {cal['sample_forwards']} "
            f"single-sample forwards, plus {cal['sampler_sample_forwards']} to draw own samples; "
            f"{cal['seconds']:.0f} s."
        )
    costs, n = data["costs"], data["num_samples"]
    return (
        f"### Digits DDPM ({n} samples per seed, seeds {data['seeds']})\n\n"
        f"Floor (1400 train digits vs the 397 held-out): FD {data['floor_fd']:.3f}. Equivalents count a backward "
        f"pass or a JVP as 2 forwards; measured here: a backward pass {costs['backward']:.2f}, a forward-mode JVP "
        f"{costs['jvp']:.2f} forwards "
        f"(a forward of {n} samples: {costs['forward_s']:.2f} s).\n\n" + table(summaries) + f"\n\n{verdict}\n"
    )


def render_levers(data: dict[str, Any]) -> str:
    """The digits-levers section: the digits table, then per budget the best MMGibbs row against UniPC and against the
    best diffusers sampler at that budget, paired by seed."""
    summaries = summaries_of(data)
    lines = []
    for budget in sorted({s["row"].steps for s in summaries}):
        at = [s for s in summaries if s["row"].steps == budget]
        diffusers = [s for s in at if s["row"].kind == "diffusers"]
        mmgibbs = [s for s in at if s["row"].kind == "mmgibbs"]
        if not diffusers or not mmgibbs:
            continue
        best = min(mmgibbs, key=lambda s: s["fd"])
        for label, ref in [
            ("UniPC", next((s for s in diffusers if s["row"].name.startswith("UniPC")), None)),
            ("the best diffusers sampler", min(diffusers, key=lambda s: s["fd"])),
        ]:
            if ref is None:
                continue
            diff = best["fd_seeds"] - ref["fd_seeds"]
            lines.append(
                f"- {budget} calls: {best['row'].name} FD {best['fd']:.3f} ± {best['fd_std']:.3f} against {label} "
                f"({ref['row'].name}) {ref['fd']:.3f} ± {ref['fd_std']:.3f}; paired by seed "
                f"{' / '.join(f'{d:+.3f}' for d in diff)} (MMGibbs lower on {int((diff < 0).sum())} of {len(diff)})."
            )
    body = render_digits(data).replace("### Digits DDPM", "### Digits DDPM, the real-data levers", 1)
    return body + "\nPer budget (the best MMGibbs row by mean FD):\n\n" + "\n".join(lines) + "\n"


def _best_under(summaries: list[dict], select: Callable[[Row], bool], budget: float) -> dict | None:
    eligible = [s for s in summaries if select(s["row"]) and s["equiv"] <= budget + 1e-9]
    return min(eligible, key=lambda s: s["fd"]) if eligible else None


def single_level_section(bench: Bench) -> dict[str, Any]:
    """Run (or read from the cache) every single-level row; returns the section's results file."""
    rows, summaries = [], []
    for row in _only(bench, single_level_rows(bench.args.quick)):
        if row.kind in ("langevin", "langevin+jump"):
            grid = [{"step": v} for v in (0.05, 0.1, 0.2, 0.5, 1.0, 1.5)]
            row, results = tuned(bench, row, grid, bench.run_single)
        else:
            results = [bench.result(row, s, lambda s, r=row: bench.run_single(r, s)) for s in bench.args.seeds]
        rows.append(_row_record(bench, row))
        summaries.append(summarise(row, results))
        print(f"  {row.name} {row.steps}: FD {summaries[-1]['fd']:.3f}", flush=True)
    save_grids(summaries, bench.out_dir / "single_level_samples.png")
    return {
        "section": "single-level",
        "num_samples": bench.n,
        "seeds": bench.args.seeds,
        "rows": rows,
        "results": _results_subset(bench, rows),
    }


def render_single_level(data: dict[str, Any]) -> str:
    return (
        f"### One noise level: the DSM model at sigma 0.5 ({data['num_samples']} samples per seed, seeds "
        f"{data['seeds']})\n\n"
        "Chains start from N(0, I) (MMGibbs x, Langevin y ~ N(0, (1 + sigma^2) I)); Langevin's step is "
        "step * sigma^2 with step tuned over {0.05, 0.1, 0.2, 0.5, 1, 1.5} on the first seed's FD at each budget.\n\n"
        + table(summaries_of(data))
        + "\n"
    )


def toy_section(bench: Bench) -> dict[str, Any]:
    """The exact toy at one noise level and as a VP diffusion model; returns the section's results file."""
    import toy_mog

    n = 500 if bench.args.quick else 4000
    model = GaussianMixtureDenoiser.paper_toy()
    single = []
    for sigma, sweeps in ((0.3, 10), (0.5, 50)):
        mmd: dict[str, list[float]] = {}
        variance: dict[str, list[float]] = {}
        for seed in bench.args.seeds:
            results = toy_mog.run(sigma, sweeps, n, seed)
            ref = results.pop("reference")["x"]
            h0 = reference_bandwidth(ref)
            for name, res in results.items():
                mmd.setdefault(name, []).append(1e3 * mmd2(res["x"], ref, h0))
                variance.setdefault(name, []).append(model.component_variance(res["x"]))
        single += [
            {"sigma": sigma, "sweeps": sweeps, "name": name, "mmd": mmd[name], "variance": variance[name]}
            for name in mmd
        ]
    return {
        "section": "toy",
        "num_samples": n,
        "seeds": bench.args.seeds,
        "single": single,
        "annealed": toy_annealed_rows(bench, n),
    }


def render_toy(data: dict[str, Any]) -> str:
    n, seeds = data["num_samples"], data["seeds"]
    lines = [
        f"### Exact toy (4 modes at (+-1, +-1), std 0.2; N = {n}; chains from N(0, I); seeds {seeds})\n",
        "| sigma | sweeps | sampler | MMD^2 x1e3 mean ± std | per-mode variance (truth 0.0400) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['sigma']} | {r['sweeps']} | {r['name']} | {_mean_std(r['mmd'], 2)} | {_mean_std(r['variance'], 4)} |"
        for r in data["single"]
    ]
    lines += [
        "",
        f"#### Exact toy as a VP diffusion model (1000 linear-beta DDPM steps, no clipping; N = {n}; "
        f"seeds {seeds}; each seed against fresh clean samples)\n",
        "Per-mode variance: the spread of samples around their own mode (truth 0.0400). Equivalents count a "
        "backward pass as 2 forwards (full covariance in 2-D: 2 backward passes per level).\n",
        "| sampler | steps | equiv. | MMD^2 x1e3 | energy x1e3 | per-mode variance |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['name']} | {r['steps'] or '-'} | {r['equiv']:.0f} | {_mean_std(r['mmd'], 2)} | "
        f"{_mean_std(r['energy'], 2)} | {_mean_std(r['variance'], 4)} |"
        for r in data["annealed"]
    ]
    return "\n".join(lines) + "\n"


def toy_annealed_rows(bench: Bench, n: int) -> list[dict[str, Any]]:
    """The toy as a VP diffusion model against diffusers' samplers at equal model calls (exact moments)."""
    config = DDPMScheduler(clip_sample=False).config  # modes sit at +-1: clipping to [-1, 1] would cut them
    model = GaussianMixtureDenoiser.paper_toy(scheduler_config=dict(config))

    def diffusers_run(name: str, steps: int, seed: int) -> tuple[torch.Tensor, float]:
        scheduler = DIFFUSERS_SCHEDULERS[name].from_config(config)
        scheduler.set_timesteps(steps)
        return standard_loop(model, scheduler, (n, 2), bench._gen(seed), torch.float64), steps

    def mmgibbs_run(covariance: str, steps: int, seed: int, eta: float = 1.0) -> tuple[torch.Tensor, float]:
        pipe = MomentMatchingGibbsPipeline(
            unet=model, scheduler=MMGibbsScheduler.from_config(config, covariance=covariance, eta=eta)
        )
        pipe.set_progress_bar_config(disable=True)
        out = pipe(batch_size=n, num_inference_steps=steps, generator=bench._gen(seed), output_type="pt")
        counts = {"forwards": out.num_forward, "backward": out.num_backward, "jvps": out.num_jvp}
        return out.images, bench.equivalents(counts)

    runs: list[tuple[str, int, Callable[[int], tuple[torch.Tensor, float]]]] = [
        ("clean samples (floor)", 0, lambda seed: (model.sample(n, bench._gen(seed)), 0))
    ]
    for steps in (10, 20, 50):
        runs += [(name, steps, lambda seed, a=name, k=steps: diffusers_run(a, k, seed)) for name in TOY_SCHEDULERS]
        runs += [
            (f"MMGibbs ancestral, {cov}", steps, lambda seed, c=cov, k=steps: mmgibbs_run(c, k, seed))
            for cov in ("none", "isotropic", "isotropic_batch", "full", "projection")
        ]
        runs.append(
            ("MMGibbs ancestral eta=0, isotropic", steps, lambda seed, k=steps: mmgibbs_run("isotropic", k, seed, 0.0))
        )
    rows = []
    for name, steps, run in runs:
        mmd, energy, variance = [], [], []
        for seed in bench.args.seeds:
            reference = model.sample(n, bench._gen(1000 + seed))
            x, equiv = run(seed)
            mmd.append(1e3 * mmd2(x, reference, reference_bandwidth(reference)))
            energy.append(1e3 * energy_distance(x, reference))
            variance.append(model.component_variance(x))
        rows.append({"name": name, "steps": steps, "equiv": equiv, "mmd": mmd, "energy": energy, "variance": variance})
        print(f"  toy {name} {steps}: energy {np.mean(energy):.2f}", flush=True)
    return rows


def _spread(values: np.ndarray | list[float]) -> float:
    """Sample standard deviation over seeds (nan for one seed)."""
    v = np.asarray(values)
    return float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def _mean_std(values: list[float], digits: int) -> str:
    return f"{np.mean(values):.{digits}f} ± {_spread(values):.{digits}f}"


def save_grids(summaries: list[dict[str, Any]], path: Path) -> None:
    """One panel of 36 samples (first seed) per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 6
    rows = math.ceil(len(summaries) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.7 * rows))
    for ax in np.atleast_1d(axes).flat:
        ax.axis("off")
    for ax, s in zip(np.atleast_1d(axes).flat, summaries, strict=False):
        images = torch.load(s["grid"]).clamp(-1, 1)[:36]
        tile = torch.ones(6 * 9 + 1, 6 * 9 + 1) * 0.5
        for i, im in enumerate(images):
            r, c = divmod(i, 6)
            tile[1 + 9 * r : 9 + 9 * r, 1 + 9 * c : 9 + 9 * c] = (im[0] + 1) / 2
        ax.imshow(tile.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{s['row'].name[:34]}\n{s['row'].steps} steps, FD {s['fd']:.2f}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


#: section -> its renderer (results file -> markdown); the measuring side is in :func:`measure_section`
RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "digits": render_digits,
    "digits-levers": render_levers,
    "single-level": render_single_level,
    "toy": render_toy,
}
#: the sections ``--section all`` runs (the speed sections are run on their own)
ALL = ("digits", "single-level", "toy", "image-mixture", "conditional")


def renderers() -> dict[str, Callable[[dict[str, Any]], str]]:
    """Every section's renderer, the image-mixture and speed sections' included."""
    import conditional
    import image_mixture

    return {
        **RENDERERS,
        "image-mixture": image_mixture.render,
        **{name: importlib.import_module(module).render for name, module in LEARNED_SECTIONS.items()},
        "conditional": conditional.render,
        **{name: render for name, (_, render) in speed.SECTIONS.items()},
    }


def measure_section(name: str, args: argparse.Namespace, bench: Bench | None) -> dict[str, Any]:
    """Run one section (cached rows are read, not rerun); returns its results file."""
    if name == "image-mixture":  # needs none of the digits models
        import image_mixture

        n = 1500 if args.quick else max(args.num_samples, 4000)
        return image_mixture.section_data(n, args.seeds, args.out_dir, args.force, args.quick)
    if name in LEARNED_SECTIONS:  # learned models with their own checkpoints (learned_bench.py); not in ALL
        return importlib.import_module(LEARNED_SECTIONS[name]).section_data(args)
    if name == "conditional":  # exact conditional models through the DiT and SD families (conditional.py)
        import conditional

        n = 800 if args.quick else 3000
        cases = tuple(args.conditional_cases or conditional.CASES)
        return conditional.section_data(n, args.seeds[:1], args.out_dir, args.force, args.quick, cases)
    if name in speed.SECTIONS:  # timing sections, with their own models (speed.py)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        return speed.SECTIONS[name][0](args)
    if name in DIGITS_ROWS:
        return digits_section(bench, name)
    return {"single-level": single_level_section, "toy": toy_section}[name](bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--section", choices=["all", *ALL, "digits-levers", *LEARNED_SECTIONS, *speed.SECTIONS], default="all"
    )
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument(
        "--conditional-cases",
        nargs="+",
        choices=["dit-mixture", "dit-gaussian", "sd-mixture", "sd-gaussian"],
        help="the conditional section's exact models (default: all four)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out-dir", type=Path, default=Path("benchmark_out"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="200 samples, one seed, a subset of rows")
    parser.add_argument("--force", action="store_true", help="recompute cached results")
    parser.add_argument(
        "--only", nargs="+", default=None, help="digits/single-level: only the rows whose name contains one of these"
    )
    parser.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        default=None,
        help="learned sections: the baselines' budgets (default 10 20 50)",
    )
    parser.add_argument(
        "--limit-samples", type=int, default=None, help="learned sections: samples of the DDPM limit row"
    )
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="save each section's results as DOCS/results/<section>.json and write its tables into DOCS/results.md",
    )
    parser.add_argument(
        "--render-docs", action="store_true", help="only re-render the docs' blocks from the committed results files"
    )
    parser.add_argument("--docs-dir", type=Path, default=results_doc.DOCS, help="the docs folder (default: docs/)")
    speed.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.write_docs and (args.quick or args.only) and args.docs_dir.resolve() == results_doc.DOCS.resolve():
        parser.error("--write-docs writes the docs' tables: not from a --quick or --only run")
    if args.render_docs:
        for name, render in renderers().items():
            path = args.docs_dir / "results" / f"{name}.json"
            if path.is_file():
                results_doc.write_section(name, json.loads(path.read_text()), render, args.docs_dir)
                print(f"rendered {name} from {path}")
        return
    if args.quick:
        args.num_samples, args.seeds = 200, args.seeds[:1]
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    names = ALL if args.section == "all" else (args.section,)
    bench = Bench(args) if set(names) & set(RENDERERS) else None
    if bench is not None:
        print(
            f"# MMGibbs benchmark\n\ntorch {torch.__version__}, {args.threads} threads, {args.num_samples} samples, "
            f"seeds {args.seeds}\n"
        )
    render, report = renderers(), []
    for name in names:
        data = json.loads(results_doc.as_json(measure_section(name, args, bench)))  # as the results file holds it
        (args.out_dir / f"results_{name}.json").write_text(results_doc.as_json(data))
        report.append(render[name](data))
        print(report[-1], flush=True)
        if args.write_docs:
            results_doc.write_section(name, data, render[name], args.docs_dir)
            print(f"wrote {args.docs_dir / 'results' / f'{name}.json'} and its block in {results_doc.RESULTS_PAGE}")
    (args.out_dir / f"report_{args.section}.md").write_text("\n".join(report))
    print(f"({time.perf_counter() - start:.0f} s; report in {args.out_dir})")


if __name__ == "__main__":
    main()
