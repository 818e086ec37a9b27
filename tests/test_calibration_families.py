"""Calibration for every family: the host's conditioning arguments, own samples from the host's scheduler, the
table's condition groups and guidance, sampling through the pipeline and the drop-in scheduler, and the exact
per-condition and guided covariances (float64, exact class-conditional models through the DiT adapter)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline, StableDiffusionPipeline
from tiny_dit import DIT_SCHEDULER_CONFIG, ExactClassConditional, tiny_dit_pipeline
from tiny_flux import tiny_flux_pipeline
from tiny_pipelines import count_calls, tiny_autoencoder_kl, tiny_stable_diffusion_pipeline
from tiny_pixart import tiny_pixart_pipeline
from tiny_sd3 import tiny_sd3_pipeline
from tiny_sdxl import tiny_sdxl_pipeline

from mmgibbs import GaussianMixtureDenoiser, MomentMatchingGibbsPipeline
from mmgibbs.pipeline import conditioned

PROMPTS = ["a red cat", "a blue dog"]
PIXART = {"clean_caption": False, "use_resolution_binning": False, "max_sequence_length": 16}
#: family -> (tiny host, its conditioning of two conditions, the guidance of its call, what the table records)
FAMILIES: dict[str, tuple[Callable[[], Any], dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "dit": (tiny_dit_pipeline, {"class_labels": [1, 5]}, {"guidance_scale": 4.0}, {"guidance_scale": 4.0}),
    "sd": (
        tiny_stable_diffusion_pipeline,
        {"prompt": PROMPTS},
        {"guidance_scale": 5.0},
        {"guidance_scale": 5.0, "guidance_rescale": 0.0},
    ),
    "sdxl": (
        tiny_sdxl_pipeline,
        {"prompt": PROMPTS},
        {"guidance_scale": 1.0},
        {"guidance_scale": None, "guidance_rescale": None},
    ),
    "sd3": (
        tiny_sd3_pipeline,
        {"prompt": PROMPTS, "max_sequence_length": 8},
        {"guidance_scale": 3.0},
        {"guidance_scale": 3.0},
    ),
    "flux": (
        tiny_flux_pipeline,
        {"prompt": PROMPTS, "negative_prompt": "", "height": 16, "width": 16, "max_sequence_length": 8},
        {"true_cfg_scale": 2.0},
        {"true_cfg_scale": 2.0, "guidance_scale": 3.5},
    ),
    "pixart": (tiny_pixart_pipeline, {"prompt": PROMPTS, **PIXART}, {"guidance_scale": 4.0}, {"guidance_scale": 4.0}),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pipe(host: Any, **settings: Any) -> MomentMatchingGibbsPipeline:
    pipe = MomentMatchingGibbsPipeline.from_pipe(host, covariance="calibrated", eta=0.0, **settings)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_calibrates_on_its_own_samples_and_samples_with_its_usual_call(family: str) -> None:
    """Two conditions, two own samples each drawn by the host's scheduler (3 steps, the call's guidance), a table for
    2 steps with a group of clusters per condition; then the family's usual call with covariance="calibrated" reads
    each image's own condition group. Model calls: 3 sampler steps + 2 calibration passes (one batch)."""
    build, condition, guidance, recorded = FAMILIES[family]
    host = build()
    host.set_progress_bar_config(disable=True)
    pipe = _pipe(host)
    rows = {k: v * 2 if k in ("class_labels", "prompt") else v for k, v in condition.items()}  # [c0, c1, c0, c1]
    with count_calls(pipe.denoiser_model) as calls:
        table = pipe.calibrate_covariance(
            2, generator=_gen(0), sampler_steps=3, num_clusters=1, rank=2, **rows, **guidance
        )
    assert len(calls) == 3 + 2 and table.settings["guidance"] == recorded
    assert table.sample_forwards == 2 * 4 and table.settings["sampler_sample_forwards"] == 3 * 4
    assert "own samples" in table.settings["source"] and len(table.conditions) == 2
    assert all(sorted(level.groups.tolist()) == [0, 1] for level in table.levels)
    assert pipe.scheduler.covariance_table is table
    out = pipe(**condition, **guidance, num_inference_steps=2, generator=_gen(1), output_type="latent")
    assert torch.isfinite(out.images).all() and out.num_forward == 2
    # the call's images find their own conditions' groups (one each, none left to the nearest cluster overall)
    family_ = pipe.family(pipe.scheduler)
    family_.set_timesteps(pipe.scheduler, 2, torch.device("cpu"), {**condition, **guidance})
    job = family_.prepare(pipe.scheduler, device=torch.device("cpu"), generator=_gen(2), **condition, **guidance)
    assert sorted(conditioned(pipe.scheduler.estimator(), table, job).condition_groups.tolist()) == [0, 1]


