"""A/B comparison of a pipeline's own scheduler and the Gibbs sampler at equal model-evaluation budgets.

    from mmgibbs.compare import compare
    records = compare(pipe, prompts=["a photo of a cat"], steps=[10, 20], seeds=[0, 1], out_dir="ab")

For every budget B (model calls per sample) :func:`compare` runs

* the host: ``pipe`` itself with its own scheduler, ``num_inference_steps`` the largest n whose schedule makes at
  most B model calls (n = B for one-call-per-step schedulers; Heun-type schedulers get fewer steps), and
* the Gibbs sampler: ``MomentMatchingGibbsPipeline.from_pipe(pipe, **settings)`` with the settings asked for (default:
  :func:`mmgibbs.recommend.recommended_settings` for the family and B) over L = floor(B / (sweeps x c)) levels, where
  c is the settings' forward equivalents per level (:func:`cost_per_level`: 1 forward, plus 2 per Jacobian product
  in reverse or forward mode, 1 per product with finite differences),

on the same prompts and seeds, and records per sampler and budget the model calls it made (forwards, backward
passes and JVPs, counted, not planned; forward equivalents f + 2 (b + j)), the wall time, the peak memory
(:class:`PeakMemory`) and the quality measures it is given (:class:`FrechetDistance`, :class:`ClipScore`; a measure
that cannot be taken is ``None`` with a reason, never a made-up number). With ``out_dir`` it writes ``grid.png``
(rows: sampler x budget, columns: prompt / seed; the first image of every call), ``results.json`` and
``results.md``.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .families import Family, Unconditional, family_of, sample_shape
from .metrics import frechet_distance
from .moments import CALIBRATED_COVARIANCES
from .pipeline import MomentMatchingGibbsPipeline
from .recommend import recommended_settings
from .scheduler import MMGibbsScheduler

#: Jacobian products per level and sweep of each covariance (``d``: the sample's dimension)
PRODUCTS: dict[str, Callable[[int, int], int]] = {
    "diagonal": lambda probes, d: probes,
    "calibrated_jacobian": lambda probes, d: probes,
    "projection": lambda probes, d: 1,
    "full": lambda probes, d: d,
    "exact_diagonal": lambda probes, d: d,
}
#: families compare() does not run, and why
NOT_COMPARED = {
    "DiT": "is conditioned on class labels, not prompts: compare runs unconditional and text-to-image models."
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class NotMeasured(Exception):
    """A quality measure that cannot be taken here; the message is the reason written into the records."""


class QualityMeasure(Protocol):
    """A quality measure: ``measure(images, prompts)`` -> a float, or :class:`NotMeasured`. ``images`` are float
    NCHW in [0, 1]; ``prompts`` the prompt of every image (None for unconditional models). ``about`` says what it
    measures (written beside the value)."""

    about: str

    def __call__(self, images: torch.Tensor, prompts: list[str] | None) -> float: ...


# ------------------------------------------------------------------------------------------------ quality
def load_images(folder: str | os.PathLike) -> list[Image.Image]:
    """Every image file (``IMAGE_SUFFIXES``) directly in ``folder``, in name order, loaded."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    images = []
    for path in paths:
        with Image.open(path) as image:
            image.load()
            images.append(image.copy())
    return images


def to_tensor(images: Sequence[Image.Image], size: tuple[int, int], channels: int) -> torch.Tensor:
    """PIL images as float NCHW in [0, 1], resized (bicubic) to ``size`` = (height, width), grey or RGB."""
    mode = "L" if channels == 1 else "RGB"
    arrays = [
        np.asarray(im.convert(mode).resize((size[1], size[0]), Image.BICUBIC), dtype=np.float32) for im in images
    ]
    x = torch.from_numpy(np.stack(arrays)) / 255.0
    return x[:, None] if channels == 1 else x.permute(0, 3, 1, 2)


