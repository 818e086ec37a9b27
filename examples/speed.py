"""Speed and memory of the sampler, measured; the ``speed`` and ``families`` sections of ``benchmark.py``.

    python examples/benchmark.py --section speed      # digits UNet + an SD-shaped conditional UNet with CFG
    python examples/benchmark.py --section families   # a tiny model of every family, CFG on (cost per level)
    python examples/benchmark.py --section latent     # calibrated tables at SD 1.5 / SDXL latent scale

``speed``: per-level wall time and peak memory of every covariance (``none``, ``isotropic``, ``diagonal`` with K = 1,
2, 4 probes one product per pass and all K in one batched pass (``product_batch``), in reverse and forward mode,
``projection``, ``full``), against diffusers' own ``DDPMScheduler`` in the same pipeline loop (the drop-in's
overhead: ``MMGibbsScheduler`` swapped into the same ``DDPMPipeline`` / ``StableDiffusionPipeline`` call), on

* the shipped digits DDPM (``checkpoints/digits-ddpm``, 1 x 8 x 8, ``--speed-batch`` images), and
* an SD-shaped conditional UNet built here with random weights (:func:`sd_shaped_pipeline`: ``UNet2DConditionModel``,
  blocks (32, 64, 128), two layers per block, cross-attention in the two upper levels, 4 x 16 x 16 latents,
  4.4 M parameters) inside a ``StableDiffusionPipeline`` with the tests' tiny CLIP text encoder and VAE, guidance
  scale 5 (both branches in one batched call: the UNet sees 2 x 4 = 8 latents).

``families``: issue 8's cost table. For the tiny pipeline of every family (``tests/tiny_*.py``, random weights,
offline), with classifier-free guidance on: model passes, seconds and peak memory per level for ``none``,
``isotropic``, ``diagonal`` (reverse mode, one probe) and ``projection``, next to the host pipeline's own loop.

``latent``: the calibrated covariance tables at latent scale (issue 15 item 3): the bytes of each table structure
(low rank + diagonal per cluster in float32 and float16, fewer clusters, the stationary Fourier structure) for SD
1.5's 4 x 64 x 64 latents, measured, and for SDXL's 4 x 128 x 128 from the same formula; the scheduler step alone
with each table against the host's DDIM step; whole loops on a full-size SD 1.5 UNet config with random weights
(batch 1, CPU): the host pipeline with its DDIM, the same loop with the calibrated drop-in, the Gibbs pipeline; and
the tiny family pipelines with a small real calibration each.

Method. Every row is a whole pipeline call over ``levels`` levels (one sweep each), timed with
``time.perf_counter`` and divided by the levels; rows are interleaved (repetition r runs every row once, in an order
rotated by r) after one warm-up call each, so slow phases of a shared machine hit all rows alike; reported: the
median over repetitions and the min-max spread. Ratios are paired per repetition (row / reference in the same
repetition), then the median and spread of those ratios. Forward equivalents (fwd-eq) are the ratio to the
Gibbs pipeline's ``none`` row (one forward per level). Peak memory: ``torch.profiler`` memory events of one more
call (``profile_memory=True``: every allocation and free of torch's CPU allocator, in order; the peak of their
running sum, i.e. the most memory torch held during the call above what it held before). Model weights are
allocated before and not counted.
"""

from __future__ import annotations

import itertools
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMPipeline, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch.profiler import ProfilerActivity, profile

from mmgibbs import MMGibbsScheduler, MomentMatchingGibbsPipeline

ROOT = Path(__file__).resolve().parents[1]
DIGITS_DDPM = ROOT / "examples" / "checkpoints" / "digits-ddpm"
TESTS = ROOT / "tests"  # the tiny offline model builders ship with the repository
if str(TESTS) not in sys.path:
    sys.path.append(str(TESTS))

PROMPTS = ["a red cat", "a blue dog", "a photo of the grass", "a dog on the grass"]
GUIDANCE = 5.0


# ------------------------------------------------------------------------------------------------ measuring
@dataclass
class Row:
    """One measured setting: ``run()`` makes one whole pipeline call over ``levels`` levels."""

    name: str
    run: Callable[[], Any]
    levels: int
    group: str = ""
    passes: str = ""
    reference: str | None = None  # the row its paired ratio is taken against
    seconds: list[float] = field(default_factory=list)
    peak_mb: float = float("nan")
    model: torch.nn.Module | None = None  # the denoiser: peak memory is counted from its first call


MARK = "speed::denoiser"