def test_guidance_other_than_the_tables_is_refused_before_any_model_call() -> None:
    pipe = _pipe(tiny_dit_pipeline())
    pipe.calibrate_covariance(2, generator=_gen(0), sampler_steps=2, num_clusters=1, rank=2, class_labels=[1, 5])
    with (
        count_calls(pipe.transformer) as calls,
        pytest.raises(ValueError, match=r"guidance_scale=4.0.*`guidance_scale`=2.0"),
    ):
        pipe(class_labels=[1], guidance_scale=2.0, num_inference_steps=2)
    assert calls == []
    out = pipe(class_labels=[1], num_inference_steps=2, output_type="latent")  # the host's default 4.0: the table's
    assert torch.isfinite(out.images).all()


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        (
            {"prompt": ["a", "b", "c"]},
            r"`prompt` holds 3 rows; calibration takes one conditioning row per clean sample",
        ),
        ({}, "needs its conditioning to calibrate: pass `prompt`"),
        ({"prompt": "a", "latents": torch.zeros(4, 4, 8, 8)}, "`latents` is not a calibration argument"),
        ({"prompt": "a", "num_images_per_prompt": 2}, "one conditioning row per clean sample"),
        ({"prompt": "a", "class_labels": [1]}, "does not take `class_labels`"),
        ({"prompt": "a", "guidance_scale": float("nan")}, "guidance_scale"),
    ],
)
def test_calibration_arguments_of_a_conditional_family_are_checked_before_any_model_call(arguments, error) -> None:
    pipe = _pipe(tiny_stable_diffusion_pipeline())
    samples = torch.zeros(4, 4, 8, 8)
    with count_calls(pipe.unet) as calls, pytest.raises(ValueError, match=error):
        pipe.calibrate_covariance(2, samples=samples, num_clusters=1, rank=2, **arguments)
    assert calls == []


def test_drop_in_scheduler_reads_a_pooled_table_as_the_pipeline_does() -> None:
    """With one condition group (``num_conditions=1``) the table's clusters are found from mu alone, which is all the
    drop-in scheduler sees: StableDiffusionPipeline's own loop with the calibrated MMGibbsScheduler gives the Gibbs
    pipeline's latents. A per-condition table serves the drop-in too (nearest cluster over all conditions)."""
    host = tiny_stable_diffusion_pipeline()
    call = {"prompt": PROMPTS, "guidance_scale": 5.0, "num_inference_steps": 3, "output_type": "latent"}
    samples = torch.randn(8, 4, 8, 8, generator=_gen(3))
    for num_conditions in (1, 16):
        pipe = _pipe(host)
        rows = {"prompt": PROMPTS * 4, "guidance_scale": 5.0}
        pipe.calibrate_covariance(
            3, samples=samples, generator=_gen(4), num_clusters=2, rank=3, num_conditions=num_conditions, **rows
        )
        drop_in = StableDiffusionPipeline(**{**host.components, "scheduler": pipe.scheduler})
        drop_in.set_progress_bar_config(disable=True)
        latents = drop_in(**call, generator=_gen(5)).images
        assert torch.isfinite(latents).all()
        if num_conditions == 1:
            torch.testing.assert_close(latents, pipe(**call, generator=_gen(5)).images, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ exact covariances
D = 8  # 2 x 2 x 2 latents


def _exact_dit(means: list[torch.Tensor], covariances: list[torch.Tensor], null: int) -> MomentMatchingGibbsPipeline:
    """DiT over an exact model: class c is N(means[c], covariances[c]); class ``null`` answers for the null class."""
    config = {"_class_name": "DDIMScheduler", **DIT_SCHEDULER_CONFIG}
    gaussians = [
        GaussianMixtureDenoiser.from_components(m[None], c[None], sample_shape=[2, 2, 2], scheduler_config=config)
        for m, c in zip(means, covariances, strict=True)
    ]
    model = ExactClassConditional.from_denoisers(gaussians[:null], null=gaussians[null], learned_sigma=False)
    host = DiTPipeline(transformer=model, vae=tiny_autoencoder_kl(), scheduler=DDIMScheduler(**DIT_SCHEDULER_CONFIG))
    return _pipe(host)


def _covariance(seed: int, scale: float) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=_gen(seed), dtype=torch.float64))
    return scale * q @ torch.diag(torch.logspace(-1.5, 0, D, dtype=torch.float64)) @ q.T