class FrechetDistance:
    """||m_a - m_b||^2 + tr(C_a + C_b - 2 (C_a^(1/2) C_b C_a^(1/2))^(1/2)) between Gaussian fits of ``features`` of
    the samples and of ``reference`` (:func:`mmgibbs.metrics.frechet_distance`, float64).

    Args:
        features: float NCHW images in [0, 1] -> (N, k) features (e.g. :func:`inception_features`).
        reference: reference images, float NCHW in [0, 1] or PIL images (resized to the samples' size and channels
            when first used).
        about: what the features and the reference are, for the records.
    """

    def __init__(
        self,
        features: Callable[[torch.Tensor], torch.Tensor],
        reference: torch.Tensor | Sequence[Image.Image],
        about: str,
    ):
        if len(reference) < 2:
            raise ValueError(
                f"`reference`: a Frechet distance needs at least 2 reference images; got {len(reference)}."
            )
        self.features, self.reference, self.about = features, reference, about
        self._reference_features: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, images: torch.Tensor, prompts: list[str] | None = None) -> float:
        if len(images) < 2:
            raise NotMeasured(f"a Frechet distance needs at least 2 samples; this run made {len(images)}")
        key = tuple(images.shape[1:])
        if key not in self._reference_features:
            ref = self.reference
            if not isinstance(ref, torch.Tensor):
                ref = to_tensor(ref, images.shape[2:], images.shape[1])
            self._reference_features[key] = self.features(ref)
        return frechet_distance(self.features(images), self._reference_features[key])


