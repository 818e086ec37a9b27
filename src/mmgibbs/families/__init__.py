"""Model families: one adapter per kind of diffusers model (see ``mmgibbs.families.base``).

To add a family: subclass :class:`Family` in a module of its own, implement ``prepare`` with the host pipeline's
own methods, and list it in :data:`FAMILIES`.
"""

from __future__ import annotations

import torch

from .base import Family, Job, guided, postprocess
from .dit import DiT
from .flux import Flux
from .pixart import PixArt
from .sd3 import StableDiffusion3
from .stable_diffusion import StableDiffusion
from .stable_diffusion_xl import StableDiffusionXL
from .unconditional import Unconditional, model_predict, sample_shape

#: every supported family, tried in order
FAMILIES: tuple[type[Family], ...] = (
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
    return "; ".join(f"{f.name}: {', '.join(f.hosts)}" for f in FAMILIES)


def family_of(host_class: str | None, model: torch.nn.Module | None = None) -> type[Family]:
    """The family of a host pipeline class name (or, with none, of the denoiser's class); a clear error naming
    the supported families otherwise."""
    for family in FAMILIES:
        if family.matches(host_class, model):
            return family
    what = f"pipeline {host_class}" if host_class else f"model {type(model).__name__}"
    raise ValueError(f"MomentMatchingGibbsPipeline does not support the {what}. Supported: {supported()}.")


__all__ = [
    "FAMILIES",
    "Family",
    "Job",
    "family_of",
    "guided",
    "model_predict",
    "postprocess",
    "sample_shape",
    "supported",
]
