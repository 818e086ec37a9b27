"""MomentMatchingGibbsPipeline: the moment-matching Gibbs sampler around any pretrained diffusers denoiser.

For each of the scheduler's levels x sweeps steps at timestep t (sigma = s_t / alpha_t):

    y = x_t / alpha_t                                  (the variance-exploding frame)
    mu, Sigma = moments of the model's denoiser at y   (``mmgibbs.covariances``, Jacobian covariances included)
    x ~ N(mu, Sigma), re-noised to the next level      (``mmgibbs.gibbs``, the one kernel)

The pipeline only adapts. A model family (``mmgibbs.families``) turns the host pipeline's usual arguments (prompt,
guidance, size, latents, ...) into a denoiser closure, calling the host's own methods for prompt encoding, latent
preparation and decoding; :meth:`MMGibbsScheduler.denoiser` makes the frame change; :func:`mmgibbs.gibbs.sample`
runs the chain with the scheduler's covariance estimator (``mmgibbs.covariances``) and settings.

    pipe = MomentMatchingGibbsPipeline.from_pipe(StableDiffusionPipeline.from_pretrained(...))
    pipe("a photo of a cat", covariance="diagonal", num_inference_steps=30).images
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import diffusers
import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from . import gibbs
from .calibration import SIGMA_RTOL, TABLE_FILE, CovarianceTable, calibrate_covariance
from .checks import (
    UNSET,
    Unset,
    check_calibration,
    check_choice,
    check_generator,
    check_host_arguments,
    check_number,
    check_samples,
    check_scheduler,
    check_steps,
    check_tensor,
)
from .covariances import CALIBRATED_COVARIANCES, COVARIANCES, ESTIMATORS
from .families import FAMILIES, Family, Unconditional, check_denoiser, family_of, sample_shape
from .families.base import DEFAULT_STEPS, condition_of, work_dtype
from .scheduler import MMGibbsScheduler
from .streaming import Shards, stream_covariance

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
#: the host components this pipeline can hold (the union over the supported families)
COMPONENTS = (
    "unet",
    "transformer",
    "vae",
    "vqvae",
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
    "text_encoder_3",
    "tokenizer_3",
    "safety_checker",
    "feature_extractor",
    "image_encoder",
)
#: the per-call Gibbs settings (overrides of the scheduler's config)
GIBBS_SETTINGS = (
    "covariance",
    "num_probes",
    "gibbs_sweeps",
    "transition",
    "eta",
    "mean_order",
    "corrector",
    "final_output",
    "jacobian",
    "product_batch",
    "variance_bound",
)
#: names a family's ``prepare`` takes from the pipeline itself, not from the caller (they collided with a TypeError)
NOT_CALL_ARGUMENTS = {
    "device": "the pipeline runs where its components are (move them with `pipe.to(device)`, or offload with "
    "`pipe.enable_model_cpu_offload()`)",
    "scheduler": "set it with `from_pipe(pipe, scheduler=...)` or `pipe.scheduler = ...`",
}
#: call arguments a calibration refuses, and why
NOT_CALIBRATION_ARGUMENTS = {
    "latents": "the calibration draws its own noise (clean samples are `samples`)",
    "x_init": "clean samples are `samples`",
    "num_images_per_prompt": "calibration takes one conditioning row per clean sample",
    "image": "calibrate text-to-image: image-to-image and inpainting chains read the same levels",
    "mask_image": "calibrate text-to-image: image-to-image and inpainting chains read the same levels",
    "masked_image_latents": "calibrate text-to-image: image-to-image and inpainting chains read the same levels",
    "strength": "calibrate text-to-image: image-to-image and inpainting chains read the same levels",
}
#: sample numbers (N x d) above which ``calibrate_covariance`` streams by default (``mmgibbs.streaming``)
STREAM_ABOVE = 2**24
#: the streaming fit's default subsample for the clusters (``calibrate_covariance(cluster_samples=...)``)
DEFAULT_CLUSTER_SAMPLES = 4096
#: the self-sampling run's steps with the host's own scheduler (``calibrate_covariance``, conditional families)
DEFAULT_HOST_SAMPLER_STEPS = 100
#: what a saved folder needs so that ``DiffusionPipeline.from_pretrained`` finds this class (diffusers' custom
#: pipeline convention: ``"_class_name": [<file in the folder>, <class>]``)
COMMUNITY_FILE = "mmgibbs_pipeline"
COMMUNITY_SOURCE = '''"""diffusers-mmgibbs: the custom-pipeline entry point diffusers loads for this folder.

