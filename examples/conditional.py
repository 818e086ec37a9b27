"""Calibrated covariances of conditional models, measured on exact conditional models through the DiT and SD families.

    python examples/benchmark.py --section conditional --threads 1 --write-docs   # about 20 min on one thread
    python examples/conditional.py --quick                                       # a smoke run

Four exact models, each sampled through a family's own adapter (conditioning, guidance and prediction type as a
real model of the family has them), the network replaced by the exact prediction:

* **DiT, class-conditional mixture** (guidance 1): 3 classes, each a 2-component mixture of full-covariance
  Gaussians on 4 x 8 x 8 latents (d = 256): ``tiny_dit.ExactClassConditional`` as the DiT transformer.
* **DiT, Gaussian classes** (guidance 3): class c is N(m_c, C) and the null class N(m_u, C), one shared full C; the
  guided denoiser is then the exact denoiser of N(m_u + g (m_c - m_u), C) at every level
  (``tests/guided_gaussian.py``), the guided target measured against.
* **SD, per-prompt mixture** and **SD, Gaussian prompts** (guidance 3, a negative prompt): the same two kinds of
  model through the Stable Diffusion family: a stand-in UNet2DConditionModel whose output a forward hook replaces
  by the exact epsilon of the prompt's model (the prompt is told by its embeddings, as in ``tests/test_family_sd.py``).

Covariances: random "image-like" ones: per channel pair an exponential kernel over the 8 x 8 grid (length 1-4
pixels), mixed across the 4 channels by a random matrix, plus 1e-3 I: full rank, eigenvalues over four decades.

Starts: paired across samplers; N(0, I) for the DiT cases, and for the SD cases the exact marginal at each
sampler's own first level (SD's schedule leaves 7-12% of the signal there, which from N(0, I) costs every sampler
more than its own error; ``start_latents``), with one DDIM row from N(0, I) to show the difference.

Rows: diffusers' DDIM, DPM-Solver++ (2M) and UniPC (bh2), each with its default settings, in a standard loop over
the family's guided prediction (what the host pipeline runs), at 10 and 20 model calls; and the Gibbs pipeline
with ``covariance="calibrated"``, ``eta=0``, ``mean_order=1`` and the scheduler's default layout (first order with
the calibrated covariance is exact for Gaussian data), calibrated on
4000 exact samples per condition (the guided cases: exact samples of the guided target; one row calibrates on the
model's own samples, the host's DDIM over 100 steps) for the levels of 10 and 20 steps:

* per condition (the default: a group of 16 clusters per condition), rank 16 (the default) and rank d = 256;
* pooled (``num_conditions=1``: one group of 16 clusters over all conditions, which then only mu tells apart);
* the per-condition table read by the drop-in scheduler in a standard loop (every cluster, assigned by mu alone);
* ``calibrated_stationary``: a stationary covariance per cluster (one 4 x 4 spectral density per frequency), the
  latent-scale structure (the models' covariances are nearly stationary: exponential kernels, not periodic);
* the guided cases: the table calibrated without guidance, read at guidance 3 (by the drop-in: the pipeline
  refuses it).

Metrics per condition (``image_mixture.mixture_metrics`` against the condition's exact model or guided target):
excess per-mode KL (nats; KL minus the same number for exact samples of the same size) and the pixel FD against
20000 exact samples. Calls per sample count model calls (a guided call is one batched call of both branches).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
)
from image_mixture import mixture_metrics

from mmgibbs import GaussianMixtureDenoiser, MMGibbsScheduler, MomentMatchingGibbsPipeline

TESTS = Path(__file__).resolve().parents[1] / "tests"
if str(TESTS) not in sys.path:
    sys.path.append(str(TESTS))

SHAPE = (4, 8, 8)
D = math.prod(SHAPE)
BUDGETS = (10, 20)
BASELINES: dict[str, type] = {
    "DDIM": DDIMScheduler,
    "DPM-Solver++ (2M)": DPMSolverMultistepScheduler,
    "UniPC (bh2)": UniPCMultistepScheduler,
}
NUM_REFERENCE = 20000
GUIDANCE = 3.0
NUM_CONDITIONS = 3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ exact models
def field_covariance(g: torch.Generator, scale: float = 0.5, nugget: float = 1e-3) -> torch.Tensor:
    """An image-like full covariance on (4, 8, 8): exp(-|p - q| / length) over the grid (length in [1, 4]) for every
    channel pair, mixed across channels by A A^T (A random), times ``scale``, plus ``nugget`` I."""
    ii, jj = torch.meshgrid(torch.arange(SHAPE[1]), torch.arange(SHAPE[2]), indexing="ij")
    pos = torch.stack([ii.flatten(), jj.flatten()], -1).double()
    length = 1.0 + 3.0 * float(torch.rand(1, generator=g))
    spatial = torch.exp(-torch.cdist(pos, pos) / length)
    mix = torch.randn(SHAPE[0], SHAPE[0], generator=g, dtype=torch.float64) / 2
    return scale * torch.kron(mix @ mix.T, spatial) + nugget * torch.eye(D, dtype=torch.float64)


def smooth_mean(g: torch.Generator) -> torch.Tensor:
    """A smooth random mean image (an exponential-kernel field of length 3, unit variance)."""
    chol = torch.linalg.cholesky(field_covariance(g.manual_seed(int(torch.randint(2**31, (1,), generator=g))), 1.0))
    return chol @ torch.randn(D, generator=g, dtype=torch.float64)


def mixture_models(seed: int, config: dict[str, Any]) -> list[GaussianMixtureDenoiser]:
    """One 2-component full-covariance mixture per condition (weights 0.6 / 0.4)."""
    g = _gen(seed)
    models = []
    for _ in range(NUM_CONDITIONS):
        means = torch.stack([smooth_mean(g) for _ in range(2)])
        covs = torch.stack([field_covariance(g) for _ in range(2)])
        models.append(GaussianMixtureDenoiser.from_components(means, covs, [0.6, 0.4], list(SHAPE), config))
    return models


def gaussian_models(seed: int, config: dict[str, Any]) -> tuple[list[GaussianMixtureDenoiser], list[Any]]:
    """Conditions N(m_c, C) and the unconditional branch N(m_u, C) (one shared C), and the guided targets
    N(m_u + g (m_c - m_u), C): (the branches' models [c..., u], the targets)."""
    g = _gen(seed)
    cov = field_covariance(g)
    means = [smooth_mean(g) for _ in range(NUM_CONDITIONS + 1)]
    branches = [GaussianMixtureDenoiser.from_components(m[None], cov[None], None, list(SHAPE), config) for m in means]
    targets = [
        GaussianMixtureDenoiser.from_components(
            (means[-1] + GUIDANCE * (m - means[-1]))[None], cov[None], None, list(SHAPE), config
        )
        for m in means[:-1]
    ]
    return branches, targets


class ExactPrompts:
    """Forward hook: the UNet's output replaced by the exact epsilon of the model of each row's prompt, told by its
    embeddings (every entry of the prompt embeddings equals the condition id)."""

    def __init__(self, models: dict[int, GaussianMixtureDenoiser]):
        self.models = models

    def __call__(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], _output: Any) -> tuple[Any]:
        x_t, timestep = args[0], args[1]
        ids = kwargs["encoder_hidden_states"][:, 0, 0].round().long()
        out = torch.zeros_like(x_t)
        for c in torch.unique(ids).tolist():
            rows = ids == c
            out[rows] = self.models[c](x_t[rows], timestep).sample.to(out.dtype)
        return (out,)


