"""Speed and memory of the sampler, measured; the ``speed`` and ``families`` sections of ``benchmark.py``.

    python examples/benchmark.py --section speed      # digits UNet + an SD-shaped conditional UNet with CFG
    python examples/benchmark.py --section families   # a tiny model of every family, CFG on (cost per level)

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
    by_name = {row.name: row for row in rows}
    lines = [
        f"| setting | passes per level (fwd / bwd / jvp) | ms per level, median | spread | {ratio_label} | peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = ""
        if row.reference is not None:
            ratios = paired_ratios(row, by_name[row.reference])
            ratio = f"{statistics.median(ratios):.3f} ({_spread(ratios)})"
        lines.append(
            f"| {row.name} | {row.passes} | {statistics.median(row.seconds) * 1e3:.1f} | "
            f"{_spread(row.seconds, 1e3, 1)} | {ratio} | {row.peak_mb:.1f} |"
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


#: section -> (measure: args -> results file, render: results file -> markdown)
SECTIONS: dict[str, tuple[Callable[..., dict[str, Any]], Callable[[dict[str, Any]], str]]] = {
    "speed": (speed_section, render_speed),
    "families": (families_section, render_families),
}


def add_arguments(parser: Any) -> None:
    """The speed sections' options on ``benchmark.py``'s parser."""
    parser.add_argument("--speed-batch", type=int, default=128, help="speed: digits images per call")
    parser.add_argument("--speed-levels", type=int, default=4, help="speed/families: levels per timed call")
    parser.add_argument("--speed-reps", type=int, default=5, help="speed/families: interleaved repetitions")