Needs `pip install diffusers-mmgibbs`; load with `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.
"""

from mmgibbs.pipeline import MomentMatchingGibbsPipeline, MomentMatchingGibbsPipelineOutput

__all__ = ["MomentMatchingGibbsPipeline", "MomentMatchingGibbsPipelineOutput"]
'''


@dataclass
class MomentMatchingGibbsPipelineOutput(ImagePipelineOutput):
    """Images (or samples) plus the cost of drawing them.

    Args:
        images: PIL images, a numpy array or a tensor, as ``output_type`` asks.
        num_forward: batched model forward passes.
        num_backward: batched backward passes (reverse-mode Jacobian products).
        num_jvp: batched forward-mode Jacobian-vector products.
        num_product_passes: the model passes that computed the Jacobian products (one per product, or one per
            batch of ``product_batch`` products).
    """

    num_forward: int = 0
    num_backward: int = 0
    num_jvp: int = 0
    num_product_passes: int = 0


class MomentMatchingGibbsPipeline(DiffusionPipeline):
    """Moment Matching Denoising Gibbs Sampling (Zhang et al., NeurIPS 2023) with any supported diffusers model.

    Build it from a pipeline you already have (no weights are copied):
    ``MomentMatchingGibbsPipeline.from_pipe(pipe, covariance="diagonal")``, or directly from an unconditional
    denoiser: ``MomentMatchingGibbsPipeline(unet=unet, scheduler=scheduler)``.

    Args:
        unet: the denoiser of UNet families (``UNet2DModel``, ``UNet2DConditionModel``, or, unconditional, any
            diffusers model called as ``model(sample, timestep)`` that declares ``sample_shape`` or has
            ``in_channels`` and ``sample_size`` in its config, e.g. :class:`GaussianMixtureDenoiser`), or an energy
            model (:class:`mmgibbs.EnergyModel`, e.g. ``NetworkEnergy``: forward returns one energy per sample; its
            Jacobian products are Hessian-vector products, ``mmgibbs.energy``).
        scheduler: an :class:`MMGibbsScheduler`; any other diffusers scheduler is converted with
            ``MMGibbsScheduler.from_config`` (so a saved DDPM pipeline folder loads directly).
        transformer, vae, vqvae, text_encoder(_2, _3), tokenizer(_2, _3), safety_checker, feature_extractor,
            image_encoder: the host pipeline's other components, as the host names them.
        host_pipeline: the diffusers pipeline class whose methods prepare prompts, latents and images (set by
            :meth:`from_pipe`); ``None`` for an unconditional denoiser.
        host_config: the host pipeline's own config values (e.g. ``requires_safety_checker``).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->image_encoder->unet->transformer->vae"
    _optional_components: ClassVar[list[str]] = [*COMPONENTS, "scheduler"]  # all are, but one denoiser is needed
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents", "sample", "mu"]

    def __init__(
        self,
        unet: ModelMixin | None = None,
        scheduler: SchedulerMixin | None = None,
        transformer: ModelMixin | None = None,
        vae: ModelMixin | None = None,
        vqvae: ModelMixin | None = None,
        text_encoder: Any = None,
        tokenizer: Any = None,
        text_encoder_2: Any = None,
        tokenizer_2: Any = None,
        text_encoder_3: Any = None,
        tokenizer_3: Any = None,
        safety_checker: Any = None,
        feature_extractor: Any = None,
        image_encoder: Any = None,
        host_pipeline: str | None = None,
        host_config: dict[str, Any] | None = None,
    ):
        super().__init__()
        check_scheduler(scheduler)
        scheduler = MMGibbsScheduler.from_scheduler(scheduler)
        denoiser = unet if unet is not None else transformer
        if denoiser is None:
            raise ValueError("Pass the denoiser as `unet` (UNet families) or `transformer` (DiT, SD3, Flux, PixArt).")
        argument = "unet" if unet is not None else "transformer"
        if not isinstance(denoiser, ModelMixin):
            raise ValueError(
                f"`{argument}` must be a diffusers model (ModelMixin, e.g. UNet2DModel); got a "
                f"{type(denoiser).__name__}."
            )
        if host_pipeline is not None and not hasattr(diffusers, host_pipeline):
            raise ValueError(f"`host_pipeline` {host_pipeline!r} is not a diffusers pipeline class.")
        # clear errors now for an unsupported pipeline or model, or a denoiser the host's family cannot call
        check_denoiser(family_of(host_pipeline, denoiser), denoiser, argument)
        self.register_modules(
            unet=unet,
            scheduler=scheduler,
            transformer=transformer,
            vae=vae,
            vqvae=vqvae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self.register_to_config(host_pipeline=host_pipeline, host_config=dict(host_config or {}))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs: Any) -> MomentMatchingGibbsPipeline:
        """The Gibbs sampler over ``pipeline``'s own components (shared, not copied).

        ``kwargs`` are Gibbs settings of :class:`MMGibbsScheduler` (``covariance``, ``gibbs_sweeps``, ...) or
        replacement components (``unet=...``, ``scheduler=...``). Supported pipelines: see ``mmgibbs.families``.
        """
        if isinstance(pipeline, MomentMatchingGibbsPipeline):
            host, host_config = pipeline.config.host_pipeline, dict(pipeline.config.host_config)
        else:
            host = type(pipeline).__name__
            family_of(host)
            own = set(inspect.signature(type(pipeline).__init__).parameters) - set(COMPONENTS) - {"self", "scheduler"}
            host_config = {k: v for k, v in pipeline.config.items() if k in own}
            host_config.update(family_of(host).host_values(pipeline))
        components = {k: v for k, v in pipeline.components.items() if k in COMPONENTS}
        components.update({k: kwargs.pop(k) for k in list(kwargs) if k in COMPONENTS})
        source = kwargs.pop("scheduler", pipeline.scheduler)
        check_scheduler(source)
        unknown = sorted(set(kwargs) - set(inspect.signature(MMGibbsScheduler.__init__).parameters))
        if unknown:
            raise ValueError(
                f"from_pipe got unknown arguments {unknown}: pass components ({', '.join(COMPONENTS)}, scheduler) "
                f"or Gibbs settings ({', '.join(GIBBS_SETTINGS)}, ...)."
            )
        source = MMGibbsScheduler.from_scheduler(source, **kwargs)
        new = cls(**components, scheduler=source, host_pipeline=host, host_config=host_config)
        new.set_progress_bar_config(**getattr(pipeline, "_progress_bar_config", {}))
        return new

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained``, plus what lets ``DiffusionPipeline.from_pretrained(folder,
        trust_remote_code=True)`` find this class without ``import mmgibbs``: diffusers' custom-pipeline convention
        (a ``mmgibbs_pipeline.py`` in the folder, named in ``model_index.json``)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        folder = Path(save_directory)
        (folder / f"{COMMUNITY_FILE}.py").write_text(COMMUNITY_SOURCE, encoding="utf-8")
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        index["_class_name"] = [COMMUNITY_FILE, type(self).__name__]
        (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """diffusers' ``from_pretrained``; an :class:`MMGibbsScheduler` in the folder is loaded here directly, with
        its calibrated covariance table if one was saved, so this class (already imported) needs no
        ``trust_remote_code`` for its own scheduler."""
        if "scheduler" not in kwargs:
            hub = {k: kwargs[k] for k in ("cache_dir", "local_files_only", "revision", "token") if k in kwargs}
            try:
                config = MMGibbsScheduler.load_config(pretrained_model_name_or_path, subfolder="scheduler", **hub)
            except OSError:  # no scheduler folder: diffusers' own error comes below
                config = None
            if config is not None and config.get("_class_name") == MMGibbsScheduler.__name__:
                scheduler = MMGibbsScheduler.from_config(config)
                table = Path(pretrained_model_name_or_path, "scheduler", TABLE_FILE)
                if table.is_file():  # a calibrated covariance saved with the scheduler (local folders)
                    scheduler.set_covariance_table(CovarianceTable.load(table))
                kwargs["scheduler"] = scheduler
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def load_config(cls, *args: Any, **kwargs: Any) -> Any:
        """diffusers' ``load_config``; a folder naming this class the custom-pipeline way loads as this class."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if isinstance(config.get("_class_name"), list) and config["_class_name"][-1] == cls.__name__:
            config["_class_name"] = cls.__name__
        return loaded

    # ------------------------------------------------------------------ the family and its host
    @property
    def denoiser_model(self) -> torch.nn.Module:
        """The denoising network (``unet`` or ``transformer``)."""
        return self.unet if self.unet is not None else self.transformer

    def family(self, scheduler: MMGibbsScheduler) -> Family:
        """This pipeline's model family, bound to a host pipeline built from these components and ``scheduler``."""
        name = self.config.host_pipeline
        family = family_of(name, self.denoiser_model)
        if issubclass(family, Unconditional):  # energy models included
            return family(None, self.denoiser_model, getattr(self, "vqvae", None))
        host_class = getattr(diffusers, name or family.hosts[0])
        wanted = inspect.signature(host_class.__init__).parameters
        parts = {k: getattr(self, k, None) for k in wanted if k in COMPONENTS}
        host = host_class(**parts, scheduler=scheduler, **self.config.host_config)
        host.set_progress_bar_config(disable=True)
        return family(host)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        *,
        batch_size: int | None = None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        x_init: torch.Tensor | None = None,
        covariance: str | None = None,
        num_probes: int | None = None,
        gibbs_sweeps: int | None = None,
        transition: str | None = None,
        eta: float | None = None,
        mean_order: int | None = None,
        corrector: bool | None = None,
        final_output: str | None = None,
        jacobian: str | None = None,
        product_batch: int | None = None,
        variance_bound: float | Unset | None = UNSET,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, Any, dict[str, torch.Tensor]], dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        **host_arguments: Any,
    ) -> MomentMatchingGibbsPipelineOutput | tuple[Any]:
        """Draw samples with moment-matching Gibbs sampling.

        Args:
            prompt, negative_prompt: text conditioning (text-to-image families).
            batch_size: number of samples of an unconditional model.
            num_inference_steps: noise levels (annealed) or sweeps at ``sigma`` (single level); default 50, or as
                many as the custom ``sigmas`` a flow family takes (then it is not passed: both are an error).
            generator: torch generator(s) for the start, the draws and the Hutchinson probes; a list gives every
                image its own stream (then image i does not depend on the rest of the batch) and must have one
                generator per image.
            latents: the first model input x_t itself, a torch tensor of the shape the host's ``prepare_latents``
                would draw (default: drawn there, N(0, I) scaled).
            x_init: (unconditional) a clean starting point, re-noised to the first level; not with ``latents``.
                Without ``batch_size`` an unconditional model draws as many samples as ``latents`` or ``x_init``
                hold.
            covariance, num_probes, gibbs_sweeps, transition, eta, mean_order, corrector, final_output, jacobian,
                product_batch, variance_bound: override the scheduler's settings for this call (see
                :class:`MMGibbsScheduler`); left out (or None, except ``variance_bound``), the scheduler's own.
                ``variance_bound=None`` lifts the bound for this call, as ``from_pipe(pipe, variance_bound=None)``
                does for the pipeline.
            output_type: ``"pil"``, ``"np"`` (NHWC in [0, 1]), ``"pt"`` (NCHW in [0, 1]) or ``"latent"`` (raw
                samples or latents); non-image samples accept ``"pt"``/``"np"``/``"latent"``, raw.
            return_dict: return a :class:`MomentMatchingGibbsPipelineOutput` rather than a tuple.
            callback_on_step_end: called as ``fn(pipe, step, timestep, tensors)`` after every sweep; it may return
                a replacement ``"latents"`` (alias ``"sample"``), the next model input.
            callback_on_step_end_tensor_inputs: which of ``"latents"``/``"sample"`` and ``"mu"`` it receives.
            host_arguments: the host pipeline's usual arguments: ``prompt_embeds``, ``negative_prompt_embeds``,
                ``guidance_scale``, ``guidance_rescale``, ``height``, ``width``, ``num_images_per_prompt``, ...
                (the family says which; an argument a family does not take is an error naming it). Custom
                ``timesteps`` or ``sigmas`` where the host's call takes them (SD, SDXL, PixArt; the flow families'
                ``sigmas``) are the levels instead of ``num_inference_steps``, as the host passes them to its
                scheduler; a calibrated table must hold those levels.
        """
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        bad = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may contain {self._callback_tensor_inputs}; got {bad}."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(
                f"`output_type` must be one of {', '.join(map(repr, OUTPUT_TYPES))}; got {output_type!r}."
            )
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"`batch_size` must be a positive integer; got {batch_size!r}.")
        check_generator(generator, batch_size)
        for name, value in (("latents", latents), ("x_init", x_init)):
            if value is not None:
                check_tensor(value, name)
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(f"`callback_on_step_end` must be callable; got {type(callback_on_step_end).__name__}.")
        for name in set(host_arguments) & set(NOT_CALL_ARGUMENTS):
            raise ValueError(f"`{name}` is not a call argument: {NOT_CALL_ARGUMENTS[name]}.")
        check_host_arguments({"prompt": prompt, "negative_prompt": negative_prompt, **host_arguments})

        settings = dict(
            covariance=covariance,
            num_probes=num_probes,
            gibbs_sweeps=gibbs_sweeps,
            transition=transition,
            eta=eta,
            mean_order=mean_order,
            corrector=corrector,
            final_output=final_output,
            jacobian=jacobian,
            product_batch=product_batch,
        )
        overrides = {k: v for k, v in settings.items() if v is not None}
        if variance_bound is not UNSET:  # None is a value here: no bound
            overrides["variance_bound"] = variance_bound
        scheduler = self.scheduler
        if overrides:
            scheduler = MMGibbsScheduler.from_config(self.scheduler.config, **overrides)
            scheduler.set_covariance_table(self.scheduler.covariance_table)  # state, not config: carried over
        estimator = scheduler.estimator()  # its settings (and a missing table) refused before any model call
        device = self._execution_device
        family = self.family(scheduler)
        arguments = dict(
            prompt=prompt,
            negative_prompt=negative_prompt,
            batch_size=batch_size,
            generator=generator,
            latents=latents,
            x_init=x_init,
            **host_arguments,
        )
        levels = self._custom_levels(family, arguments)
        arguments = self._accepted(family, arguments)
        family.check_embeddings(arguments)
        family.set_timesteps(scheduler, num_inference_steps, device, {**arguments, **levels})
        job = family.prepare(scheduler, device=device, **arguments)
        check_generator(generator, len(job.latents))  # one per image, whatever the family's batch
        estimator = conditioned(estimator, scheduler.covariance_table, job)

        start = job.start
        aliases = {job.callback_name, "latents", "sample"}

        def callback(i: int, y: torch.Tensor, mu: torch.Tensor) -> torch.Tensor | None:
            step = start + i
            last = step == len(scheduler.timesteps) - 1
            sample = y if last else scheduler.from_ve(y, step + 1)
            local = {"mu": mu, **dict.fromkeys(aliases, sample)}
            returned = callback_on_step_end(
                self, step, scheduler.timesteps[step], {k: local[k] for k in tensor_inputs}
            )
            if returned is not None and not isinstance(returned, dict):
                raise ValueError(
                    f"`callback_on_step_end` must return a dict (or None); got {type(returned).__name__}."
                )
            key = next((k for k in aliases if returned and k in returned), None)
            replaced = None if key is None else returned[key]
            if replaced is None or replaced is sample:  # handed back as given: no VE round trip (its round-off)
                return None
            if not isinstance(replaced, torch.Tensor):
                raise TypeError(
                    f"`callback_on_step_end` returned a {type(replaced).__name__} as {key!r}; the sample it may "
                    "replace is a torch.Tensor."
                )
            if replaced.shape != sample.shape:
                raise ValueError(
                    f"`callback_on_step_end` returned a sample of shape {tuple(replaced.shape)}; the sample has shape "
                    f"{tuple(sample.shape)}."
                )
            return replaced.to(y.dtype) if last else scheduler.to_ve(replaced.to(y.dtype), step + 1)

        result = gibbs.sample(
            scheduler.denoiser(job.predict, first_step=start),
            scheduler.ve_sigmas()[start:],
            scheduler.to_ve(job.latents, start),
            estimator,
            **scheduler.kernel_settings(),
            known=job.known,
            generator=generator,
            callback=callback if callback_on_step_end is not None else None,
            progress=self.progress_bar,
        )
        images = job.finish(result.sample, output_type)
        self.maybe_free_model_hooks()
        counts = {k: getattr(result, k) for k in ("num_forward", "num_backward", "num_jvp", "num_product_passes")}
        if not return_dict:
            return (images,)
        return MomentMatchingGibbsPipelineOutput(images=images, **counts)

    @torch.no_grad()
    def calibrate_covariance(
        self,
        num_inference_steps: int | Sequence[int] | None = None,
        samples: torch.Tensor | None = None,
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        num_clusters: int = 16,
        rank: int | None = None,
        shrinkage: float = 64.0,
        sampler_steps: int | None = None,
        sampler_covariance: str | None = None,
        factor_iterations: int = 1,
        num_conditions: int = 16,
        covariance: str | None = None,
        dtype: torch.dtype | None = None,
        streaming: bool | None = None,
        cluster_samples: int = DEFAULT_CLUSTER_SAMPLES,
        sketch: int | None = None,
        **conditioning: Any,
    ) -> CovarianceTable:
        """Calibrate ``covariance="calibrated"`` for the levels of ``num_inference_steps`` (``mmgibbs.calibration``).

        Once per model (and, for a conditional model, per conditioning and guidance): the table is set on the
        scheduler (merged with an existing one of the same conditioning and guidance, the new levels winning;
        otherwise replacing it), saved by ``save_pretrained`` and used by the pipeline and by the drop-in scheduler
        alike.

        Args:
            num_inference_steps: the step count(s) to calibrate for (each schedule's distinct levels, with the
                scheduler's timestep spacing); default 50, or, with custom ``timesteps`` / ``sigmas`` among the
                conditioning arguments (where the host's call takes them), those levels.
            samples: clean samples x, a finite floating-point tensor (N, *the model's sample shape), e.g. data, with
                N >= ``num_clusters``; for a latent model, latents as its sampler returns them
                (``output_type="latent"``). Default: the model's own, drawn here (see ``sampler_steps``).
            num_samples: how many samples to draw when ``samples`` is None (default: one per conditioning row, or
                2048); with ``samples``, left out or ``len(samples)``.
            generator: one torch generator (or None) for the self-samples, the calibration noise and the clustering.
            batch_size: model batch size of the calibration passes and the self-sampling (default: all at once).
            num_clusters, rank, shrinkage: the table's structure (:func:`mmgibbs.calibration.calibrate_level`):
                ``num_clusters`` >= 1 (per condition), ``rank`` in [1, d] (d the sample dimension; default 16,
                or fewer where d or the samples allow fewer), ``shrinkage`` finite >= 0.
            sampler_steps: levels of the self-sampling run (default: the model's training steps for an
                unconditional model; 100 for a conditional one).
            sampler_covariance: draw the self-samples with this pipeline (ancestral, eta 1) and this covariance;
                default: ``"none"`` for an unconditional model (with every training step that is DDPM's own
                sampler), the host's own scheduler (``source_scheduler``, in a standard diffusers loop over the
                same conditioning and guidance) for a conditional one.
            factor_iterations: of the low rank + diagonal fit (:func:`mmgibbs.moments.low_rank_plus_diagonal`).
            num_conditions: at most this many condition groups (distinct conditioning rows; more are clustered by
                their condition keys, ``mmgibbs.calibration.condition_groups``); 1 pools every condition into one
                group whose clusters of mu carry the conditioning.
            covariance: the estimator the table is for, which fixes its structure: ``"calibrated"`` (and
                ``"calibrated_jacobian"``: low rank + diagonal per cluster) or ``"calibrated_stationary"`` (a
                stationary covariance per cluster, image-shaped latents); default: the scheduler's ``covariance`` if
                it reads a table, else ``"calibrated"``.
            dtype: the table's storage dtype (default float32, float64 for float64 samples; ``torch.float16``
                halves its memory, the draws are made in the chain's dtype).
            streaming: fit from sufficient statistics streamed chunk by chunk (``mmgibbs.streaming``: memory
                independent of the number of samples, clusters from the first ``cluster_samples`` samples, a
                progress bar over the chunks), instead of holding every residual of a level (the exact path);
                default: streaming above 2^24 sample numbers (N x d) and always under several processes
                (``accelerate launch``: each process calibrates every P-th batch, one reduction). Own samples are
                then drawn per batch, with a generator seeded per batch.
            cluster_samples, sketch: of the streaming fit (:func:`mmgibbs.streaming.stream_covariance`).
            conditioning: the host's usual conditioning arguments, as its call takes them: ``class_labels`` (DiT),
                ``prompt`` / ``prompt_embeds`` and the family's negative and pooled embeddings, ``guidance_scale``
                (and ``guidance_rescale``, ``true_cfg_scale``, ``height``, ``width``, ...). The per-image ones
                (``Family.conditioning``) hold one row per clean sample, or one row for all samples; the rest apply
                to all. Sampling must use the same guidance settings (checked by the pipeline).

        Every argument is checked before the first model call (for a text-conditional model, one prompt row is
        encoded first, to learn the latents' shape); the self-sampling settings (``num_samples``,
        ``sampler_steps``, ``sampler_covariance``) are refused beside ``samples``, which they would not change.
        Returns the table; its ``sample_forwards`` and ``settings["sampler_sample_forwards"]`` are the calibration's
        cost in single-sample model evaluations (calibration passes; drawing the self-samples).
        """
        family = self.family(self.scheduler)
        custom = self._custom_levels(family, conditioning)
        if custom and num_inference_steps is not None:
            raise ValueError(
                f"Pass `num_inference_steps` or `{next(iter(custom))}`, not both: custom levels are the schedule "
                "to calibrate for."
            )
        # a layout per schedule: a step count, or the custom levels themselves
        steps: list[int | dict[str, Any]] = (
            [custom] if custom else check_steps(DEFAULT_STEPS if num_inference_steps is None else num_inference_steps)
        )
        for name in set(conditioning) & {*NOT_CALL_ARGUMENTS, *NOT_CALIBRATION_ARGUMENTS}:
            why = NOT_CALL_ARGUMENTS.get(name) or NOT_CALIBRATION_ARGUMENTS[name]
            raise ValueError(f"`{name}` is not a calibration argument: {why}.")
        conditioning = self._accepted(family, conditioning)
        check_host_arguments(conditioning)
        conditional = not isinstance(family, Unconditional)
        rows = {k: v for k, v in conditioning.items() if k in family.conditioning}
        if conditional and not rows:
            raise ValueError(
                f"{family.name} needs its conditioning to calibrate: pass "
                f"{' or '.join(f'`{k}`' for k in family.conditioning[:3])} (one row per clean sample, or one for all)."
            )
        counts = {k: _row_count(v) for k, v in rows.items()}
        many = sorted({c for c in counts.values() if c != 1})
        if samples is not None:
            unused = {"sampler_steps": sampler_steps, "sampler_covariance": sampler_covariance}
            if num_samples is not None and num_samples != len(samples):
                unused["num_samples"] = num_samples
            passed = [f"`{k}`" for k, v in unused.items() if v is not None]
            if passed:
                raise ValueError(
                    f"{', '.join(passed)} set{'s' * (len(passed) == 1)} how the model's own samples are drawn; with "
                    "`samples` none are drawn: "
                    "leave them out (or pass samples=None to calibrate on own samples)."
                )
            check_tensor(samples, "samples", floating=True)
            count, source = len(samples), "`samples`"
        else:
            if num_samples is None:
                num_samples = many[0] if len(many) == 1 else 2048
            check_number(num_samples, "num_samples", integer=True, low=1)
            if sampler_steps is not None:
                hint = (
                    f" (or None: {DEFAULT_HOST_SAMPLER_STEPS} steps)"
                    if conditional
                    else " (or None: every training step)"
                )
                check_number(sampler_steps, "sampler_steps", integer=True, low=1, hint=hint)
            if sampler_covariance is not None:
                check_choice("sampler_covariance", sampler_covariance, COVARIANCES)
            count, source = num_samples, "`num_samples`"
        bad = {k: c for k, c in counts.items() if c not in (1, count)}
        if bad:
            name, rows_in = next(iter(bad.items()))
            raise ValueError(
                f"`{name}` holds {rows_in} rows; calibration takes one conditioning row per clean sample ({source}: "
                f"{count}) or one row for all of them."
            )
        check_number(num_conditions, "num_conditions", integer=True, low=1)
        if covariance is None:
            covariance = self.scheduler.config.covariance
            covariance = covariance if covariance in CALIBRATED_COVARIANCES else "calibrated"
        check_choice("covariance", covariance, CALIBRATED_COVARIANCES)
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"`dtype` must be a floating-point torch dtype (the table's storage); got {dtype!r}.")
        batch = batch_size or count
        structure: dict[str, Any] = dict(
            num_clusters=num_clusters,
            rank=rank,
            shrinkage=shrinkage,
            batch_size=batch_size,
            generator=generator,
            factor_iterations=factor_iterations,
        )
        device = self._execution_device
        if not conditional:
            shape = sample_shape(self.denoiser_model)
            check_calibration(count, math.prod(shape), **structure, source=source)
            jobs = [family.prepare(self.scheduler, batch_size=1, device=device)]
        else:
            check_calibration(count, 1, **{**structure, "rank": None}, source=source)
            jobs = [self._calibration_job(family, self.scheduler, conditioning, 0, 1)]
            shape = tuple(jobs[0].latents.shape[1:])
            check_calibration(count, math.prod(shape), **structure, source=source)
        if samples is not None:
            check_samples(samples, "samples", shape)
        check_number(cluster_samples, "cluster_samples", integer=True, low=1)
        if sketch is not None:
            check_number(sketch, "sketch", integer=True, low=0, hint=" (0: exact second moments)")
        if streaming is not None and not isinstance(streaming, bool):
            raise ValueError(f"`streaming` must be True, False or None (decide by size); got {streaming!r}.")
        kind = ESTIMATORS[covariance].level_kind
        if kind == "stationary" and len(shape) != 3:
            raise ValueError(
                f"covariance={covariance!r} needs image-shaped samples (C, H, W); this model's are {shape}: use "
                "covariance='calibrated' (low rank + diagonal), e.g. for Flux's packed latents."
            )
        shards = Shards.from_environment()
        key_dim = int(condition_of(jobs[0]).shape[-1]) if conditional else None
        if streaming is None:
            streaming = shards.count > 1 or count * math.prod(shape) > STREAM_ABOVE
        elif not streaming and shards.count > 1:
            raise ValueError(
                f"`streaming=False` holds every residual in one process; under {shards.count} processes the "
                "calibration streams its shards (leave `streaming` out)."
            )
        if not streaming:
            unused = {"sketch": sketch is not None, "cluster_samples": cluster_samples != DEFAULT_CLUSTER_SAMPLES}
            passed = [f"`{k}`" for k, v in unused.items() if v]
            if passed:
                raise ValueError(
                    f"{' and '.join(passed)} set{'s' * (len(passed) == 1)} the streaming fit, and this calibration "
                    f"does not stream (`streaming`={streaming!r}; None streams above 2^24 sample numbers, here "
                    f"{count} x {math.prod(shape)}): pass streaming=True, or leave them out."
                )
        if streaming and factor_iterations != 1:
            raise ValueError(
                "`factor_iterations` > 1 refits the diagonal against the whole second moment, which the streaming "
                "fit does not hold (it keeps a sketch of it above d = 512): pass streaming=False, or leave "
                "factor_iterations at 1 (PCA + diagonal remainder, the measured better fit)."
            )
        table, old = None, self.scheduler.covariance_table
        if streaming:
            table = self._stream_calibration(
                family, conditioning, steps, samples, count, batch, shape, kind, shards, key_dim,
                dict(structure, num_conditions=num_conditions, dtype=dtype, cluster_samples=cluster_samples,
                     sketch=sketch),
                (sampler_steps, sampler_covariance),
            )  # fmt: skip
        else:
            if conditional:
                jobs = [
                    self._calibration_job(family, self.scheduler, conditioning, start, min(start + batch, count))
                    for start in range(0, count, batch)
                ]
            settings: dict[str, Any] = {"source": "given samples", "sampler_sample_forwards": 0}
            if samples is None:
                samples, settings = self._own_samples(
                    family, conditioning, num_samples, batch, sampler_steps, sampler_covariance, generator
                )
            samples = samples.to(device)
            keys = torch.cat([condition_of(job) for job in jobs]) if conditional else None
            if conditional:
                settings["guidance"] = jobs[0].extra["guidance"]
            for n in steps:
                self._lay_out(family, n, device, conditioning)
                denoisers = [self.scheduler.denoiser(job.predict) for job in jobs]
                new = calibrate_covariance(
                    denoisers if conditional else denoisers[0],
                    self.scheduler.ve_sigmas(),
                    samples,
                    **structure,
                    skip=table,
                    conditions=keys,
                    num_conditions=num_conditions,
                    structure=kind,
                    dtype=dtype,
                )
                new.settings.update(settings)
                table = new if table is None else table.merge(new)
        if old is not None and old.same_conditions(table):
            table = table.merge(old)
        self.scheduler.set_covariance_table(table)
        return table

    def _stream_calibration(
        self,
        family: Family,
        conditioning: dict[str, Any],
        steps: list[int | dict[str, Any]],
        samples: torch.Tensor | None,
        count: int,
        batch: int,
        shape: tuple[int, ...],
        kind: str,
        shards: Shards,
        key_dim: int | None,
        fit: dict[str, Any],
        sampler: tuple[int | None, str | None],
    ) -> CovarianceTable:
        """``calibrate_covariance`` streamed (``mmgibbs.streaming``): the distinct levels of every step count at once,
        batch by batch, each batch's own samples drawn (if none are given) with a generator seeded per batch."""
        device = self._execution_device
        conditional = not isinstance(family, Unconditional)
        levels: list[Any] = []
        for n in steps:
            self._lay_out(family, n, device, conditioning)
            for level in self.scheduler.snapshot_levels():
                if not any(math.isclose(level[0], other[0], rel_tol=SIGMA_RTOL) for other in levels):
                    levels.append(level)
        sizes = [min(batch, count - start) for start in range(0, count, batch)]
        generator = fit.pop("generator")
        seeds = shards.same(torch.randint(2**62, (len(sizes),), generator=generator)).tolist()  # own samples
        unconditional = None if conditional else family.prepare(self.scheduler, batch_size=1, device=device)
        settings: dict[str, Any] = {"source": "given samples", "sampler_sample_forwards": 0}

        def source(c: int) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
            start, stop = c * batch, c * batch + sizes[c]
            rows = {k: _rows(v, start, stop) if k in family.conditioning else v for k, v in conditioning.items()}
            if samples is not None:
                x = samples[start:stop]
            else:
                x, how = self._own_samples(
                    family, rows, stop - start, stop - start, *sampler, torch.Generator().manual_seed(seeds[c])
                )
                settings["source"] = how["source"] + " (a generator seeded per batch)"
                settings["sampler_sample_forwards"] = count * (how["sampler_sample_forwards"] // len(x))
            job = self._calibration_job(family, self.scheduler, conditioning, start, stop) if conditional else None
            job = job or unconditional
            if conditional:
                settings["guidance"] = job.extra["guidance"]
            keys = condition_of(job) if conditional else None
            return x.to(device), MMGibbsScheduler.denoiser_over(job.predict, levels), keys

        work = work_dtype(samples.dtype if samples is not None else self.denoiser_model.dtype)
        storage = fit.pop("dtype") or work
        table = stream_covariance(
            source,
            sizes,
            [level[0] for level in levels],
            shape,
            key_dim=key_dim,
            generator=generator,
            dtype=work,
            structure=kind,
            shards=shards,
            progress=self.progress_bar,
            **{k: v for k, v in fit.items() if k not in ("batch_size", "factor_iterations")},
        )
        table.levels = [level.to(dtype=storage) for level in table.levels]
        table.settings.update(settings)
        return table

    def _calibration_job(
        self, family: Family, scheduler: Any, conditioning: dict[str, Any], start: int, stop: int
    ) -> Any:
        """The family's job for calibration rows [start, stop) (their conditioning, or the one row broadcast); the
        job's own starting latents (drawn from a fixed generator, not the caller's) are unused."""
        arguments = {k: _rows(v, start, stop) if k in family.conditioning else v for k, v in conditioning.items()}
        family.check_embeddings(arguments)
        seed = torch.Generator().manual_seed(0)
        return family.prepare(scheduler, device=self._execution_device, generator=seed, **arguments)

    def _own_samples(
        self,
        family: Family,
        conditioning: dict[str, Any],
        num_samples: int,
        batch: int,
        sampler_steps: int | None,
        sampler_covariance: str | None,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The model's own samples for the calibration (``calibrate_covariance``'s ``sampler_*`` arguments), in
        batches of ``batch``, and the settings that record how they were drawn."""
        conditional = not isinstance(family, Unconditional)
        drawn = []
        if sampler_covariance is not None or not conditional:
            sampler_covariance = sampler_covariance or "none"
            sampler_steps = sampler_steps or (
                DEFAULT_HOST_SAMPLER_STEPS if conditional else self.scheduler.noise_schedule.num_train_timesteps
            )
            for start in range(0, num_samples, batch):
                stop = min(start + batch, num_samples)
                rows = {k: _rows(v, start, stop) if k in family.conditioning else v for k, v in conditioning.items()}
                if not conditional:
                    rows["batch_size"] = stop - start
                out = self(
                    **rows,
                    generator=generator,
                    num_inference_steps=sampler_steps,
                    covariance=sampler_covariance,
                    transition="ancestral",
                    eta=1.0,
                    output_type="latent",
                )
                drawn.append(out.images)
            how = f"{sampler_steps} levels, covariance={sampler_covariance!r}, eta 1"
        else:
            sampler_steps = sampler_steps or DEFAULT_HOST_SAMPLER_STEPS
            host = host_scheduler(self.scheduler)
            host_family = self.family(host)
            step_takes_generator = "generator" in inspect.signature(host.step).parameters
            scale_input = hasattr(type(host), "scale_model_input")
            for start in self.progress_bar(range(0, num_samples, batch)):
                stop = min(start + batch, num_samples)
                host_family.set_timesteps(host, sampler_steps, self._execution_device, conditioning)
                arguments = {
                    k: _rows(v, start, stop) if k in family.conditioning else v for k, v in conditioning.items()
                }
                job = host_family.prepare(host, device=self._execution_device, generator=generator, **arguments)
                x = job.latents
                for t in host.timesteps:  # flow-matching schedulers have no scale_model_input: identity
                    out = job.predict(host.scale_model_input(x, t) if scale_input else x, t)
                    kwargs = {"generator": generator} if step_takes_generator else {}
                    x = host.step(out.to(x.dtype), t, x, **kwargs).prev_sample
                drawn.append(x)
            how = f"{type(host).__name__}, {sampler_steps} steps"
        settings = {"source": f"own samples: {how}", "sampler_sample_forwards": num_samples * sampler_steps}
        return torch.cat(drawn), settings

    def _lay_out(
        self, family: Family, layout: int | dict[str, Any], device: Any, conditioning: dict[str, Any]
    ) -> None:
        """The scheduler's levels for one calibrated schedule: a step count, or custom ``timesteps`` / ``sigmas``."""
        if isinstance(layout, dict):
            family.set_timesteps(self.scheduler, None, device, {**conditioning, **layout})
        else:
            family.set_timesteps(self.scheduler, layout, device, conditioning)

    @staticmethod
    def _custom_levels(family: Family, arguments: dict[str, Any]) -> dict[str, Any]:
        """Custom ``timesteps`` / ``sigmas`` (e.g. Align Your Steps schedules) taken out of ``arguments`` where the
        host's call takes them and the family's ``prepare`` does not (the flow families lay out their own
        ``sigmas``): :meth:`Family.set_timesteps` passes them to the scheduler, which checks them."""
        if "timesteps" not in arguments and "sigmas" not in arguments:  # the common call: no signature read
            return {}
        takes = inspect.signature(family.prepare).parameters
        host_takes = inspect.signature(type(family.host).__call__).parameters
        levels = {}
        for name in ("timesteps", "sigmas"):
            if name in arguments and name not in takes and name in host_takes:
                value = arguments.pop(name)
                if value is not None:
                    levels[name] = value
        return levels

    @staticmethod
    def _accepted(family: Family, arguments: dict[str, Any]) -> dict[str, Any]:
        """The passed (non-None) arguments, each checked against what the family's ``prepare`` takes."""
        takes = inspect.signature(family.prepare).parameters
        passed = {k: v for k, v in arguments.items() if v is not None}
        refused = sorted(k for k in passed if k not in takes)
        if refused:
            raise ValueError(
                f"{family.name} does not take {', '.join(f'`{k}`' for k in refused)}; it takes "
                f"{', '.join(f'`{k}`' for k in takes if k not in ('self', 'scheduler', 'device'))}."
            )
        return passed


def conditioned(estimator: Any, table: CovarianceTable | None, job: Any) -> Any:
    """``estimator`` told each image's condition group in ``table`` (``CovarianceTable.group_of`` of the job's
    condition keys), for the estimators that read a conditional table; the job's guidance settings must be those
    the table was calibrated with (a ValueError naming them otherwise)."""
    if table is None or "condition_groups" not in {f.name for f in dataclasses.fields(estimator)}:
        return estimator
    calibrated, used = table.settings.get("guidance"), job.extra.get("guidance")
    if calibrated is not None and used is not None and calibrated != used:
        differ = [k for k in sorted(set(calibrated) | set(used)) if calibrated.get(k) != used.get(k)]
        raise ValueError(
            "The calibrated covariance table was calibrated with "
            + ", ".join(f"{k}={calibrated.get(k)}" for k in differ)
            + "; this call has "
            + ", ".join(f"`{k}`={used.get(k)}" for k in differ)
            + " (None: no classifier-free guidance). A table is fitted to one guided denoiser: sample with the "
            "table's guidance, or calibrate for this one (`calibrate_covariance(..., "
            + ", ".join(f"{k}=...)" for k in differ[:1])
            + "`)."
        )
    return dataclasses.replace(estimator, condition_groups=table.group_of(condition_of(job)))