def inception_features(device: torch.device | str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """torchmetrics' FID Inception-v3 (2048-d pool features; needs ``torchmetrics[image]`` and its weights, which
    torchmetrics downloads once). Raises :class:`NotMeasured` saying what is missing."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as err:
        raise NotMeasured(
            f"Inception features need torchmetrics with its image extra (pip install 'torchmetrics[image]'): {err}"
        ) from None
    try:
        network = FrechetInceptionDistance(feature=2048, normalize=True).inception.eval().to(device)
    except Exception as err:  # no torch-fidelity/torchvision, or the weights cannot be fetched offline
        first = str(err).splitlines()[0] if str(err) else ""
        raise NotMeasured(
            f"torchmetrics' Inception network is not available here ({type(err).__name__}: {first})"
        ) from None

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        x = images if images.shape[1] == 3 else images.expand(-1, 3, -1, -1)
        return torch.cat([network((b * 255).round().byte().to(device)).cpu() for b in x.split(64)])

    return features


class ClipScore:
    """CLIP score, torchmetrics' definition: 100 x max(cos(E_image(x), E_text(prompt)), 0), averaged over images.

    ``ClipScore.from_pretrained(folder_or_id)`` loads a transformers ``CLIPModel`` and ``CLIPProcessor`` from local
    files only (a folder, or a Hub id already in the local cache).
    """

    def __init__(self, model: Any, processor: Any, about: str):
        self.model, self.processor, self.about = model.eval(), processor, about

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike) -> ClipScore:
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(name_or_path, local_files_only=True)
            processor = CLIPProcessor.from_pretrained(name_or_path, local_files_only=True)
        except (OSError, ValueError) as err:
            first = str(err).splitlines()[0] if str(err) else ""
            raise NotMeasured(
                f"CLIP model {name_or_path} is not available locally ({type(err).__name__}: {first})"
            ) from None
        return cls(model, processor, f"CLIP score with {name_or_path}")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str] | None) -> float:
        if prompts is None:
            raise NotMeasured("the model takes no prompt")
        pil = [
            Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8).squeeze()) for im in images
        ]
        inputs = self.processor(
            text=list(prompts), images=[p.convert("RGB") for p in pil], return_tensors="pt", padding=True,
            truncation=True,
        )  # fmt: skip
        device = next(self.model.parameters()).device
        image = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(device))
        text = self.model.get_text_features(
            input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device)
        )
        image, text = (getattr(f, "pooler_output", f) for f in (image, text))
        cosine = torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=-1)
        return float(100 * cosine.clamp(min=0).mean())


# ------------------------------------------------------------------------------------------------ cost
class PeakMemory:
    """The peak memory of a block, in MiB, above what was held at its start.

    CUDA: ``torch.cuda.max_memory_allocated`` (peak statistics reset at the start). CPU: the process's resident set
    size (``/proc/self/statm``), sampled every 5 ms by a thread; memory the process already holds from earlier work
    and reuses is not counted, so this is a lower bound on what the block needs. ``how`` says which; where neither
    can be read, ``mb`` is None."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.mb: float | None = None
        cuda = self.device.type == "cuda"
        if cuda:
            self.how = "torch.cuda.max_memory_allocated above the allocation at the start of each call"
        elif Path("/proc/self/statm").is_file():
            self.how = (
                "process resident set size (/proc/self/statm, sampled every 5 ms) above its value at the start of "
                "each call; memory already held from earlier calls and reused is not counted"
            )
        else:
            self.how = "not measured: no CUDA device and no /proc/self/statm on this system"

    @staticmethod
    def _rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        self._stop = threading.Event()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif self.how.startswith("process"):
            self._start = self._peak = self._rss()

            def watch() -> None:
                while not self._stop.wait(0.005):
                    self._peak = max(self._peak, self._rss())

            self._thread = threading.Thread(target=watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
        elif self.how.startswith("process"):
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._rss())
            self.mb = (self._peak - self._start) / 2**20


def cost_per_level(scheduler: MMGibbsScheduler, dim: int | None = None) -> int:
    """Forward equivalents one level costs with ``scheduler``'s settings: sweeps x (1 + 2 p) for p Jacobian
    products in reverse mode (``auto``) or forward mode (2 p there: the first JVP gives the mean), sweeps x (1 + p)
    with finite differences; ``dim`` (the sample's dimension) is needed for ``full`` / ``exact_diagonal``."""
    cfg = scheduler.config
    count = PRODUCTS.get(cfg.covariance)
    if count is not None and cfg.covariance in ("full", "exact_diagonal") and dim is None:
        raise ValueError(f"covariance={cfg.covariance!r}: the budget needs the sample's dimension d (d products).")
    products = 0 if count is None else count(cfg.num_probes, dim or 0)
    if cfg.jacobian == "finite_difference":
        per_sweep = 1 + products
    elif cfg.jacobian == "forward" and products:
        per_sweep = 2 * products
    else:
        per_sweep = 1 + 2 * products
    return cfg.gibbs_sweeps * per_sweep


def levels_for_budget(scheduler: MMGibbsScheduler, budget: int, dim: int | None = None) -> int:
    """The most levels whose cost (:func:`cost_per_level`) fits in ``budget`` forward equivalents; an error naming
    the budget when not even one level fits."""
    per_level = cost_per_level(scheduler, dim)
    if per_level > budget:
        raise ValueError(
            f"`steps`: a budget of {budget} model calls is below one level of covariance="
            f"{scheduler.config.covariance!r} with {scheduler.config.gibbs_sweeps} sweep(s) ({per_level} forward "
            "equivalents per level); raise the budget or choose a cheaper covariance."
        )
    return budget // per_level


def host_steps(scheduler: Any, budget: int) -> int:
    """The largest ``num_inference_steps`` whose schedule has at most ``budget`` timesteps (one model call each);
    ``budget`` itself when the scheduler cannot lay out its schedule alone (e.g. Flux's dynamic shifting)."""
    probe = copy.deepcopy(scheduler)
    for n in range(budget, 0, -1):
        try:
            probe.set_timesteps(n)
        except Exception:  # needs arguments only its pipeline knows (mu, device, ...)
            return budget
        if len(probe.timesteps) <= budget:
            return n
    return 1


def forward_equivalents(forward: int, backward: int, jvp: int) -> int:
    """f + 2 (b + j): a backward pass or a JVP counted as two forwards."""
    return forward + 2 * (backward + jvp)


# ------------------------------------------------------------------------------------------------ the run
def _host_and_family(pipe: DiffusionPipeline) -> tuple[DiffusionPipeline, type[Family]]:
    """The host pipeline with its own scheduler, and its family. A ``MomentMatchingGibbsPipeline`` (e.g. a saved,
    calibrated one) is compared against its host pipeline class over its components with the scheduler its config
    came from (``source_scheduler``)."""
    if not isinstance(pipe, MomentMatchingGibbsPipeline):
        return pipe, family_of(type(pipe).__name__)
    import diffusers

    cfg = pipe.scheduler.config
    if cfg.schedule == "single_level":
        raise ValueError("`pipe`: a single-level model has no host sampler to compare against.")
    family = family_of(pipe.config.host_pipeline, pipe.denoiser_model)
    host_name = pipe.config.host_pipeline or "DDPMPipeline"
    host_class = getattr(diffusers, host_name)
    source = getattr(diffusers, cfg.source_scheduler or "DDPMScheduler")
    wanted = inspect.signature(host_class.__init__).parameters
    parts = {k: v for k, v in pipe.components.items() if k in wanted and k != "scheduler" and v is not None}
    # components the host requires that the Gibbs pipeline holds none of (SD's safety checker): None, as
    # from_pretrained(..., safety_checker=None) passes them
    missing = [
        k
        for k, p in list(wanted.items())[1:]
        if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    parts |= {k: None for k in missing if k not in parts and k != "scheduler" and k not in pipe.config.host_config}
    host = host_class(**parts, scheduler=source.from_config(cfg), **pipe.config.host_config)
    return host, family


def _denoiser(pipe: DiffusionPipeline) -> torch.nn.Module:
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def _label(record: dict[str, Any]) -> str:
    return (
        f"{record['label']}, {record['num_inference_steps']} {record['unit']} ({record['forward_equivalents']} calls)"
    )


def _as_images(images: Any) -> torch.Tensor:
    """A pipeline's ``output_type="np"`` images (NHWC in [0, 1]) as float NCHW in [0, 1] on the CPU."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    return x.permute(0, 3, 1, 2).clamp(0, 1)


def _check(prompts: Any, steps: Any, seeds: Any, num_samples: Any, grid_images: Any, family: type[Family]) -> None:
    if family.__name__ in NOT_COMPARED:
        raise ValueError(f"`pipe`: {family.name} {NOT_COMPARED[family.__name__]}")
    if family is Unconditional and prompts is not None:
        raise ValueError("`prompts`: this unconditional model takes no prompt.")
    if family is not Unconditional and (
        not prompts or isinstance(prompts, str) or not all(isinstance(p, str) and p for p in prompts)
    ):
        raise ValueError(
            f"`prompts` must be a non-empty list of non-empty strings for {family.name}; got {prompts!r}."
        )
    ints = (steps, "steps"), (seeds, "seeds")
    for values, name in ints:
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"`{name}` must be a non-empty list of integers; got {values!r}.")
        if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in values):
            raise ValueError(f"`{name}` must hold integers; got {values!r}.")
    if any(s < 1 for s in steps) or len(set(steps)) != len(steps):
        raise ValueError(f"`steps` must be distinct budgets >= 1 (model calls per sample); got {list(steps)}.")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"`seeds` must be distinct; got {list(seeds)}.")
    for value, name in ((num_samples, "num_samples"), (grid_images, "grid_images")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")


def table_call_arguments(
    pipe: DiffusionPipeline, settings: Sequence[Mapping[str, Any]], call_arguments: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The call arguments of both samplers: ``call_arguments`` with the guidance settings the pipeline's covariance
    table was fitted with filled in, where a Gibbs run reads the table (a table serves one guidance scale, so the
    host is compared at it too); a different value passed is a ``ValueError`` naming it."""
    out = dict(call_arguments or {})
    table = pipe.scheduler.covariance_table if isinstance(pipe, MomentMatchingGibbsPipeline) else None
    if table is None or not any(s.get("covariance") in CALIBRATED_COVARIANCES for s in settings):
        return out
    for key, value in (table.settings.get("guidance") or {}).items():
        if value is None:
            continue
        if key not in out:
            out[key] = value
        elif out[key] != value:
            raise ValueError(
                f"`{key}`={out[key]}: the pipeline's covariance table was calibrated with {key}={value}, and a table "
                f"serves one guidance setting: compare at {value} (leave `{key}` out), or calibrate for {out[key]}."
            )
    return out


def plan(
    pipe: DiffusionPipeline,
    prompts: Sequence[str] | None,
    steps: Sequence[int],
    gibbs_settings: Mapping[str, Any] | None,
    seeds: Sequence[int],
    num_samples: int = 1,
    grid_images: int = 16,
    call_arguments: Mapping[str, Any] | None = None,
) -> tuple[DiffusionPipeline, type[Family], list[tuple[int, int, dict[str, Any], int, Any]]]:
    """:func:`compare`'s arguments checked and every sampler and budget laid out, before any model call: the host
    pipeline, the family and per budget (budget, host steps, Gibbs settings, Gibbs levels, the Gibbs scheduler's
    config); ``call_arguments`` against the table's guidance (:func:`table_call_arguments`). A clear ``ValueError``
    naming the argument otherwise."""
    host, family = _host_and_family(pipe)
    _check(None if prompts is None else list(prompts), steps, seeds, num_samples, grid_images, family)
    source = pipe.scheduler if isinstance(pipe, MomentMatchingGibbsPipeline) else host.scheduler
    table = getattr(source, "covariance_table", None)
    structure = "low_rank" if table is None else table.structure
    dim = math.prod(sample_shape(_denoiser(host))) if family is Unconditional else None
    plans = []
    for budget in steps:
        if gibbs_settings is not None:
            settings = dict(gibbs_settings)
        else:
            settings = recommended_settings(family, budget, calibrated=table is not None, structure=structure)
        scheduler = MMGibbsScheduler.from_scheduler(source, **settings)
        levels = levels_for_budget(scheduler, budget, dim)
        plans.append((budget, host_steps(host.scheduler, budget), settings, levels, scheduler.config))
    table_call_arguments(pipe, [p[2] for p in plans], call_arguments)
    return host, family, plans


def compare(
    pipe: DiffusionPipeline,
    *,
    prompts: Sequence[str] | None = None,
    steps: Sequence[int] = (10, 20),
    gibbs_settings: Mapping[str, Any] | None = None,
    seeds: Sequence[int] = (0, 1, 2, 3),
    num_samples: int = 1,
    quality: Mapping[str, QualityMeasure | str] | None = None,
    out_dir: str | os.PathLike | None = None,
    call_arguments: Mapping[str, Any] | None = None,
    progress: bool = True,
    model_name: str | None = None,
    grid_images: int = 16,
) -> list[dict[str, Any]]:
    """The host pipeline's own scheduler against the Gibbs sampler at equal budgets (module docstring).

    Args:
        pipe: a supported diffusers pipeline (``DDPMPipeline``, ``StableDiffusionPipeline``, ...) with its own
            scheduler, or a ``MomentMatchingGibbsPipeline`` (compared against its host and source scheduler).
        prompts: the prompts of a text-to-image model (None for an unconditional one).
        steps: the budgets, model calls per sample.
        gibbs_settings: ``MMGibbsScheduler`` settings for every budget (``covariance``, ``eta``, ``gibbs_sweeps``,
            ``num_probes``, ``jacobian``, ...); default: :func:`mmgibbs.recommend.recommended_settings` per budget.
        seeds: one call per prompt and seed (``torch.Generator().manual_seed(seed)``), the same for both samplers.
        num_samples: images per call (``batch_size`` or ``num_images_per_prompt``); quality is measured over all
            images of a sampler and budget.
        quality: name -> measure (``{"fd": FrechetDistance(...), "clip_score": ClipScore(...)}``), or name -> the
            reason it is not measured; default: both not measured, with the reason.
        out_dir: where to write ``grid.png``, ``results.json`` and ``results.md`` (created; None: nothing written).
        call_arguments: further host arguments for every call of both samplers (``guidance_scale``, ``height``, ...).
        progress: one progress bar over all calls (the pipelines' own bars are off).
        model_name: how the model is named in ``results.md`` / ``results.json`` (default: the pipeline class).
        grid_images: a grid cell shows the first ``min(num_samples, grid_images)`` images of its call, tiled.

    Returns one record per sampler and budget (host first at each budget): ``sampler`` ("host" or "mmgibbs"),
    ``label``, ``budget``, ``num_inference_steps``, ``settings``, ``model_calls`` (forward / backward / jvp per
    call, counted), ``forward_equivalents``, ``seconds`` (all calls), ``peak_memory_mb``, and per quality measure its
    value (None when not measured) with ``<name>_about`` or ``<name>_reason``.
    """
    host, family, plans = plan(pipe, prompts, steps, gibbs_settings, seeds, num_samples, grid_images, call_arguments)
    prompts = None if prompts is None else list(prompts)
    call_arguments = table_call_arguments(pipe, [p[2] for p in plans], call_arguments)
    text = prompts is not None
    if quality is None:
        quality = {"fd": "no reference images given", "clip_score": "no CLIP model given"}
    if not text and "clip_score" in quality:
        quality = {**quality, "clip_score": "the model takes no prompt"}

    device = torch.device(getattr(host, "device", "cpu"))
    columns = [(p, s) for p in (prompts or [None]) for s in seeds]
    bar_config = getattr(host, "_progress_bar_config", None)
    host.set_progress_bar_config(disable=True)
    from tqdm.auto import tqdm

    bar = tqdm(total=2 * len(plans) * len(columns), desc="compare", disable=not progress)
    denoiser = _denoiser(host)

    def run(sampler: DiffusionPipeline, n: int, prompt: str | None, seed: int, counted: bool = True) -> tuple:
        kwargs: dict[str, Any] = {**call_arguments, "num_inference_steps": n, "output_type": "np"}
        kwargs["generator"] = torch.Generator("cpu").manual_seed(int(seed))
        if prompt is None:
            kwargs["batch_size"] = num_samples
        else:
            kwargs.update(prompt=prompt, num_images_per_prompt=num_samples)
        calls: list[int] = []
        hook = denoiser.register_forward_pre_hook(lambda *_: calls.append(1))
        memory = PeakMemory(device)
        try:
            with memory:
                start = time.perf_counter()
                out = sampler(**kwargs)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - start
        finally:
            hook.remove()
        counts = getattr(out, "num_forward", None)
        if counts is None:
            model_calls = {"forward": len(calls), "backward": 0, "jvp": 0}
        else:
            model_calls = {"forward": out.num_forward, "backward": out.num_backward, "jvp": out.num_jvp}
        bar.update(int(counted))
        return _as_images(out.images), model_calls, seconds, memory

    records: list[dict[str, Any]] = []
    cells: list[list[Image.Image]] = []
    try:
        first = columns[0]
        run(host, 1, first[0], first[1], counted=False)  # warm-up, not recorded: one-time costs out of the timings
        for budget, n_host, settings, levels, cfg in plans:
            gibbs = MomentMatchingGibbsPipeline.from_pipe(pipe, **settings)
            gibbs.set_progress_bar_config(disable=True)
            host_label = f"{type(host).__name__} + {type(host.scheduler).__name__}"
            gibbs_label = "MMGibbs: " + ", ".join(f"{k}={v}" for k, v in settings.items())
            unit = "sweeps" if cfg.schedule == "single_level" else "levels"
            runs = [
                ("host", host_label, host, n_host, {"scheduler": type(host.scheduler).__name__}, "steps"),
                ("mmgibbs", gibbs_label, gibbs, levels, settings, unit),
            ]
            for sampler, label, pipeline, n, used, unit in runs:
                images, row, prompt_of, seconds, peaks, counts = [], [], [], 0.0, [], None
                for prompt, seed in columns:
                    x, calls, s, memory = run(pipeline, n, prompt, seed)
                    images.append(x)
                    row.append(_tile(x[:grid_images]))
                    prompt_of += [prompt] * len(x)
                    seconds += s
                    peaks.append(memory.mb)
                    counts = calls if counts is None else {k: max(counts[k], calls[k]) for k in calls}
                record: dict[str, Any] = {
                    "sampler": sampler,
                    "label": label,
                    "budget": budget,
                    "num_inference_steps": n,
                    "unit": unit,
                    "settings": dict(used),
                    "call_arguments": _plain(call_arguments),
                    "model_calls": counts,
                    "forward_equivalents": forward_equivalents(counts["forward"], counts["backward"], counts["jvp"]),
                    "num_images": sum(len(x) for x in images),
                    "seconds": seconds,
                    "peak_memory_mb": None if any(p is None for p in peaks) else max(peaks),
                    "peak_memory_how": memory.how,
                }
                samples = torch.cat(images)
                for name, measure in quality.items():
                    record[name], reason = None, measure if isinstance(measure, str) else None
                    if reason is None:
                        try:
                            record[name] = float(measure(samples, prompt_of if text else None))
                            record[f"{name}_about"] = measure.about
                        except NotMeasured as err:
                            reason = str(err)
                    if reason is not None:
                        record[f"{name}_reason"] = reason
                records.append(record)
                cells.append(row)
    finally:
        bar.close()
        if bar_config is not None:
            host._progress_bar_config = bar_config
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        names = [f"{p[:24]} / seed {s}" if p is not None else f"seed {s}" for p, s in columns]
        labelled_grid(cells, [_label(r) for r in records], names).save(out / "grid.png")
        about = {
            "model": model_name or type(pipe).__name__,
            "family": family.name,
            "prompts": prompts,
            "seeds": list(seeds),
            "num_samples": num_samples,
            "device": str(device),
            "torch": torch.__version__,
            "call_arguments": _plain(call_arguments),
        }
        (out / "results.json").write_text(json.dumps({**about, "records": records}, indent=1) + "\n")
        (out / "results.md").write_text(results_markdown(records, about))
    return records


# ------------------------------------------------------------------------------------------------ outputs
def _plain(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The call arguments a results file can hold (numbers, strings, booleans)."""
    return {k: v for k, v in arguments.items() if isinstance(v, (int, float, str, bool))}


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).convert("RGB")


def _tile(images: torch.Tensor) -> Image.Image:
    """k images (float NCHW in [0, 1]) as one square-ish tile, one pixel apart on grey."""
    k, _, h, w = images.shape
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    tile = Image.new("RGB", (cols * (w + 1) - 1, rows * (h + 1) - 1), (128, 128, 128))
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        tile.paste(_to_pil(image), (c * (w + 1), r * (h + 1)))
    return tile


def labelled_grid(rows: list[list[Image.Image]], row_labels: list[str], column_labels: list[str]) -> Image.Image:
    """diffusers' ``make_image_grid`` of ``rows`` (equal-size images; upscaled to at least 96 px with nearest
    pixels, 3 px apart), with a label left of every row and above every column (PIL's default font)."""
    from diffusers.utils import make_image_grid

    width, height = rows[0][0].size
    scale = max(1, math.ceil(96 / min(width, height)))
    gap = 3
    cells = [
        ImageOps.expand(im.resize((width * scale, height * scale), Image.NEAREST), border=gap, fill="white")
        for row in rows
        for im in row
    ]
    grid = make_image_grid(cells, rows=len(rows), cols=len(rows[0]))
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(grid)
    left = 8 + max(int(measure.textlength(label, font=font)) for label in row_labels)
    top = 20
    canvas = Image.new("RGB", (left + grid.width, top + grid.height), "white")
    canvas.paste(grid, (left, top))
    draw = ImageDraw.Draw(canvas)
    cell_w, cell_h = width * scale + 2 * gap, height * scale + 2 * gap
    for j, label in enumerate(column_labels):
        draw.text((left + j * cell_w + 2, 4), label, fill="black", font=font)
    for i, label in enumerate(row_labels):
        draw.text((4, top + i * cell_h + cell_h // 2 - 6), label, fill="black", font=font)
    return canvas


def _value(record: dict[str, Any], name: str, digits: int = 3) -> str:
    value = record.get(name)
    return "not measured" if value is None else f"{value:.{digits}f}"


def results_markdown(records: list[dict[str, Any]], about: Mapping[str, Any]) -> str:
    """The records as a markdown table, with what was run and why a quality measure is missing."""
    measures = [k for k in records[0] if f"{k}_about" in records[0] or f"{k}_reason" in records[0]]
    head = "| sampler | budget | steps / levels | forward | backward | JVP | forward equivalents | wall s | peak MiB |"
    head += "".join(f" {m} |" for m in measures)
    lines = [
        f"# A/B: {about['model']}",
        "",
        f"Family: {about['family']}. Prompts: {about['prompts'] or 'none (unconditional)'}; seeds {about['seeds']}; "
        f"{about['num_samples']} image(s) per call; device {about['device']}, torch {about['torch']}.",
        "",
        "Model calls are counted per call (batched; with classifier-free guidance both branches are one call). "
        "Forward equivalents: forward + 2 x (backward + JVP). Wall time: all calls of the row.",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in records:
        calls = r["model_calls"]
        memory = "not measured" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.1f}"
        lines.append(
            f"| {r['label']} | {r['budget']} | {r['num_inference_steps']} {r['unit']} | {calls['forward']} | "
            f"{calls['backward']} | {calls['jvp']} | {r['forward_equivalents']} | {r['seconds']:.2f} | {memory} |"
            + "".join(f" {_value(r, m)} |" for m in measures)
        )
    lines += ["", f"Peak memory: {records[0]['peak_memory_how']}."]
    for m in measures:
        abouts = {r[f"{m}_about"] for r in records if f"{m}_about" in r}
        reasons = {r[f"{m}_reason"] for r in records if f"{m}_reason" in r}
        for text in sorted(abouts):
            lines.append(f"`{m}`: {text}, over the row's {records[0]['num_images']} images.")
        for text in sorted(reasons):
            lines.append(f"`{m}` not measured: {text}.")
    lines += ["", "![grid](grid.png)", ""]
    return "\n".join(lines)


__all__ = [
    "ClipScore",
    "FrechetDistance",
    "NotMeasured",
    "PeakMemory",
    "compare",
    "cost_per_level",
    "forward_equivalents",
    "host_steps",
    "inception_features",
    "labelled_grid",
    "levels_for_budget",
    "load_images",
    "plan",
    "results_markdown",
]
