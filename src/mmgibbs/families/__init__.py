"""Model families: one adapter per kind of diffusers model (see ``mmgibbs.families.base``).

To add a family: subclass :class:`Family` in a module of its own, implement ``prepare`` with the host pipeline's
own methods, and list it in :data:`FAMILIES`.
"""

from __future__ import annotations

import torch

from .base import Family, Job, guided, postprocess
from .dit import DiT
from .energy import Energy
from .flux import Flux
from .pixart import PixArt
from .sd3 import StableDiffusion3
from .stable_diffusion import StableDiffusion
from .stable_diffusion_xl import StableDiffusionXL
from .unconditional import Unconditional, declares_shape, model_predict, sample_shape

#: every supported family, tried in order
FAMILIES: tuple[type[Family], ...] = (
    Energy,
    Unconditional,
    StableDiffusion,
    StableDiffusionXL,
    StableDiffusion3,
    Flux,
    DiT,
    PixArt,
)


def supported() -> str:
    """The supported families and host pipelines, for error messages."""
    return "; ".join(f"{f.name}: {', '.join(f.hosts) or 'no host pipeline (pass it as `unet`)'}" for f in FAMILIES)


def family_of(host_class: str | None, model: torch.nn.Module | None = None) -> type[Family]:
    """The family of a host pipeline class name (or, with none, of the denoiser's class; a model of no family's
    class that declares its sample shape is unconditional); a clear error naming the supported families otherwise."""
    for family in FAMILIES:
        if family.matches(host_class, model):
            return family
    if host_class is None and model is not None and declares_shape(model):
        return Unconditional
    what = f"pipeline {host_class}" if host_class else f"model {type(model).__name__}"
    raise ValueError(f"MomentMatchingGibbsPipeline does not support the {what}. Supported: {supported()}.")


def check_denoiser(family: type[Family], model: torch.nn.Module, argument: str) -> None:
    """``model``, passed as ``argument`` (``unet``/``transformer``), can be ``family``'s denoiser: under the name
    the family's hosts give it, not a model of another family (a UNet2DModel for Stable Diffusion used to fail deep
    inside the host with an AttributeError), and, for an unconditional model of no family's class, with a known
    sample shape and UNet2DModel's call convention (:meth:`Unconditional.check_model`)."""
    if argument != family.model:
        raise ValueError(f"{family.name} takes its denoiser as `{family.model}`; got `{argument}`.")
    owner = next((f for f in FAMILIES if f.matches(None, model)), None)
    if owner is not None and not issubclass(family, owner):
        raise ValueError(
            f"`{argument}` is a {type(model).__name__}, the denoiser of {owner.name}; this pipeline is "
            f"{family.name} and needs its own."
        )
    if owner is None and family is Unconditional:
        Unconditional.check_model(model, argument)


__all__ = [
    "FAMILIES",
    "Energy",
    "Family",
    "Job",
    "check_denoiser",
    "family_of",
    "guided",
    "model_predict",
    "postprocess",
    "sample_shape",
    "supported",
]
