"""Unconditional denoisers called as ``model(sample, timestep)``: pixel-space ``UNet2DModel`` (DDPM, DDIM, PNDM,
ScoreSdeVe pipelines), latent ``UNet2DModel`` with a VQ decoder (``LDMPipeline``), and any diffusers model that
declares its ``sample_shape`` (e.g. :class:`mmgibbs.GaussianMixtureDenoiser`).

A ``UNet2DModel`` with ``out_channels == 2 * in_channels`` (learned variance, e.g. improved-DDPM checkpoints)
predicts [F, v]: the chain uses F, the first C channels (epsilon, x0 or v). The learned variance v is not used: the
moment-matched covariance (isotropic, or sigma^2 d mu / d y from the model's Jacobian) replaces it."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..checks import check_shape
from .base import Family, Job, drop_learned_variance, learned_variance, postprocess, work_dtype


def sample_shape(model: torch.nn.Module) -> tuple[int, ...]:
    """One sample's shape: the model's ``sample_shape`` or a UNet config's (in_channels, size, size)."""
    shape = getattr(model, "sample_shape", None)
    if shape is not None:
        return tuple(shape)
    config = model.config
    size = config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (config.in_channels, *size)


def model_predict(model: torch.nn.Module) -> Any:
    """``(model_input, t) -> model(model_input, t)`` in the model's dtype, unwrapping diffusers outputs and
    dropping a learned variance (the last C of 2C output channels)."""
    channels = learned_variance(model)

    def predict(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        out = model(model_input.to(model.dtype), timestep.expand(len(model_input)))
        out = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
        return drop_learned_variance(out, channels)

    return predict


def declares_shape(model: Any) -> bool:
    """Whether :func:`sample_shape` knows ``model``'s sample shape: a ``sample_shape`` attribute, or ``in_channels``
    and ``sample_size`` in its config (as UNet2DModel's)."""
    config = getattr(model, "config", None)
    config = config if isinstance(config, Mapping) else {}
    has_config = config.get("in_channels") is not None and config.get("sample_size") is not None
    return getattr(model, "sample_shape", None) is not None or has_config


class Unconditional(Family):
    """Any diffusers model called as ``model(sample, timestep)`` whose sample shape is known (:func:`declares_shape`):
    UNet2DModel, :class:`mmgibbs.GaussianMixtureDenoiser`, or a custom ``ModelMixin`` with ``sample_shape``."""

    name = "unconditional UNet2DModel (DDPM, DDIM, PNDM, ScoreSdeVe, LDM pipelines)"
    hosts = ("DDPMPipeline", "DDIMPipeline", "PNDMPipeline", "ScoreSdeVePipeline", "LDMPipeline", "KarrasVePipeline")
    model_classes = ("UNet2DModel", "GaussianMixtureDenoiser")

    @classmethod
    def check_model(cls, model: Any, argument: str) -> None:
        """A model of no family's own class must declare its sample shape and be called as UNet2DModel is."""
        if not declares_shape(model):
            raise ValueError(
                f"`{argument}` ({type(model).__name__}) must declare `sample_shape` (one sample's shape) or have "
                "`in_channels` and `sample_size` in its config, as UNet2DModel does, to sample it unconditionally."
            )
        try:
            inspect.signature(model.forward).bind(None, None)
        except (TypeError, ValueError):
            raise ValueError(
                f"`{argument}` ({type(model).__name__}) must be callable as model(sample, timestep), as UNet2DModel "
                f"is; its forward takes {inspect.signature(model.forward)}."
            ) from None

    def __init__(self, host: Any, unet: torch.nn.Module, vqvae: torch.nn.Module | None = None):
        super().__init__(host)
        self.unet, self.vqvae = unet, vqvae

    def prepare(
        self,
        scheduler: Any,
        *,
        batch_size: int | None = None,
        generator: Any = None,
        latents: torch.Tensor | None = None,
        x_init: torch.Tensor | None = None,
        device: torch.device | None = None,
    ) -> Job:
        """The chain's start: ``latents`` (x_t at the first level), ``x_init`` re-noised to it, or N(0, I) scaled.

        ``batch_size`` defaults to the number of samples in ``latents`` / ``x_init`` (else 1); either must have
        shape (batch_size, *sample shape)."""
        if latents is not None and x_init is not None:
            raise ValueError(
                "Pass `x_init` (a clean start, re-noised to the first level) or `latents` (the noisy start), not both."
            )
        given, name = (latents, "latents") if latents is not None else (x_init, "x_init")
        if batch_size is None:
            batch_size = len(given) if given is not None and given.ndim > 0 else 1
        one = sample_shape(self.unet)
        shape = (batch_size, *one)
        if given is not None:
            check_shape(given, shape, name, f"`batch_size` samples of the model's sample shape {one}")
        dtype = work_dtype(self.unet.dtype)
        if latents is not None:
            sample = latents.to(device, dtype)
        elif x_init is not None:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            sample = scheduler.add_noise(x_init.to(device, dtype), noise, scheduler.timesteps[:1].cpu())
        else:
            sample = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * scheduler.init_noise_sigma
        return Job(latents=sample, predict=self.predict(scheduler), finish=self.finish, callback_name="sample")

    def predict(self, scheduler: Any) -> Any:
        """The network as ``(model_input, t) -> prediction`` (:func:`model_predict`; energy models override it)."""
        return model_predict(self.unet)

    def finish(self, sample: torch.Tensor, output_type: str) -> Any:
        if output_type == "latent":
            return sample
        if self.vqvae is not None:
            sample = self.vqvae.decode(sample.to(self.vqvae.dtype)).sample
        if sample.ndim != 4:  # vectors and other non-image samples come back raw
            if output_type == "pil":
                raise ValueError(f"output_type='pil' needs image samples (N, C, H, W); got {tuple(sample.shape)}.")
            return sample.cpu().numpy() if output_type == "np" else sample
        return postprocess(sample, output_type)