def peak_memory_mb(fn: Callable[[], Any], model: torch.nn.Module | None = None) -> float:
    """The peak of torch's CPU allocations during ``fn()``, in MiB: the running sum of the allocation (+) and free
    (-) events ``torch.profiler`` records with ``profile_memory=True``, from the first call of ``model`` on (so that
    prompt encoding before the loop is not counted) and above the level held just before that call."""
    marks: list[Any] = []
    hooks = []
    if model is not None:

        def enter(*_: Any) -> None:
            marks.append(torch.autograd.profiler.record_function(MARK))
            marks[-1].__enter__()

        def leave(*_: Any) -> None:
            marks.pop().__exit__(None, None, None)

        hooks = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave)]
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        for hook in hooks:
            hook.remove()
    events = prof.profiler.kineto_results.events()
    start = min((e.start_ns() for e in events if e.name() == MARK), default=None)
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    held = list(itertools.accumulate(nbytes for _, nbytes in memory))
    first = 0 if start is None else next((i for i, (t, _) in enumerate(memory) if t >= start), len(memory))
    before = held[first - 1] if first > 0 else 0
    return max([0, *(h - before for h in held[first:])]) / 2**20


def measure(rows: list[Row], reps: int, memory: bool = True, log: Callable[[str], None] = print) -> None:
    """Warm up every row, then ``reps`` interleaved repetitions (order rotated each time), then peak memory."""
    for row in rows:
        out = row.run()
        if not row.passes and hasattr(out, "num_forward"):
            row.passes = passes_per_level(out, row.levels)
    for r in range(reps):
        start = time.perf_counter()
        for row in rows[r % len(rows) :] + rows[: r % len(rows)]:
            t0 = time.perf_counter()
            row.run()
            row.seconds.append((time.perf_counter() - t0) / row.levels)
        log(f"  repetition {r + 1}/{reps}: {time.perf_counter() - start:.0f} s")
    if memory:
        for row in rows:
            row.peak_mb = peak_memory_mb(row.run, row.model)


def passes_per_level(out: Any, levels: int) -> str:
    """forward / backward / JVP passes per level, and the batched product passes when fewer than the products."""
    fwd, bwd, jvp = (getattr(out, k) / levels for k in ("num_forward", "num_backward", "num_jvp"))
    text = f"{fwd:g} / {bwd:g} / {jvp:g}"
    product_passes = getattr(out, "num_product_passes", 0) / levels
    if product_passes and product_passes < bwd + jvp:
        text += f" (products in {product_passes:g} pass{'es' if product_passes != 1 else ''})"
    return text