def _row_count(value: Any) -> int:
    """Conditioning rows of a call argument: 1 for a string or a number, the length of a list, the first dimension
    of a tensor or array (its size for a 1-D tensor of class labels)."""
    if isinstance(value, (str, numbers.Number)):
        return 1
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return 1 if value.ndim == 0 else int(value.shape[0])
    return len(value)


def _rows(value: Any, start: int, stop: int) -> Any:
    """Rows [start, stop) of a conditioning argument, a single row repeated (a string or a label as a list)."""
    if _row_count(value) != 1:
        return value[start:stop]
    if isinstance(value, torch.Tensor):
        value = value.reshape(1) if value.ndim == 0 else value
        return value.repeat(stop - start, *[1] * (value.ndim - 1))
    if isinstance(value, np.ndarray):
        return np.repeat(value.reshape(1, *value.shape[1:]), stop - start, axis=0)
    if isinstance(value, (str, numbers.Number)):
        return [value] * (stop - start)
    return list(value) * (stop - start)


def host_scheduler(scheduler: MMGibbsScheduler) -> SchedulerMixin:
    """The host's own diffusers scheduler for an MMGibbsScheduler's config: its ``source_scheduler`` class (DDIM,
    FlowMatchEuler or EDMEuler for a config that names none), built from the same config."""
    fallback = {"vp": "DDIMScheduler", "flow": "FlowMatchEulerDiscreteScheduler", "edm": "EDMEulerScheduler"}
    name = scheduler.config.source_scheduler or fallback.get(scheduler.config.noise_family)
    if name is None or not hasattr(diffusers, name) or not hasattr(getattr(diffusers, name), "step"):
        raise ValueError(
            f"The host scheduler ({name}) cannot draw the calibration samples in a standard loop: pass `samples`, "
            "or `sampler_covariance` to draw them with this pipeline."
        )
    cls = getattr(diffusers, name)
    takes = inspect.signature(cls.__init__).parameters
    return cls.from_config({k: v for k, v in scheduler.config.items() if k in takes})


__all__ = ["FAMILIES", "MomentMatchingGibbsPipeline", "MomentMatchingGibbsPipelineOutput"]