def prompt_embeds(ids: list[int], width: int = 32, length: int = 4) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.float64).view(-1, 1, 1).expand(-1, length, width).clone()


# ------------------------------------------------------------------------------------------------ the cases
@dataclass
class Case:
    """One exact conditional model through one family: the Gibbs pipeline over it, the per-condition targets, and
    the host arguments of a call for given conditions (``arguments(ids)``)."""

    name: str
    key: str
    pipe: MomentMatchingGibbsPipeline
    targets: list[GaussianMixtureDenoiser]
    arguments: Callable[[list[int]], dict[str, Any]]
    guidance: float
    calibration_samples: Callable[[int, int], torch.Tensor]  # (condition, count) -> clean samples
    hook: Any = None
    unguided: Callable[[list[int]], dict[str, Any]] | None = None  # the same call without guidance
    references: list[torch.Tensor] = field(default_factory=list)
    #: start every sampler from the exact marginal at its first level instead of N(0, I) (see :func:`start_latents`)
    exact_start: bool = False


def dit_case(kind: str, seed: int) -> Case:
    from tiny_dit import DIT_SCHEDULER_CONFIG, ExactClassConditional
    from tiny_pipelines import tiny_autoencoder_kl

    config = {"_class_name": "DDIMScheduler", **DIT_SCHEDULER_CONFIG}
    if kind == "mixture":
        models = mixture_models(seed, config)
        transformer = ExactClassConditional.from_denoisers(models, learned_sigma=False)
        targets, guidance = models, 1.0
    else:
        branches, targets = gaussian_models(seed, config)
        transformer = ExactClassConditional.from_denoisers(branches[:-1], null=branches[-1], learned_sigma=False)
        guidance = GUIDANCE
    host = DiTPipeline(
        transformer=transformer, vae=tiny_autoencoder_kl(), scheduler=DDIMScheduler(**DIT_SCHEDULER_CONFIG)
    )
    pipe = MomentMatchingGibbsPipeline.from_pipe(host, covariance="calibrated", eta=0.0)
    pipe.set_progress_bar_config(disable=True)
    name = "DiT, class-conditional mixture" if kind == "mixture" else "DiT, Gaussian classes, shared covariance"
    return Case(
        name,
        f"dit-{kind}",
        pipe,
        targets,
        lambda ids, g=guidance: {"class_labels": ids, "guidance_scale": g},
        guidance,
        lambda c, n: targets[c].sample(n, _gen(1000 + c)),
        unguided=lambda ids: {"class_labels": ids, "guidance_scale": 1.0},
    )