def _posterior(cov: torch.Tensor, sigma: float) -> torch.Tensor:
    """Cov[x | y] of N(m, C) at VE noise sigma: sigma^2 C (C + sigma^2 I)^-1."""
    return sigma**2 * cov @ torch.linalg.inv(cov + sigma**2 * torch.eye(D, dtype=torch.float64))


def _assert_covariance(estimate: torch.Tensor, exact: torch.Tensor, n: int, what: str) -> None:
    """Every entry within 5 standard errors of a sample second moment of n Gaussian rows: sqrt((S_ii S_jj +
    S_ij^2) / n)."""
    diagonal = exact.diagonal()
    error = ((diagonal[:, None] * diagonal[None, :] + exact**2) / n).sqrt()
    worst = float(((estimate - exact).abs() / error).max())
    assert worst < 5, f"{what}: an entry is {worst:.1f} standard errors off"


def test_per_condition_groups_hold_each_classes_posterior_covariance() -> None:
    """Two Gaussian classes with different full covariances (no guidance): the table's group of each class holds
    that class's posterior covariance sigma^2 C_c (C_c + sigma^2 I)^-1 (rank d, one cluster; 1500 exact samples per
    class, so within a few percent), and a pooled table (``num_conditions=1``) holds their average instead."""
    means = [torch.randn(D, generator=_gen(10 + c), dtype=torch.float64) for c in range(3)]
    covs = [_covariance(20, 1.0), _covariance(21, 0.2), _covariance(22, 1.0)]
    pipe = _exact_dit(means, covs, null=2)
    n = 1500
    labels = [0] * n + [1] * n
    x = torch.cat(
        [
            m + torch.randn(n, D, generator=_gen(30 + c), dtype=torch.float64) @ torch.linalg.cholesky(cov).T
            for c, (m, cov) in enumerate(zip(means[:2], covs[:2], strict=True))
        ]
    ).reshape(2 * n, 2, 2, 2)
    call = {"class_labels": labels, "guidance_scale": 1.0, "num_clusters": 1, "rank": D, "generator": _gen(31)}
    table = pipe.calibrate_covariance(5, samples=x, **call)
    pooled = pipe.calibrate_covariance(5, samples=x, num_conditions=1, **call)
    assert table.settings["guidance"] == {"guidance_scale": None} and pooled.conditions.shape == (1, 1)
    assert table.group_of(torch.tensor([[0.0], [1.0], [2.0]])).tolist() == [0, 1, -1]  # class 2: not calibrated
    for level, mixed in zip(table.levels, pooled.levels, strict=True):
        assert level.groups.tolist() == [0, 1]
        for c in (0, 1):
            _assert_covariance(level.dense()[c], _posterior(covs[c], level.sigma), n, f"class {c}")
        average = 0.5 * (_posterior(covs[0], level.sigma) + _posterior(covs[1], level.sigma))
        _assert_covariance(mixed.dense()[0], average, 2 * n, "pooled")