def _spread(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    return f"{min(values) * scale:.{digits}f}-{max(values) * scale:.{digits}f}"


def paired_ratios(row: Row, reference: Row) -> list[float]:
    return [a / b for a, b in zip(row.seconds, reference.seconds, strict=True)]


def table(rows: list[Row], ratio_label: str) -> str:
    """The rows' markdown table (the peak memory column only where it was measured)."""
    by_name = {row.name: row for row in rows}
    memory = not all(math.isnan(row.peak_mb) for row in rows)
    lines = [
        f"| setting | passes per level (fwd / bwd / jvp) | ms per level, median | spread | {ratio_label} |"
        + " peak MiB |" * memory,
        "|---|---|---|---|---|" + "---|" * memory,
    ]
    for row in rows:
        ratio = ""
        if row.reference is not None:
            ratios = paired_ratios(row, by_name[row.reference])
            ratio = f"{statistics.median(ratios):.3f} ({_spread(ratios)})"
        lines.append(
            f"| {row.name} | {row.passes} | {statistics.median(row.seconds) * 1e3:.1f} | "
            f"{_spread(row.seconds, 1e3, 1)} | {ratio} |" + f" {row.peak_mb:.1f} |" * memory
        )
    return "\n".join(lines)


def environment(threads: int) -> str:
    load = os.getloadavg()
    return (
        f"torch {torch.__version__}, {threads} thread(s) (torch.set_num_threads), {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "(1 / 5 / 15 min) at the start"
    )


# ------------------------------------------------------------------------------------------------ models
def sd_shaped_pipeline(scheduler: Any = None, seed: int = 0) -> StableDiffusionPipeline:
    """A Stable-Diffusion-shaped text-to-image pipeline with random weights, built offline.

    UNet2DConditionModel: blocks (32, 64, 128), 2 layers per block, CrossAttnDownBlock2D x 2 + DownBlock2D (and the
    mirror up), 8-channel attention heads, 32 groups, cross-attention to the 32-wide tiny CLIP text encoder of the
    tests, 4 x 16 x 16 latents (4.4 M parameters); the tests' tiny VAE (factor 2: 32 x 32 images) and tokenizer;
    SD v1's scheduler settings (DDPMScheduler unless ``scheduler`` is given).
    """
    from tiny_pipelines import SD_SCHEDULER_CONFIG, tiny_sd_components

    components = tiny_sd_components(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components["unet"] = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64, 128),
            layers_per_block=2,
            cross_attention_dim=components["text_encoder"].config.hidden_size,
            attention_head_dim=8,
            norm_num_groups=32,
        ).eval()
    components["scheduler"] = scheduler if scheduler is not None else DDPMScheduler.from_config(SD_SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _params(model: torch.nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@dataclass
class Case:
    """A model in diffusers' own pipeline (``native``), the same pipeline with the drop-in scheduler, and the Gibbs
    pipeline over the same components; ``call`` holds the host arguments, ``output_type`` what both return."""

    name: str
    native: Any
    gibbs: MomentMatchingGibbsPipeline
    call: dict[str, Any]
    native_output: str
    dim: int
    full: bool
    description: str

    def mmgibbs_scheduler(self, **settings: Any) -> MMGibbsScheduler:
        """The native scheduler converted (its class named: a config built in code does not carry it)."""
        source = type(self.native.scheduler).__name__
        return MMGibbsScheduler.from_config(self.native.scheduler.config, source_scheduler=source, **settings)

    def drop_in(self, covariance: str) -> Any:
        pipe = type(self.native)(**self.native.components)
        pipe.scheduler = self.mmgibbs_scheduler(covariance=covariance)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def digits_case(batch: int) -> Case:
    native = DDPMPipeline.from_pretrained(DIGITS_DDPM)
    native.unet.eval()
    native.set_progress_bar_config(disable=True)
    gibbs = MomentMatchingGibbsPipeline.from_pipe(native, jacobian="reverse")
    gibbs.set_progress_bar_config(disable=True)
    return Case(
        "digits DDPM",
        native,
        gibbs,
        {"batch_size": batch},
        "np",
        dim=64,
        full=True,
        description=f"shipped digits UNet2DModel ({_params(native.unet)} parameters), {batch} images of 1 x 8 x 8",
    )


def sd_case() -> Case:
    native = sd_shaped_pipeline()
    scheduler = MMGibbsScheduler.from_config(native.scheduler.config, source_scheduler="DDPMScheduler")
    gibbs = MomentMatchingGibbsPipeline.from_pipe(native, scheduler=scheduler, jacobian="reverse")
    gibbs.set_progress_bar_config(disable=True)
    return Case(
        "SD-shaped UNet, CFG",
        native,
        gibbs,
        {"prompt": PROMPTS, "guidance_scale": GUIDANCE},
        "latent",
        dim=4 * 16 * 16,
        full=False,
        description=(
            f"SD-shaped UNet2DConditionModel ({_params(native.unet)} parameters, `sd_shaped_pipeline`), "
            f"{len(PROMPTS)} prompts x 4 x 16 x 16 latents, guidance scale {GUIDANCE} (8 latents per UNet call)"
        ),
    )


def speed_rows(case: Case, levels: int, full_levels: int, probes: tuple[int, ...] = (1, 2, 4)) -> list[Row]:
    def host(pipe: Any) -> Callable[[], Any]:
        return lambda: pipe(
            **case.call, num_inference_steps=levels, generator=_generator(), output_type=case.native_output
        )

    def gibbs(n: int = levels, **settings: Any) -> Callable[[], Any]:
        return lambda: case.gibbs(
            **case.call, num_inference_steps=n, generator=_generator(), output_type="latent", **settings
        )

    native = "DDPMScheduler, diffusers' pipeline loop"
    rows = [
        Row(native, host(case.native), levels, "drop-in", "1 / 0 / 0"),
        Row("MMGibbsScheduler drop-in, none", host(case.drop_in("none")), levels, "drop-in", "1 / 0 / 0", native),
        Row(
            "MMGibbsScheduler drop-in, isotropic",
            host(case.drop_in("isotropic")),
            levels,
            "drop-in",
            "1 / 0 / 0",
            native,
        ),
    ]
    base = "Gibbs pipeline, none"
    rows += [Row(base, gibbs(covariance="none"), levels, "gibbs"), Row("Gibbs pipeline, isotropic", gibbs(), levels)]
    for mode in ("reverse", "forward"):
        for k in probes:
            batches = (1,) if k == 1 else (1, k)
            for batch in batches:
                how = "one product per pass" if batch == 1 and k > 1 else f"{k} in one pass" if k > 1 else "1 probe"
                rows.append(
                    Row(
                        f"diagonal, {mode}, K={k} ({how})",
                        gibbs(covariance="diagonal", num_probes=k, jacobian=mode, product_batch=batch),
                        levels,
                    )
                )
    rows.append(Row("projection, reverse", gibbs(covariance="projection"), levels))
    if case.full:
        for batch in (1, 8):
            label = "one product per pass" if batch == 1 else f"{batch} per pass"
            rows.append(
                Row(
                    f"full, reverse, d={case.dim} ({label})",
                    gibbs(full_levels, covariance="full", product_batch=batch),
                    full_levels,
                )
            )
    for row in rows[3:]:
        row.group, row.reference = "gibbs", base
    rows[3].reference = None
    for row in rows:
        row.model = case.native.unet
    return rows


def step_microbenchmark(
    config: Any, shape: tuple[int, ...], steps: int = 50, reps: int = 20
) -> dict[str, list[float]]:
    """The scheduler step alone (no model): DDPMScheduler vs MMGibbsScheduler on one fixed model output."""
    out = torch.randn(shape, generator=_generator())
    source = "DDPMScheduler"
    schedulers = {
        "DDPMScheduler": DDPMScheduler.from_config(config),
        "MMGibbsScheduler, none": MMGibbsScheduler.from_config(config, covariance="none", source_scheduler=source),
        "MMGibbsScheduler, isotropic": MMGibbsScheduler.from_config(config, source_scheduler=source),
    }
    return time_steps(schedulers, out, steps, reps)


def time_steps(schedulers: dict[str, Any], out: torch.Tensor, steps: int, reps: int) -> dict[str, list[float]]:
    """Seconds per step of each scheduler's loop over ``steps`` levels on the fixed model output ``out``, after one
    warm-up loop each, over ``reps`` interleaved repetitions."""
    times: dict[str, list[float]] = {k: [] for k in schedulers}

    def loop(scheduler: Any) -> None:
        scheduler.set_timesteps(steps)
        sample, generator = out.clone(), _generator()
        for t in scheduler.timesteps:
            sample = scheduler.step(out, t, sample, generator=generator).prev_sample

    for scheduler in schedulers.values():
        loop(scheduler)
    for _ in range(reps):
        for name, scheduler in schedulers.items():
            t0 = time.perf_counter()
            loop(scheduler)
            times[name].append((time.perf_counter() - t0) / steps)
    return times


def step_text(times: dict[str, list[float]]) -> str:
    """The step microbenchmark's median and spread per scheduler, in µs."""
    return "; ".join(f"{name} {statistics.median(v) * 1e6:.0f} µs ({_spread(v, 1e6, 0)})" for name, v in times.items())


def targets(rows: list[Row]) -> str:
    """The issue's targets, read off the measured rows."""
    by_name = {row.name: row for row in rows}
    native = by_name["DDPMScheduler, diffusers' pipeline loop"]
    lines = []
    for covariance in ("none", "isotropic"):
        ratios = paired_ratios(by_name[f"MMGibbsScheduler drop-in, {covariance}"], native)
        over = statistics.median(ratios) - 1
        lines.append(
            f"* drop-in overhead per step, {covariance}: {over * 100:+.1f}% (paired spread "
            f"{(min(ratios) - 1) * 100:+.1f}% to {(max(ratios) - 1) * 100:+.1f}%); target <= 5%: "
            f"{'met' if over <= 0.05 else 'MISSED'}"
        )
    base = by_name["Gibbs pipeline, none"]
    for mode in ("reverse", "forward"):
        for k in (1, 2, 4):
            for row in rows:
                if row.name.startswith(f"diagonal, {mode}, K={k} "):
                    eq = statistics.median(paired_ratios(row, base))
                    lines.append(
                        f"* {row.name}: {eq:.2f} forward equivalents per level; target <= 1 + 2K = {1 + 2 * k}: "
                        f"{'met' if eq <= 1 + 2 * k else 'MISSED'}"
                    )
    return "\n".join(lines)


def row_record(row: Row) -> dict[str, Any]:
    """What a measured row keeps in the section's results file."""
    return {
        "name": row.name,
        "levels": row.levels,
        "passes": row.passes,
        "reference": row.reference,
        "seconds": row.seconds,
        "peak_mb": row.peak_mb,
    }


def rows_of(records: list[dict[str, Any]]) -> list[Row]:
    """Measured rows back from the results file (nothing to run)."""
    return [Row(r["name"], lambda: None, r["levels"], passes=r["passes"], reference=r["reference"],
                seconds=r["seconds"], peak_mb=r["peak_mb"]) for r in records]  # fmt: skip


def end_load() -> str:
    load = os.getloadavg()
    return f"Load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}."


def speed_section(args: Any, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``--section speed`` (module docstring); returns the section's results file (:func:`render_speed`)."""
    quick = getattr(args, "quick", False)
    levels = 2 if quick else args.speed_levels
    reps = 1 if quick else args.speed_reps
    full_levels = 1 if quick else max(1, levels // 2)
    batch = 8 if quick else args.speed_batch
    data: dict[str, Any] = {"section": "speed", "environment": environment(args.threads), "cases": []}
    for case in (digits_case(batch), sd_case()):
        log(f"{case.name}: {case.description}")
        rows = speed_rows(case, levels, full_levels, (1, 2) if quick else (1, 2, 4))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # functorch's "no batching rule" performance warnings, once per call
            measure(rows, reps, log=log)
        shape = (batch, 1, 8, 8) if case.full else (len(PROMPTS), 4, 16, 16)
        data["cases"].append(
            {
                "name": case.name,
                "description": case.description,
                "levels": levels,
                "full_levels": full_levels,
                "reps": reps,
                "full": case.full,
                "dim": case.dim,
                "shape": list(shape),
                "rows": [row_record(row) for row in rows],
                "steps": step_microbenchmark(case.native.scheduler.config, shape),
            }
        )
    data["end"] = end_load()
    return data


def render_speed(data: dict[str, Any]) -> str:
    """The speed section's markdown, from its results file alone."""
    parts = [f"### Speed and memory (`--section speed`)\n\n{data['environment']}.\n"]
    for case in data["cases"]:
        rows = rows_of(case["rows"])
        parts.append(
            f"#### {case['name']}\n\n{case['description']}; {case['levels']} levels per call ({case['full_levels']} "
            f"for `full`), {case['reps']} interleaved repetitions.\n\n"
            + table(rows, "ratio (drop-in: to DDPMScheduler; Gibbs: fwd-eq, to `none`)")
            + "\n\n"
            + targets(rows)
            + f"\n\nThe scheduler step alone on a {tuple(case['shape'])} sample: {step_text(case['steps'])}.\n"
            + (
                ""
                if case["full"]
                else f"\n`full` is not timed here: d = {case['dim']} Jacobian products per level (about "
                f"{2 * case['dim']} forward equivalents).\n"
            )
        )
    parts.append(data["end"])
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------ families
@dataclass
class Family:
    name: str
    build: Callable[[], Any]
    call: dict[str, Any]
    host_call: dict[str, Any] | None = None  # what the host's own loop gets, if not ``call``
    host_note: str = ""


def family_specs() -> list[Family]:
    """The tiny pipeline of every family (``tests/tiny_*.py``) and the host arguments of a guided call."""
    from tiny_dit import tiny_dit_pipeline
    from tiny_flux import tiny_flux_pipeline
    from tiny_pipelines import tiny_ddpm_pipeline, tiny_stable_diffusion_pipeline
    from tiny_pixart import tiny_pixart_pipeline
    from tiny_sd3 import tiny_sd3_pipeline
    from tiny_sdxl import tiny_sdxl_pipeline

    prompts = PROMPTS[:2]
    pixart = {"clean_caption": False, "use_resolution_binning": False, "max_sequence_length": 16}
    return [
        Family("unconditional (DDPM)", tiny_ddpm_pipeline, {"batch_size": 2}),
        Family("Stable Diffusion 1.x/2.x", tiny_stable_diffusion_pipeline, {"prompt": prompts, "guidance_scale": 5.0}),
        Family("SDXL", tiny_sdxl_pipeline, {"prompt": prompts, "guidance_scale": 5.0}),
        Family("SD3", tiny_sd3_pipeline, {"prompt": prompts, "guidance_scale": 5.0}),
        Family(
            "Flux (true CFG)",
            tiny_flux_pipeline,
            {"prompt": prompts, "negative_prompt": "", "true_cfg_scale": 4.0, "height": 16, "width": 16},
        ),
        Family(
            "DiT",
            tiny_dit_pipeline,
            {"class_labels": [1, 5], "guidance_scale": 4.0},
            {"class_labels": [1, 5], "guidance_scale": 1.0},
            " (no CFG: DiTPipeline's null class is 1000, the tiny model has 10 classes)",
        ),
        Family("PixArt-alpha", tiny_pixart_pipeline, {"prompt": prompts, "guidance_scale": 4.0, **pixart}),
    ]


FAMILY_COVARIANCES = ("none", "isotropic", "diagonal", "projection")


def families_section(args: Any, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``--section families`` (module docstring): issue 8's cost table; returns the section's results file."""
    quick = getattr(args, "quick", False)
    levels = 2 if quick else args.speed_levels
    reps = 1 if quick else args.speed_reps
    data: dict[str, Any] = {
        "section": "families",
        "environment": environment(args.threads),
        "levels": levels,
        "reps": reps,
        "families": [],
    }
    for spec in family_specs():
        host = spec.build()
        host.set_progress_bar_config(disable=True)
        gibbs = MomentMatchingGibbsPipeline.from_pipe(host, jacobian="reverse")
        gibbs.set_progress_bar_config(disable=True)
        model = gibbs.denoiser_model
        host_output = "np" if isinstance(host, DDPMPipeline) else "latent"
        call = dict(spec.call, num_inference_steps=levels)
        host_call = dict(spec.host_call or spec.call, num_inference_steps=levels)
        rows = [
            Row(
                "host" + spec.host_note,
                lambda h=host, c=host_call, o=host_output: h(**c, generator=_generator(), output_type=o),
                levels,
                passes="1 / 0 / 0",
            )
        ]
        for covariance in FAMILY_COVARIANCES:
            rows.append(
                Row(
                    covariance,
                    lambda g=gibbs, c=call, cov=covariance: g(
                        **c, covariance=cov, generator=_generator(), output_type="latent"
                    ),
                    levels,
                )
            )
        for row in rows:
            row.model = model
        log(f"{spec.name}: {type(model).__name__}")
        measure(rows, reps, log=log)
        data["families"].append(
            {
                "name": spec.name,
                "denoiser": f"{type(model).__name__} ({_params(model)})",
                "rows": [row_record(row) for row in rows],
            }
        )
    data["end"] = end_load()
    return data


def render_families(data: dict[str, Any]) -> str:
    """The families section's markdown, from its results file alone."""
    lines = [
        f"### Cost per level of every family (`--section families`)\n\n{data['environment']}. Tiny random-"
        f"weight pipelines of `tests/`, 2 images, guidance on (both branches in one batched call), {data['levels']} "
        f"levels per call, {data['reps']} interleaved repetitions; diagonal: reverse mode, one probe. `host` is the "
        "host pipeline's own loop with its own scheduler (`output_type='latent'`).\n",
        "| family | denoiser (parameters) | covariance | passes per level (fwd / bwd / jvp) | ms per level, median "
        "| spread | x `none` (paired) | peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for family in data["families"]:
        rows = rows_of(family["rows"])
        for row in rows:
            ratio = statistics.median(paired_ratios(row, rows[1]))
            lines.append(
                f"| {family['name']} | {family['denoiser']} | {row.name} | {row.passes} | "
                f"{statistics.median(row.seconds) * 1e3:.1f} | {_spread(row.seconds, 1e3, 1)} | {ratio:.2f} | "
                f"{row.peak_mb:.2f} |"
            )
    lines.append(f"\n{data['end']}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ latent-scale tables
#: SD 1.5's UNet config (runwayml/stable-diffusion-v1-5 unet/config.json), built with random weights
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
#: ``--quick``: a small UNet of the same layout and latent size (a smoke run, not a measurement)
QUICK_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "block_out_channels": (32, 64, 64, 64),
    "layers_per_block": 1,
    "attention_head_dim": 2,
}
#: the latent shapes the bytes are reported for: SD 1.5 at 512 px, SDXL at 1024 px
LATENT_SHAPES = {"SD 1.5, 512 px": (4, 64, 64), "SDXL, 1024 px": (4, 128, 128)}
#: (label, calibration settings) of the table structures measured
TABLE_STRUCTURES: list[tuple[str, dict[str, Any]]] = [
    ("low rank + diagonal, 16 clusters, rank 16, float32", {"structure": "low_rank", "num_clusters": 16}),
    ("low rank + diagonal, 16 clusters, rank 16, float16",
     {"structure": "low_rank", "num_clusters": 16, "dtype": torch.float16}),
    ("low rank + diagonal, 1 cluster, rank 16, float16",
     {"structure": "low_rank", "num_clusters": 1, "dtype": torch.float16}),
    ("stationary (Fourier), 16 clusters, float32", {"structure": "stationary", "num_clusters": 16}),
    ("stationary (Fourier), 1 cluster, float32", {"structure": "stationary", "num_clusters": 1}),
]  # fmt: skip
TABLE_LEVELS = 20  # the table of a 20-step schedule


def level_bytes(structure: str, shape: tuple[int, ...], num_clusters: int, rank: int = 16, element: int = 4) -> int:
    """Bytes of one calibrated level: low rank + diagonal, K d (rank + 2) numbers (centroids, factor, diagonal);
    stationary, K (d + 2 H (W / 2 + 1) C^2) (centroids and the complex root on the half spectrum)."""
    d = math.prod(shape)
    if structure == "low_rank":
        return num_clusters * d * (rank + 2) * element
    channels, height, width = shape
    return num_clusters * (d + 2 * height * (width // 2 + 1) * channels**2) * element


def synthetic_table(scheduler: MMGibbsScheduler, steps: int, shape: tuple[int, ...], **settings: Any) -> Any:
    """A table of the given structure for ``steps`` levels of ``scheduler``, through the calibration code itself
    but on 64 random samples and the exact denoiser of N(0, I) (mu = y / (1 + sigma^2)): its shapes, bytes and
    per-step cost are a real table's; its values only need to be finite."""
    from mmgibbs.calibration import calibrate_covariance

    scheduler.set_timesteps(steps)
    sigmas = scheduler.ve_sigmas()
    samples = torch.randn(64, *shape, generator=_generator())
    return calibrate_covariance(
        lambda y, i: y / (1 + sigmas[i] ** 2), sigmas, samples, rank=16, generator=_generator(), **settings
    )


def sd15_pipeline(seed: int = 0, config: dict[str, Any] | None = None) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline around a full-size SD 1.5 UNet with random weights (860 M parameters), the tests'
    tiny VAE and text encoder (unused: the calls pass 768-wide prompt embeddings) and SD's DDIM settings; its
    latents are 4 x 64 x 64 as SD 1.5's at 512 px."""
    from diffusers import DDIMScheduler
    from tiny_pipelines import SD_SCHEDULER_CONFIG, tiny_sd_components

    components = tiny_sd_components(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components["unet"] = UNet2DConditionModel(**(config or SD15_UNET_CONFIG)).eval()
    components["scheduler"] = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def table_steps(scheduler: Any, tables: dict[str, Any], shape: tuple[int, ...], steps: int, reps: int) -> dict:
    """The scheduler step alone on a fixed model output: the host's own scheduler and MMGibbsScheduler with each
    table (covariance calibrated / calibrated_stationary), seconds per step over ``reps`` interleaved loops."""
    out = torch.randn(1, *shape, generator=_generator())
    source = type(scheduler).__name__
    schedulers = {f"{source} (the host's)": scheduler}
    for label, table in tables.items():
        covariance = "calibrated" if table.structure == "low_rank" else "calibrated_stationary"
        ours = MMGibbsScheduler.from_config(scheduler.config, covariance=covariance, eta=0.0, source_scheduler=source)
        ours.set_covariance_table(table)
        schedulers[f"MMGibbsScheduler, {label}"] = ours
    return time_steps(schedulers, out, steps, reps)


def latent_section(args: Any, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``--section latent``: the calibrated tables at latent scale (module docstring); returns its results file."""
    quick = getattr(args, "quick", False)
    levels = 2
    reps = 1 if quick else 3
    data: dict[str, Any] = {"section": "latent", "environment": environment(args.threads), "levels": levels}
    # bytes: measured on SD 1.5-shaped tables, the formula checked against them, then SDXL's from the formula
    host = sd15_pipeline(config=QUICK_UNET_CONFIG if quick else None)
    shape = LATENT_SHAPES["SD 1.5, 512 px"]
    mm = MMGibbsScheduler.from_config(host.scheduler.config, source_scheduler="DDIMScheduler")
    tables, sizes = {}, []
    for label, settings in TABLE_STRUCTURES:
        log(f"table: {label}")
        table = synthetic_table(mm, levels, shape, **settings)
        element = (settings.get("dtype") or torch.float32).itemsize
        per_level = {name: level_bytes(settings["structure"], s, settings["num_clusters"], 16, element)
                     for name, s in LATENT_SHAPES.items()}  # fmt: skip
        assert table.nbytes == levels * per_level["SD 1.5, 512 px"], (label, table.nbytes)
        tables[label] = table
        sizes.append({"structure": label, "per_level": per_level})
    data["bytes"] = sizes
    data["table_levels"] = TABLE_LEVELS
    # the step alone, and one UNet forward, to put it against
    data["steps"] = table_steps(host.scheduler, tables, shape, levels, 5 if quick else 20)
    # whole loops: the host's pipeline with its DDIM, the same loop with the drop-in, the Gibbs pipeline
    embeds = torch.randn(1, 77, 768, generator=_generator())
    call = {"prompt_embeds": embeds, "guidance_scale": 1.0, "num_inference_steps": levels, "output_type": "latent"}
    main_table = TABLE_STRUCTURES[1][0]  # float16 low rank: the memory a latent model can afford
    drop_in = StableDiffusionPipeline(**{**host.components, "scheduler": MMGibbsScheduler.from_config(
        host.scheduler.config, covariance="calibrated", eta=0.0, source_scheduler="DDIMScheduler")})  # fmt: skip
    drop_in.scheduler.set_covariance_table(tables[main_table])
    drop_in.set_progress_bar_config(disable=True)
    gibbs = MomentMatchingGibbsPipeline.from_pipe(host, scheduler=drop_in.scheduler)
    gibbs.set_progress_bar_config(disable=True)
    stationary = MomentMatchingGibbsPipeline.from_pipe(
        host, scheduler=drop_in.scheduler, covariance="calibrated_stationary"
    )
    stationary.scheduler.set_covariance_table(tables[TABLE_STRUCTURES[3][0]])
    stationary.set_progress_bar_config(disable=True)
    native = "StableDiffusionPipeline, DDIMScheduler (the host)"
    rows = [
        Row(native, lambda: host(**call, generator=_generator()), levels, passes="1 / 0 / 0"),
        Row(f"StableDiffusionPipeline + MMGibbsScheduler drop-in, calibrated ({main_table})",
            lambda: drop_in(**call, generator=_generator()), levels, passes="1 / 0 / 0", reference=native),
        Row(f"MomentMatchingGibbsPipeline, calibrated ({main_table})",
            lambda: gibbs(**call, generator=_generator()), levels, reference=native),
        Row(f"MomentMatchingGibbsPipeline, calibrated_stationary ({TABLE_STRUCTURES[3][0]})",
            lambda: stationary(**call, generator=_generator()), levels, reference=native),
    ]  # fmt: skip
    log(f"SD 1.5 UNet ({_params(host.unet)} parameters): {len(rows)} rows x {reps + 1} calls x {levels} levels")
    measure(rows, reps, memory=False, log=log)
    data["sd15"] = {"unet": _params(host.unet), "rows": [row_record(row) for row in rows], "reps": reps}
    # the tiny families: a real (small) calibration each, the host's loop against both structures
    data["families"] = []
    for spec in family_specs():
        fam_host = spec.build()
        fam_host.set_progress_bar_config(disable=True)
        pipe = MomentMatchingGibbsPipeline.from_pipe(fam_host, eta=0.0)
        pipe.set_progress_bar_config(disable=True)
        call = dict(spec.call, num_inference_steps=4)
        probe = pipe(**call, covariance="none", output_type="latent").images
        rows_arg = {k: v for k, v in spec.call.items() if k not in ("batch_size",)}
        fam_tables = {}
        for covariance in ("calibrated", "calibrated_stationary"):
            if covariance == "calibrated_stationary" and probe.ndim != 4:
                continue  # Flux's packed latents are not image-shaped
            samples = torch.randn(8 * len(probe), *probe.shape[1:], generator=_generator())
            conditioning = {k: (v * 8 if isinstance(v, list) else v) for k, v in rows_arg.items()}
            fam_tables[covariance] = pipe.calibrate_covariance(
                4,
                samples=samples,
                generator=_generator(),
                num_clusters=2,
                rank=4,
                covariance=covariance,
                **conditioning,
            )
        host_output = "np" if isinstance(fam_host, DDPMPipeline) else "latent"
        host_call = dict(spec.host_call or spec.call, num_inference_steps=4)
        fam_rows = [Row("host" + spec.host_note, lambda h=fam_host, c=host_call, o=host_output: h(
            **c, generator=_generator(), output_type=o), 4, passes="1 / 0 / 0")]  # fmt: skip
        for covariance, table in fam_tables.items():

            def run(p=pipe, c=call, cov=covariance, t=table) -> Any:
                p.scheduler.set_covariance_table(t)
                return p(**c, covariance=cov, generator=_generator(), output_type="latent")

            fam_rows.append(Row(covariance, run, 4, reference=fam_rows[0].name))
        log(f"{spec.name}: {', '.join(fam_tables)}")
        measure(fam_rows, reps=1 if quick else 3, memory=False, log=log)
        data["families"].append({
            "name": spec.name,
            "shape": list(probe.shape[1:]),
            "rows": [row_record(row) for row in fam_rows],
            "bytes": {k: sum(lv.nbytes for lv in t.levels) // len(t.levels) for k, t in fam_tables.items()},
        })  # fmt: skip
    data["end"] = end_load()
    return data


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def render_latent(data: dict[str, Any]) -> str:
    """The latent section's markdown, from its results file alone."""
    shapes = list(LATENT_SHAPES)
    n = data["table_levels"]
    lines = [
        f"### Calibrated tables at latent scale (`--section latent`)\n\n{data['environment']}.\n",
        f"Table bytes (every tensor the table holds; a table for {n} levels holds {n} of them; SD 1.5 measured on "
        "tables built by the calibration code, SDXL from the same formula):\n",
        "| structure | " + " | ".join(f"per level, {s} | {n} levels, {s}" for s in shapes) + " |",
        "|---|" + "---|---|" * len(shapes),
    ]
    for size in data["bytes"]:
        cells = " | ".join(f"{_mb(size['per_level'][s])} | {_mb(n * size['per_level'][s])}" for s in shapes)
        lines.append(f"| {size['structure']} | {cells} |")
    sd = rows_of(data["sd15"]["rows"])
    host = sd[0]
    unet = statistics.median(host.seconds)
    steps = data["steps"]
    base = statistics.median(next(iter(steps.values())))
    lines += [
        "",
        f"The scheduler step alone on a (1, 4, 64, 64) latent (median of interleaved loops over {data['levels']} "
        "levels), and what it adds to a step of the SD 1.5 UNet below (one forward, batch 1: "
        f"{unet:.1f} s per level with the host's DDIM):\n",
        "| scheduler | ms per step | spread | per-step ratio to the host's loop (UNet + step) |",
        "|---|---|---|---|",
    ]
    for name, values in steps.items():
        m = statistics.median(values)
        lines.append(f"| {name} | {m * 1e3:.2f} | {_spread(values, 1e3, 2)} | {(unet - base + m) / unet:.4f} |")
    lines += [
        "",
        f"Whole loops on the SD 1.5 UNet config ({data['sd15']['unet']} parameters, random weights), batch 1, no "
        f"CFG (one forward per level, the smallest denominator), {data['levels']} levels per call, "
        f"{data['sd15']['reps']} interleaved repetitions after a warm-up call:\n",
        table(sd, "ratio to the host's loop (paired)"),
        "",
        "Tiny families (`tests/tiny_*.py`, random weights, guided as in `--section families`; 4 levels per call, "
        "tables of 2 clusters, rank 4, calibrated on random latents of the family's shape): ms per level and the "
        "table's bytes per level (its condition keys, once per table, not counted).\n",
        "| family | latents | row | ms per level, median | spread | x host (paired) | table bytes per level |",
        "|---|---|---|---|---|---|---|",
    ]
    for family in data["families"]:
        rows = rows_of(family["rows"])
        for row in rows:
            ratio = statistics.median(paired_ratios(row, rows[0]))
            size = family["bytes"].get(row.name)
            lines.append(
                f"| {family['name']} | {tuple(family['shape'])} | {row.name} | "
                f"{statistics.median(row.seconds) * 1e3:.1f} | {_spread(row.seconds, 1e3, 1)} | {ratio:.2f} | "
                f"{'' if size is None else _mb(size)} |"
            )
    lines.append(f"\n{data['end']}")
    return "\n".join(lines) + "\n"


#: section -> (measure: args -> results file, render: results file -> markdown)
SECTIONS: dict[str, tuple[Callable[..., dict[str, Any]], Callable[[dict[str, Any]], str]]] = {
    "speed": (speed_section, render_speed),
    "families": (families_section, render_families),
    "latent": (latent_section, render_latent),
}


def add_arguments(parser: Any) -> None:
    """The speed sections' options on ``benchmark.py``'s parser."""
    parser.add_argument("--speed-batch", type=int, default=128, help="speed: digits images per call")
    parser.add_argument("--speed-levels", type=int, default=4, help="speed/families: levels per timed call")
    parser.add_argument("--speed-reps", type=int, default=5, help="speed/families: interleaved repetitions")