def sd_case(kind: str, seed: int) -> Case:
    from tiny_pipelines import SD_SCHEDULER_CONFIG, tiny_stable_diffusion_pipeline
    from tiny_sdxl import tiny_stand_in_unet

    config = {"_class_name": "DDIMScheduler", **SD_SCHEDULER_CONFIG}
    host = tiny_stable_diffusion_pipeline()
    pipe = MomentMatchingGibbsPipeline.from_pipe(host, unet=tiny_stand_in_unet(), covariance="calibrated", eta=0.0).to(
        torch.float64
    )
    pipe.set_progress_bar_config(disable=True)
    negative = NUM_CONDITIONS  # the negative prompt's id
    if kind == "mixture":
        targets = mixture_models(seed + 1, config)
        models, guidance = dict(enumerate(targets)), 1.0
    else:
        branches, targets = gaussian_models(seed + 1, config)
        models, guidance = dict(enumerate(branches)), GUIDANCE

    def arguments(ids: list[int], g: float = guidance) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt_embeds": prompt_embeds(ids), "guidance_scale": g}
        if g > 1:
            out["negative_prompt_embeds"] = prompt_embeds([negative] * len(ids))
        return out

    name = "SD, per-prompt mixture" if kind == "mixture" else "SD, Gaussian prompts, shared covariance"
    hook = ExactPrompts(models)
    return Case(
        name,
        f"sd-{kind}",
        pipe,
        targets,
        arguments,
        guidance,
        lambda c, n: targets[c].sample(n, _gen(2000 + c)),
        hook=hook,
        unguided=lambda ids: arguments(ids, 1.0),
        exact_start=True,
    )


# ------------------------------------------------------------------------------------------------ samplers
#: rows per Gibbs pipeline call (a rank-d table holds an N x d x d factor per step)
GIBBS_BATCH = 1000


def first_timestep(case: Case, scheduler: Any, steps: int, ids: list[int]) -> int:
    """The first level a sampler visits for ``steps`` steps, laid out as the family lays it out for this call."""
    case.pipe.family(scheduler).set_timesteps(scheduler, steps, torch.device("cpu"), case.arguments(ids[:1]))
    return int(scheduler.timesteps[0])


