"""MomentMatchingGibbsPipeline: the moment-matching Gibbs sampler around any pretrained denoiser.

For each of the scheduler's levels x sweeps steps at timestep t (sigma = s_t / alpha_t):

    y = x_t / alpha_t                                  (the variance-exploding frame)
    mu, Sigma = moments of the model's denoiser at y   (``mmgibbs.moments``, Jacobian covariances included)
    x ~ N(mu, Sigma), re-noised to the next level      (``mmgibbs.gibbs``, the one kernel)

The pipeline only adapts: it builds the denoiser closure from the model (``MMGibbsScheduler.denoiser``) and
runs :func:`mmgibbs.gibbs.sample` with the scheduler's settings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from . import gibbs
from .calibration import CovarianceTable, calibrate_covariance
from .scheduler import MMGibbsScheduler

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class MomentMatchingGibbsPipelineOutput(ImagePipelineOutput):
    """Images (or samples) plus the cost of drawing them.

    Args:
        images: PIL images, a numpy array or a tensor, as ``output_type`` asks.
        num_forward: batched model forward passes.
        num_backward: batched backward passes (reverse-mode Jacobian products).
        num_jvp: batched forward-mode Jacobian-vector products.
    """

    num_forward: int = 0
    num_backward: int = 0
    num_jvp: int = 0


def _sample_shape(model: torch.nn.Module) -> tuple[int, ...]:
    """One sample's shape: the model's ``sample_shape`` or a UNet config's (in_channels, size, size)."""
    shape = getattr(model, "sample_shape", None)
    if shape is not None:
        return tuple(shape)
    config = model.config
    size = config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (config.in_channels, *size)