def test_guided_calibration_lands_on_the_guided_processs_posterior_covariance() -> None:
    """Classes N(m_c, C) and null class N(m_u, C) with one shared full covariance C: with guidance g the guided
    denoiser mu_g = mu_u + g (mu_c - mu_u) = m*_c + K (y - m*_c), K = C (C + sigma^2 I)^-1, m*_c = m_u + g (m_c -
    m_u), is at every level the exact denoiser of N(m*_c, C) (``guided_gaussian``'s derivation with a shared full
    covariance). Calibrated with that denoiser on the guided process's own samples (the host's DDIM, 100 steps, g
    = 3), the samples have law N(m*_c, C) and every level's covariance is that target's posterior covariance
    sigma^2 K, a distribution that is no class's data distribution p(x | c)."""
    cov = _covariance(40, 0.5)
    means = [torch.randn(D, generator=_gen(41 + c), dtype=torch.float64) for c in range(3)]
    pipe = _exact_dit(means, [cov] * 3, null=2)
    g, n = 3.0, 1500
    table = pipe.calibrate_covariance(
        5, class_labels=[0] * n + [1] * n, guidance_scale=g, generator=_gen(44), num_clusters=1, rank=D, batch_size=n
    )
    assert (
        table.settings["guidance"] == {"guidance_scale": g} and "DDIMScheduler, 100 steps" in table.settings["source"]
    )
    own, _ = pipe._own_samples(
        pipe.family(pipe.scheduler),
        {"class_labels": [0, 1] * 300, "guidance_scale": g},
        600,
        600,
        None,
        None,
        _gen(45),
    )
    for c in (0, 1):
        target = means[2] + g * (means[c] - means[2])
        x = own[c::2].reshape(300, D)
        worst = float(((x.mean(0) - target).abs() / (cov.diagonal() / 300).sqrt()).max())
        assert worst < 5, f"class {c}: the own samples' mean is {worst:.1f} standard errors off the guided target"
        _assert_covariance(torch.cov(x.T), cov, 300, f"own samples of class {c}")
    for level in table.levels:
        for group in (0, 1):
            _assert_covariance(level.dense()[group], _posterior(cov, level.sigma), n, f"class {group}")


#: docs/families.md's family names -> (tiny host, host arguments the tiny models need in both calls)
RECIPE_HOSTS: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {
    "unconditional": (lambda: __import__("tiny_pipelines").tiny_ddpm_pipeline(), {}),
    "Stable Diffusion 1.x/2.x": (tiny_stable_diffusion_pipeline, {}),
    "SDXL": (tiny_sdxl_pipeline, {}),
    "SD3": (tiny_sd3_pipeline, {"max_sequence_length": 8}),
    "Flux": (tiny_flux_pipeline, {"height": 16, "width": 16, "max_sequence_length": 8}),
    "DiT": (tiny_dit_pipeline, {}),
    "PixArt": (tiny_pixart_pipeline, PIXART),
}


def _recipes() -> dict[str, str]:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "families.md").read_text()
    section = text[text.index("## Calibrated, one line per family") :].split("\n## ")[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ") and "`" in line]
    return {name.strip(): code.strip().strip("`") for name, code in rows}


class _Small:
    """The pipeline of a recipe, with the tiny host's arguments and small settings (2 levels, 2 sampler steps, one
    cluster, rank 2) filled in, so that the documented line runs as written."""

    def __init__(self, pipe: MomentMatchingGibbsPipeline, extra: dict[str, Any]):
        self.pipe, self.extra, self.tables = pipe, extra, []

    def calibrate_covariance(self, steps: int, **kw: Any) -> Any:
        small = {"sampler_steps": 2, "num_clusters": 1, "rank": 2, "generator": _gen(3)}
        if not kw:  # unconditional: own samples from the DDPM's ancestral sampler
            small["num_samples"] = 4
        self.tables.append(self.pipe.calibrate_covariance(2, **small, **self.extra, **kw))
        return self.tables[-1]

    def __call__(self, *args: Any, **kw: Any) -> Any:
        return self.pipe(*args, **{**kw, "num_inference_steps": 2}, **self.extra, output_type="latent")


def test_the_documented_calibrated_recipe_of_every_family_runs() -> None:
    """docs/families.md's one line per family, on its tiny pipeline: the table is calibrated (one group per
    condition, the line's guidance recorded) and the family's usual call samples with it."""
    recipes = _recipes()
    assert sorted(recipes) == sorted(RECIPE_HOSTS)
    for family, code in recipes.items():
        build, extra = RECIPE_HOSTS[family]
        host = build()
        host.set_progress_bar_config(disable=True)
        pipe = _Small(_pipe(host), extra)
        namespace = {"pipe": pipe, "prompts": PROMPTS * 2, "labels": [1, 5, 1, 5]}
        calibrate, call = code.split("; ")
        exec(compile(calibrate, f"docs/families.md: {family}", "exec"), namespace)
        (table,) = pipe.tables
        assert pipe.pipe.scheduler.covariance_table is table and table.num_samples == 4, family
        if family != "unconditional":
            guidance = float(re.search(r"guidance_scale=([\d.]+)", calibrate)[1])
            assert len(table.conditions) == 2 and table.settings["guidance"]["guidance_scale"] == guidance, family
        out = eval(compile(call, f"docs/families.md: {family}", "eval"), namespace)
        assert torch.isfinite(out.images).all() and out.num_forward == 2, family