def start_latents(case: Case, ids: list[int], seed: int, timestep: int | None) -> torch.Tensor:
    """The paired start of every sampler for a seed (VP: init_noise_sigma 1), one row per entry of ``ids``.

    N(0, I) (what the host pipelines draw; always with ``timestep`` None), or with ``case.exact_start`` the exact
    marginal of each row's condition at the sampler's first level ``timestep``: x_t = sqrt(abar_t) x_0 +
    sqrt(1 - abar_t) eps, x_0 from the condition's target (the guided target in the guided cases: for Gaussian
    conditions with a shared covariance the guided denoiser is that target's exact denoiser at every level), x_0
    and eps the same for every sampler. SD's scaled-linear schedule keeps sqrt(abar) = 0.07-0.12 of the signal at
    the samplers' first levels (0.09 at DDIM's t = 951 for 20 steps), and these targets' leading directions have
    variance ~30, so from N(0, I) every sampler misses the target by far more than it errs (DDIM, 20 calls: FD 68
    against 16 from the exact start, floor 17, for condition 0 of the per-prompt mixture at 300 samples): the start
    is the model's schedule's error, the same for every sampler, and the section measures the samplers. One row per
    SD case keeps the host's N(0, I) start to show it. DiT's linear schedule keeps sqrt(abar) = 0.006-0.016 there,
    so its cases start from N(0, I).
    """
    eps = torch.randn((len(ids), *SHAPE), generator=_gen(seed), dtype=torch.float64)
    if timestep is None or not case.exact_start:
        return eps
    if ids != sorted(ids):
        raise ValueError("`ids` must list the conditions in blocks, in order (as the section calls samplers).")
    counts = torch.bincount(torch.tensor(ids), minlength=NUM_CONDITIONS).tolist()
    pairs = enumerate(zip(case.targets, counts, strict=True))
    x0 = torch.cat([t.sample(k, _gen(4000 + 10 * seed + c)) for c, (t, k) in pairs if k]).reshape(eps.shape)
    abar = DDIMScheduler.from_config(case.pipe.scheduler.config).alphas_cumprod[timestep].double()
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def standard_loop(
    case: Case, scheduler: Any, steps: int, ids: list[int], latents: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """diffusers' sampling loop (scale_model_input, step) over the family's own guided prediction, from ``latents``
    (what the host pipeline runs with this scheduler)."""
    arguments = case.arguments(ids)
    family = case.pipe.family(scheduler)
    family.set_timesteps(scheduler, steps, torch.device("cpu"), arguments)
    job = family.prepare(scheduler, device=torch.device("cpu"), latents=latents, **arguments)
    x = job.latents
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    scale = hasattr(type(scheduler), "scale_model_input")
    for t in scheduler.timesteps:
        out = job.predict(scheduler.scale_model_input(x, t) if scale else x, t)
        x = scheduler.step(out.to(x.dtype), t, x, **step_kwargs).prev_sample
    return x


def baseline(case: Case, name: str, steps: int, ids: list[int], seed: int, host_start: bool = False) -> torch.Tensor:
    """diffusers' ``name`` scheduler (the case's config) in the standard loop; ``host_start``: from N(0, I) even
    where the case starts exactly (:func:`start_latents`)."""
    config = {k: v for k, v in case.pipe.scheduler.config.items() if not k.startswith("_")}
    cls = BASELINES[name]
    takes = inspect.signature(cls.__init__).parameters
    scheduler = cls.from_config({k: v for k, v in config.items() if k in takes})
    timestep = None if host_start else first_timestep(case, scheduler, steps, ids)
    start = start_latents(case, ids, seed, timestep)
    return standard_loop(case, scheduler, steps, ids, start, _gen(seed + 1))


def gibbs(case: Case, table: Any, steps: int, ids: list[int], seed: int, **settings: Any) -> torch.Tensor:
    """The Gibbs pipeline from the paired start, :data:`GIBBS_BATCH` rows per call (one generator per call)."""
    case.pipe.scheduler.set_covariance_table(table)
    timestep = first_timestep(case, MMGibbsScheduler.from_config(case.pipe.scheduler.config, **settings), steps, ids)
    start, parts = start_latents(case, ids, seed, timestep), []
    for k, first in enumerate(range(0, len(ids), GIBBS_BATCH)):
        rows = slice(first, first + GIBBS_BATCH)
        out = case.pipe(
            **case.arguments(ids[rows]),
            latents=start[rows],
            num_inference_steps=steps,
            generator=_gen(1000 * seed + k + 1),
            output_type="latent",
            **settings,
        )
        parts.append(out.images)
    return torch.cat(parts)


def drop_in(case: Case, table: Any, steps: int, ids: list[int], seed: int) -> torch.Tensor:
    """The calibrated MMGibbsScheduler in the standard loop (it sees model outputs only), in batches as
    :func:`gibbs`."""
    scheduler = MMGibbsScheduler.from_config(case.pipe.scheduler.config)
    scheduler.set_covariance_table(table)
    start, parts = start_latents(case, ids, seed, first_timestep(case, scheduler, steps, ids)), []
    for k, first in enumerate(range(0, len(ids), GIBBS_BATCH)):
        rows = slice(first, first + GIBBS_BATCH)
        parts.append(standard_loop(case, scheduler, steps, ids[rows], start[rows], _gen(1000 * seed + k + 1)))
    return torch.cat(parts)


# ------------------------------------------------------------------------------------------------ the section
class ConditionalBench:
    """The cases, their tables and a result cache (``out_dir/conditional.json``)."""

    def __init__(
        self,
        n: int,
        seeds: list[int],
        out_dir: Path,
        force: bool = False,
        quick: bool = False,
        num_calibration: int | None = None,
    ):
        self.n, self.seeds, self.out_dir, self.force, self.quick = n, seeds, out_dir, force, quick
        out_dir.mkdir(parents=True, exist_ok=True)
        self.cache_path = out_dir / "conditional.json"
        self.cache = json.loads(self.cache_path.read_text()) if self.cache_path.exists() else {}
        self.num_calibration = num_calibration or (1000 if quick else 4000)
        self.budgets = list(BUDGETS[-1:] if quick else BUDGETS)  # the step counts sampled and calibrated for

    def key(self, case: Case, row: str, budget: int, seed: int) -> str:
        return f"{case.key}|{row}|{budget}|seed={seed}|n={self.n}|calibration={self.num_calibration}"

    def result(self, case: Case, row: str, budget: int, seed: int, run: Callable[[], torch.Tensor]) -> dict:
        key = self.key(case, row, budget, seed)
        if key in self.cache and not self.force:
            return self.cache[key]
        start = time.perf_counter()
        with _hooked(case):
            samples = run()
        self.cache[key] = {"conditions": self.metrics(case, samples), "seconds": time.perf_counter() - start}
        self.cache_path.write_text(json.dumps(self.cache, indent=1))
        return self.cache[key]

    def metrics(self, case: Case, samples: torch.Tensor) -> list[dict[str, float]]:
        """Per condition: the mixture metrics against its target, KL reported in excess of the exact floor."""
        out = []
        for c, target in enumerate(case.targets):
            if len(case.references) <= c:
                case.references.append(target.sample(NUM_REFERENCE, _gen(10**6 + c)))
            rows = samples[c * self.n : (c + 1) * self.n].reshape(self.n, *SHAPE)
            out.append(mixture_metrics(target, rows, case.references[c]))
        return out

    def table(self, case: Case, label: str, **settings: Any) -> Any:
        """A table for the levels of 10 and 20 steps from exact samples of each condition (the guided cases: of the
        guided target; ``own`` draws the model's own with the host's DDIM over 100 steps)."""
        own = settings.pop("own", False)
        unguided = settings.pop("unguided", False)
        ids = [c for c in range(NUM_CONDITIONS) for _ in range(self.num_calibration)]
        arguments = (case.unguided if unguided else case.arguments)(ids)
        start = time.perf_counter()
        with _hooked(case):
            if own:
                table = case.pipe.calibrate_covariance(
                    self.budgets, generator=_gen(5), batch_size=4000, **arguments, **settings
                )
            else:
                if unguided:  # data of the conditions themselves (not of the guided targets)
                    branches = case.pipe.transformer.branches if case.key.startswith("dit") else case.hook.models
                    data = [branches[c].sample(self.num_calibration, _gen(3000 + c)) for c in range(NUM_CONDITIONS)]
                else:
                    data = [case.calibration_samples(c, self.num_calibration) for c in range(NUM_CONDITIONS)]
                table = case.pipe.calibrate_covariance(
                    self.budgets,
                    samples=torch.cat(data),
                    generator=_gen(5),
                    batch_size=4000,
                    **arguments,
                    **settings,
                )
        note = f"- {case.name}, `{label}`: {table.sample_forwards} calibration forwards"
        if own:
            note += f", {table.settings['sampler_sample_forwards']} to draw the own samples"
        # kept in the cache beside the rows, so that a run reading its rows from the cache still reports them
        self.cache[self.note_key(case, label)] = (
            note + f", {time.perf_counter() - start:.0f} s, {table.nbytes / 2**20:.1f} MiB."
        )
        self.cache_path.write_text(json.dumps(self.cache, indent=1))
        return table

    def note_key(self, case: Case, label: str) -> str:
        return f"note|{case.key}|{label}|calibration={self.num_calibration}"

    def notes(self, cases: list[Case]) -> list[str]:
        """The calibration notes of ``cases``' tables, as built (this run or an earlier one with the cache), case by
        case in :data:`TABLES` order."""
        keys = [self.note_key(case, label) for case in cases for label in TABLES]
        return [self.cache[k] for k in keys if k in self.cache]


class _hooked:
    """The case's forward hook (SD's exact prompts) on the UNet while a block runs."""

    def __init__(self, case: Case):
        self.case, self.handle = case, None

    def __enter__(self) -> None:
        if self.case.hook is not None and not getattr(self.case.hook, "active", False):
            self.handle = self.case.pipe.unet.register_forward_hook(self.case.hook, with_kwargs=True)
            self.case.hook.active = True

    def __exit__(self, *_: Any) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.case.hook.active = False


#: the calibrated rows' tables: label -> ``ConditionalBench.table`` settings (``own``: the model's own samples;
#: ``unguided``: fitted without guidance; the guided cases only: :data:`GUIDED_TABLES`)
TABLES: dict[str, dict[str, Any]] = {
    "per condition, rank 16": {},
    "per condition, rank 256": {"rank": D},
    "pooled, rank 256": {"num_conditions": 1, "rank": D},
    "stationary": {"covariance": "calibrated_stationary"},
    "own samples, rank 256": {"own": True, "rank": D},
    "unguided, rank 256": {"unguided": True, "rank": D},
}
GUIDED_TABLES = ("own samples, rank 256", "unguided, rank 256")


def rows_of(bench: ConditionalBench, case: Case) -> list[tuple[str, Callable[[int, list[int], int], torch.Tensor]]]:
    """(name, run(budget, ids, seed)) per row; the calibrated rows build their tables (:data:`TABLES`) on first
    use."""
    tables: dict[str, Any] = {}

    def table(label: str) -> Any:
        if label not in tables:
            tables[label] = bench.table(case, label, **TABLES[label])
        return tables[label]

    rows: list[tuple[str, Callable]] = [
        (name, lambda b, ids, s, name=name: baseline(case, name, b, ids, s)) for name in BASELINES
    ]
    rows += [
        ("calibrated, per condition, rank 16 (defaults)",
         lambda b, ids, s: gibbs(case, table("per condition, rank 16"), b, ids, s)),
        ("calibrated, per condition, rank 256",
         lambda b, ids, s: gibbs(case, table("per condition, rank 256"), b, ids, s)),
        ("calibrated, pooled (num_conditions=1), rank 256",
         lambda b, ids, s: gibbs(case, table("pooled, rank 256"), b, ids, s)),
        ("calibrated, per condition, rank 256, drop-in (clusters by mu only)",
         lambda b, ids, s: drop_in(case, table("per condition, rank 256"), b, ids, s)),
        ("calibrated_stationary, per condition (Fourier, per channel pair)",
         lambda b, ids, s: gibbs(case, table("stationary"), b, ids, s, covariance="calibrated_stationary")),
    ]  # fmt: skip
    if case.exact_start:
        rows.append((HOST_START_ROW, lambda b, ids, s: baseline(case, "DDIM", b, ids, s, host_start=True)))
    if case.guidance > 1:
        rows += [
            ("calibrated, per condition, rank 256, own samples (host DDIM, 100 steps)",
             lambda b, ids, s: gibbs(case, table("own samples, rank 256"), b, ids, s)),
            ("calibrated without guidance, read at guidance 3 (drop-in), rank 256",
             lambda b, ids, s: drop_in(case, table("unguided, rank 256"), b, ids, s)),
        ]  # fmt: skip
    return rows


#: the row that starts from N(0, I) where the other rows start from the exact marginal (:func:`start_latents`)
HOST_START_ROW = "DDIM, from N(0, I) (the host's start; the other rows start exactly)"

#: the cases, by key: (builder, kind)
CASES: dict[str, tuple[Callable[..., Case], str]] = {
    "dit-mixture": (dit_case, "mixture"),
    "dit-gaussian": (dit_case, "gaussian"),
    "sd-mixture": (sd_case, "mixture"),
    "sd-gaussian": (sd_case, "gaussian"),
}


def section_data(
    n: int,
    seeds: list[int],
    out_dir: Path,
    force: bool = False,
    quick: bool = False,
    cases_run: tuple[str, ...] = tuple(CASES),
    num_calibration: int | None = None,
) -> dict:
    """Run (or read from the cache) every case of ``cases_run`` and row; returns the section's results file
    (:func:`render`). ``num_calibration``: calibration samples per condition (default 4000, 1000 quick)."""
    start = time.perf_counter()
    bench = ConditionalBench(n, seeds, out_dir, force, quick, num_calibration)
    ids = [c for c in range(NUM_CONDITIONS) for _ in range(n)]
    cases, built = [], []
    for name in cases_run:
        build, kind = CASES[name]
        case = build(kind, seed=0)
        floors = []
        for s in seeds:
            exact = torch.cat([t.sample(n, _gen(777 + 10 * s + c)) for c, t in enumerate(case.targets)])
            floors.append(bench.result(case, "exact samples (floor)", 0, s, lambda exact=exact: exact))
        table_rows = []
        for name, run in rows_of(bench, case):
            for budget in bench.budgets:
                results = [
                    bench.result(case, name, budget, s, lambda r=run, b=budget, s=s: r(b, ids, s)) for s in seeds
                ]
                table_rows.append(
                    {"name": name, "budget": budget, "keys": [bench.key(case, name, budget, s) for s in seeds]}
                )
                excess = [
                    np.mean(
                        [
                            r["conditions"][c]["kl"] - f["conditions"][c]["kl"]
                            for r, f in zip(results, floors, strict=True)
                        ]
                    )
                    for c in range(NUM_CONDITIONS)
                ]
                print(
                    f"  {case.name} | {name} {budget}: excess KL {' / '.join(f'{v:.2f}' for v in excess)}", flush=True
                )
        for label in TABLES:  # a table whose rows all came from the cache: rebuilt once for its calibration note
            if (case.guidance > 1 or label not in GUIDED_TABLES) and bench.note_key(case, label) not in bench.cache:
                case.pipe.scheduler.set_covariance_table(None)  # a fresh table, not merged into the last one
                bench.table(case, label, **TABLES[label])
        built.append(case)
        cases.append(
            {
                "name": case.name,
                "guidance": case.guidance,
                "exact_start": case.exact_start,
                "floor_keys": [bench.key(case, "exact samples (floor)", 0, s) for s in seeds],
                "rows": table_rows,
            }
        )
    used = [k for case in cases for k in case["floor_keys"] + [k for r in case["rows"] for k in r["keys"]]]
    return {
        "section": "conditional",
        "num_samples": n,
        "num_calibration": bench.num_calibration,
        "seeds": seeds,
        "cases": cases,
        "results": {k: bench.cache[k] for k in used},
        "calibration_notes": bench.notes(built),
        "seconds": time.perf_counter() - start,
        "torch": torch.__version__,
    }


def _per_condition(values: list[float], digits: int) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in values)