class MomentMatchingGibbsPipeline(DiffusionPipeline):
    """Moment Matching Denoising Gibbs Sampling (Zhang et al., NeurIPS 2023) with any diffusers denoiser.

    Args:
        unet: a model called as ``unet(sample, timestep)`` returning the prediction of the scheduler's
            prediction type (``UNet2DModel``, :class:`GaussianMixtureDenoiser`, ...).
        scheduler: an :class:`MMGibbsScheduler`; any other diffusers scheduler is converted with
            ``MMGibbsScheduler.from_config`` (so a saved DDPM pipeline folder loads directly).
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs: ClassVar[list[str]] = ["sample", "mu"]

    def __init__(self, unet: torch.nn.Module, scheduler: SchedulerMixin):
        super().__init__()
        if not isinstance(scheduler, MMGibbsScheduler):
            scheduler = MMGibbsScheduler.from_config(scheduler.config)
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        covariance: str | None = None,
        num_probes: int | None = None,
        gibbs_sweeps: int | None = None,
        transition: str | None = None,
        eta: float | None = None,
        final_output: str | None = None,
        jacobian: str | None = None,
        x_init: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, Any, dict[str, torch.Tensor]], dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> MomentMatchingGibbsPipelineOutput | tuple[Any]:
        """Draw ``batch_size`` samples.

        Args:
            batch_size: number of samples.
            generator: torch generator(s) for the start, the draws and the Hutchinson probes.
            num_inference_steps: noise levels (annealed) or sweeps at ``sigma`` (single level).
            covariance, num_probes, gibbs_sweeps, transition, eta, final_output, jacobian: override the scheduler's
                settings for this call (see :class:`MMGibbsScheduler`).
            x_init: a clean starting point x; the chain then starts from its re-noising at the first level
                (e.g. data, for the single-level chain started from data).
            latents: the first model input x_t itself (default: N(0, init_noise_sigma^2)).
            output_type: ``"pil"``, ``"np"`` (NHWC in [0, 1]) or ``"pt"`` (NCHW in [0, 1]) for images in [-1, 1],
                or ``"latent"`` for the raw samples; non-image samples accept ``"pt"``/``"np"``/``"latent"``, raw.
            return_dict: return a :class:`MomentMatchingGibbsPipelineOutput` rather than a tuple.
            callback_on_step_end: called as ``fn(pipe, step, timestep, tensors)`` after every sweep; it may
                return a replacement ``"sample"``.
            callback_on_step_end_tensor_inputs: which of ``"sample"``, ``"mu"`` it receives.
        """
        tensor_inputs = callback_on_step_end_tensor_inputs or ["sample"]
        bad = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may contain {self._callback_tensor_inputs}; got {bad}."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(
                f"`output_type` must be one of {', '.join(map(repr, OUTPUT_TYPES))}; got {output_type!r}."
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer; got {batch_size!r}.")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"{len(generator)} generators were passed for `batch_size`={batch_size}.")

        overrides = {
            k: v
            for k, v in dict(
                covariance=covariance,
                num_probes=num_probes,
                gibbs_sweeps=gibbs_sweeps,
                transition=transition,
                eta=eta,
                final_output=final_output,
                jacobian=jacobian,
            ).items()
            if v is not None
        }
        scheduler = self.scheduler
        if overrides:
            scheduler = MMGibbsScheduler.from_config(self.scheduler.config, **overrides)
            scheduler.set_covariance_table(self.scheduler.covariance_table)
        scheduler.set_timesteps(num_inference_steps, device=self._execution_device)

        shape = (batch_size, *_sample_shape(self.unet))
        device = self._execution_device
        dtype = torch.float64 if getattr(self.unet, "dtype", None) == torch.float64 else torch.float32
        if latents is not None:
            sample = latents.to(device, dtype)
        elif x_init is not None:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            sample = scheduler.add_noise(x_init.to(device, dtype), noise, scheduler.timesteps[:1].cpu())
        else:
            sample = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * scheduler.init_noise_sigma
        if sample.shape != shape:
            raise ValueError(f"The starting sample must have shape {shape}; got {tuple(sample.shape)}.")

        def callback(i: int, y: torch.Tensor, mu: torch.Tensor) -> torch.Tensor | None:
            last = i == len(scheduler.timesteps) - 1
            local = {"sample": y if last else scheduler.from_ve(y, i + 1), "mu": mu}
            returned = callback_on_step_end(self, i, scheduler.timesteps[i], {k: local[k] for k in tensor_inputs})
            if not returned or "sample" not in returned:
                return None
            return returned["sample"] if last else scheduler.to_ve(returned["sample"], i + 1)

        result = gibbs.sample(
            scheduler.denoiser(self._predict),
            scheduler.ve_sigmas(),
            scheduler.to_ve(sample, 0),
            **scheduler.gibbs_settings(),
            generator=generator,
            callback=callback if callback_on_step_end is not None else None,
            progress=self.progress_bar,
        )
        sample = result.sample
        counts = {k: getattr(result, k) for k in ("num_forward", "num_backward", "num_jvp")}

        self.maybe_free_model_hooks()
        images = self._postprocess(sample, output_type)
        if not return_dict:
            return (images,)
        return MomentMatchingGibbsPipelineOutput(images=images, **counts)

    def _predict(self, model_input: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.unet(model_input.to(self.unet.dtype), t.expand(len(model_input)))
        return out[0] if isinstance(out, tuple) else getattr(out, "sample", out)

    @torch.no_grad()
    def calibrate_covariance(
        self,
        num_inference_steps: int | Sequence[int] = 50,
        samples: torch.Tensor | None = None,
        num_samples: int = 2048,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        num_clusters: int = 16,
        rank: int = 16,
        shrinkage: float = 64.0,
        sampler_steps: int | None = None,
        sampler_covariance: str = "none",
        factor_iterations: int = 1,
    ) -> CovarianceTable:
        """Calibrate ``covariance="calibrated"`` for the levels of ``num_inference_steps`` (``mmgibbs.calibration``).

        Once per model: the table is set on the scheduler (merged with an existing one, the new levels winning),
        saved by ``save_pretrained`` and used by the pipeline and by the drop-in scheduler alike.

        Args:
            num_inference_steps: the step count(s) to calibrate for (each schedule's distinct levels, with the
                scheduler's timestep spacing).
            samples: clean samples x (batch first, the model's sample shape), e.g. data; default: the model's own,
                drawn here with ``sampler_steps`` levels of this pipeline (``covariance=sampler_covariance``,
                ancestral, eta 1: with ``"none"`` and every training step that is DDPM's own sampler).
            num_samples: how many samples to draw when ``samples`` is None.
            generator: one torch generator for the self-samples, the calibration noise and the clustering.
            batch_size: model batch size of the calibration passes and the self-sampling (default: all at once).
            num_clusters, rank, shrinkage: the table's structure (:func:`mmgibbs.calibration.calibrate_level`).
            sampler_steps: levels of the self-sampling run (default: the model's training steps).
            sampler_covariance: the covariance of the self-sampling run.
            factor_iterations: of the low rank + diagonal fit (:func:`mmgibbs.moments.low_rank_plus_diagonal`).

        Returns the table; its ``sample_forwards`` and ``settings["sampler_sample_forwards"]`` are the calibration's
        cost in single-sample model evaluations (calibration passes; drawing the self-samples).
        """
        steps = [num_inference_steps] if isinstance(num_inference_steps, int) else list(num_inference_steps)
        settings: dict[str, Any] = {"source": "given samples", "sampler_sample_forwards": 0}
        if samples is None:
            sampler_steps = sampler_steps or self.scheduler.noise_schedule.num_train_timesteps
            batch = batch_size or num_samples
            drawn = []
            for start in range(0, num_samples, batch):
                out = self(
                    batch_size=min(batch, num_samples - start),
                    generator=generator,
                    num_inference_steps=sampler_steps,
                    covariance=sampler_covariance,
                    transition="ancestral",
                    eta=1.0,
                    output_type="latent",
                )
                drawn.append(out.images)
            samples = torch.cat(drawn)
            settings = {
                "source": f"own samples: {sampler_steps} levels, covariance={sampler_covariance!r}, eta 1",
                "sampler_sample_forwards": num_samples * sampler_steps,
            }
        device = self._execution_device
        samples = samples.to(device)
        table, old = None, self.scheduler.covariance_table
        for n in steps:
            self.scheduler.set_timesteps(n, device=device)
            new = calibrate_covariance(
                self.scheduler.denoiser(self._predict),
                self.scheduler.ve_sigmas(),
                samples,
                num_clusters=num_clusters,
                rank=rank,
                shrinkage=shrinkage,
                batch_size=batch_size,
                generator=generator,
                skip=table,
                factor_iterations=factor_iterations,
            )
            new.settings.update(settings)
            table = new if table is None else table.merge(new)
        self.scheduler.set_covariance_table(table if old is None else table.merge(old))
        return table

    def _postprocess(self, sample: torch.Tensor, output_type: str) -> Any:
        if output_type == "latent":
            return sample
        if sample.ndim != 4:  # vectors and other non-image samples come back raw
            if output_type == "pil":
                raise ValueError(f"output_type='pil' needs image samples (N, C, H, W); got {tuple(sample.shape)}.")
            return sample.cpu().numpy() if output_type == "np" else sample
        image = (sample / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return image
        array = image.cpu().permute(0, 2, 3, 1).float().numpy()
        return self.numpy_to_pil(array) if output_type == "pil" else np.asarray(array)