def render(data: dict) -> str:
    """The section's markdown, from its results file alone."""
    results, n = data["results"], data["num_samples"]
    lines = [
        f"### Exact conditional models ({NUM_CONDITIONS} conditions, d = {D}; {n} samples per condition and seed, "
        f"seeds {data['seeds']}, paired starts; tables from {data['num_calibration']} samples per condition)\n",
        "Per condition (c0 / c1 / c2): excess per-mode KL (nats, KL minus the exact-sample floor of the same size) "
        "and pixel FD against 20000 exact samples of the condition's model (guided cases: of the guided target). "
        "Calls: model calls per sample (both guidance branches in one batched call).\n",
    ]
    verdicts = []
    for case in data["cases"]:
        floors = [results[k] for k in case["floor_keys"]]

        def mean_over_seeds(keys: list[str], metric: str, floors=floors) -> list[float]:
            per = []
            for c in range(NUM_CONDITIONS):
                values = []
                for k, f in zip(keys, floors, strict=True):
                    v = results[k]["conditions"][c][metric]
                    values.append(v - f["conditions"][c]["kl"] if metric == "kl" else v)
                per.append(float(np.mean(values)))
            return per

        lines += [
            f"#### {case['name']} (guidance {case['guidance']:g})\n",
            *(
                [
                    "Every row but the host-start row starts from the exact marginal at its own first level (SD's "
                    "schedule keeps sqrt(abar) = 0.07-0.12 of the signal there; `conditional.start_latents`).\n"
                ]
                if case.get("exact_start")
                else []
            ),
            "| sampler | calls | excess per-mode KL (c0 / c1 / c2) | FD (c0 / c1 / c2) | weight TV (c0 / c1 / c2) |",
            "|---|---|---|---|---|",
        ]
        fd_floor = mean_over_seeds(case["floor_keys"], "fd")
        lines.append(f"| exact samples (floor) | - | 0 | {_per_condition(fd_floor, 3)} | - |")
        summary: dict[tuple[str, int], tuple[list[float], list[float]]] = {}
        for row in case["rows"]:
            kl, fd = mean_over_seeds(row["keys"], "kl"), mean_over_seeds(row["keys"], "fd")
            tv = mean_over_seeds(row["keys"], "tv")
            summary[(row["name"], row["budget"])] = (kl, fd)
            lines.append(
                f"| {row['name']} | {row['budget']} | {_per_condition(kl, 2)} | {_per_condition(fd, 3)} | "
                f"{_per_condition(tv, 3)} |"
            )
        lines.append("")
        for budget in sorted({r["budget"] for r in case["rows"]}):
            base = [(name, summary[(name, budget)]) for name in BASELINES if (name, budget) in summary]
            ours = [(k[0], v) for k, v in summary.items() if k[1] == budget and k[0] not in BASELINES]
            if not base or not ours:
                continue
            best_kl = [min(v[0][c] for _, v in base) for c in range(NUM_CONDITIONS)]
            best_fd = [min(v[1][c] for _, v in base) for c in range(NUM_CONDITIONS)]
            for name, (kl, fd) in ours:
                if "extra" in name or "without guidance" in name:
                    continue
                kl_ok = sum(kl[c] <= 0.5 * best_kl[c] for c in range(NUM_CONDITIONS))
                fd_ok = sum(fd[c] <= best_fd[c] for c in range(NUM_CONDITIONS))
                if (
                    name.startswith("calibrated, per condition, rank 256")
                    and "drop-in" not in name
                    and "own" not in name
                ):
                    verdicts.append(
                        f"- **{case['name']}, {budget} calls**: `{name}` excess KL {_per_condition(kl, 2)} "
                        f"against the best diffusers sampler's {_per_condition(best_kl, 2)} (at most half on {kl_ok} "
                        f"of {NUM_CONDITIONS} conditions); FD {_per_condition(fd, 3)} against "
                        f"{_per_condition(best_fd, 3)} (no worse on {fd_ok} of {NUM_CONDITIONS})."
                    )
    lines += [
        "Aim (at most half the best diffusers sampler's excess KL and an FD no worse, per condition):",
        *verdicts,
        "",
    ]
    lines += ["Calibration (once per model, conditioning and guidance; not in the calls):", *data["calibration_notes"]]
    lines.append(f"\n({data['seconds']:.0f} s with cached rows; torch {data['torch']})")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=3000, help="samples per condition")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out-dir", type=Path, default=Path("benchmark_out"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="800 samples per condition, 20 calls only")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.num_samples = 800
    torch.set_num_threads(args.threads)
    report = render(section_data(args.num_samples, args.seeds, args.out_dir, args.force, args.quick))
    print(report)
    (args.out_dir / "report_conditional.md").write_text(report)


if __name__ == "__main__":
    main()
