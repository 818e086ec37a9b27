"""Argument checks shared by the scheduler and the pipeline: a bad input gets an error naming the argument where it
was passed, instead of an AttributeError or a broadcast deep inside torch or diffusers.

The conventions are diffusers' own wherever it has one: a list of generators has one generator per sample (its
pipelines refuse other lengths), tensors are torch tensors (its pipelines call ``.to`` on ``latents``).
"""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


class Unset(enum.Enum):
    """The type of :data:`UNSET`."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "<not passed>"


#: the default of a call argument for which None is a value (``variance_bound=None``: no bound), so that "not
#: passed" can be told apart from None
UNSET = Unset.UNSET


def check_generator(
    generator: Any, batch: int | None = None, argument: str = "generator", *, one: str | None = None
) -> None:
    """``generator`` is None, a ``torch.Generator`` or a list of them with one per sample (``batch`` of them).

    diffusers' ``randn_tensor`` reads a one-element list as a single generator and ignores generators past the
    batch; both would pass silently here, so any other length than ``batch`` is refused, as diffusers' pipelines
    refuse it (``prepare_latents``). ``one``: lists are refused, for this reason (where one stream serves all).
    """
    if generator is None or isinstance(generator, torch.Generator):
        return
    if one is not None:
        raise TypeError(
            f"`{argument}` must be a torch.Generator or None ({one}); got {type(generator).__name__}. Seed one with "
            "torch.Generator().manual_seed(seed)."
        )
    if not isinstance(generator, list):
        raise TypeError(
            f"`{argument}` must be a torch.Generator or a list of them (one per sample); got "
            f"{type(generator).__name__}. Seed one with torch.Generator().manual_seed(seed)."
        )
    for i, item in enumerate(generator):
        if not isinstance(item, torch.Generator):
            raise TypeError(f"`{argument}[{i}]` must be a torch.Generator; got {type(item).__name__}.")
    if batch is not None and len(generator) != batch:
        raise ValueError(
            f"{len(generator)} generators in `{argument}` for a batch of {batch}: pass one torch.Generator per "
            "sample, or a single one for the whole batch."
        )


def check_scheduler(value: Any, argument: str = "scheduler") -> None:
    """A diffusers scheduler instance (an MMGibbsScheduler or one to convert): None, config dicts and class names
    are refused naming ``argument`` (a string used to fail with "'str' object has no attribute 'config'")."""
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    if value is None:
        raise ValueError(f"`{argument}` is required: an MMGibbsScheduler or any diffusers scheduler to convert.")
    if not isinstance(value, SchedulerMixin) or not hasattr(value, "config"):
        raise TypeError(
            f"`{argument}` must be a diffusers scheduler (an MMGibbsScheduler or one to convert); got "
            f"{type(value).__name__}. From a config: MMGibbsScheduler.from_config(config); from a class name: e.g. "
            "diffusers.DDIMScheduler.from_config(pipe.scheduler.config)."
        )


def check_tensor(value: Any, argument: str, *, floating: bool = False) -> torch.Tensor:
    """``value`` as a torch tensor of real numbers, or a TypeError naming ``argument``.

    numpy arrays are refused with the conversion to use (diffusers' pipelines do not take them either: they call
    ``.to`` on tensors); complex and boolean tensors are refused; ``floating`` also refuses integer dtypes.
    """
    if not isinstance(value, torch.Tensor):
        hint = " (convert it with torch.from_numpy)" if type(value).__module__ == "numpy" else ""
        raise TypeError(f"`{argument}` must be a torch.Tensor; got {type(value).__name__}{hint}.")
    if value.is_complex() or value.dtype == torch.bool or (floating and not value.is_floating_point()):
        kind = "floating-point" if floating else "real-valued"
        raise TypeError(f"`{argument}` must be a {kind} tensor; got {value.dtype}.")
    return value


def check_shape(value: torch.Tensor, expected: Sequence[int], argument: str, what: str = "") -> None:
    """A ValueError naming ``argument`` when ``value`` does not have shape ``expected`` (``what`` says why)."""
    if tuple(value.shape) != tuple(expected):
        raise ValueError(
            f"`{argument}` must have shape {tuple(expected)}{f' ({what})' if what else ''}; got {tuple(value.shape)}."
        )


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    """A ValueError naming ``name`` and listing the choices when ``value`` is not one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, allowed))}; got {value!r}.")


def is_real(value: Any) -> bool:
    """A real number (numpy scalars included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_number(
    value: Any,
    argument: str,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    hint: str = "",
) -> None:
    """A real (or integer) finite number in [low, high] (``low_open``: (low, high]); bools are not numbers here.

    Raises a ValueError naming ``argument`` (``hint``: what else it may be, e.g. " (or None: ...)"); numpy scalars
    count as numbers, bools and strings do not.
    """
    ok = is_real(value) and (not integer or isinstance(value, numbers.Integral))
    if ok:
        ok = math.isfinite(value)
        ok = ok and (low is None or (value > low if low_open else value >= low))
        ok = ok and (high is None or value <= high)
    if not ok:
        kind = "an integer" if integer else "a finite number"
        bounds = ""
        if low is not None and high is not None:
            bounds = f" in {'(' if low_open else '['}{low:g}, {high:g}]"
        elif low is not None:
            bounds = f" {'>' if low_open else '>='} {low:g}"
        raise ValueError(f"`{argument}` must be {kind}{bounds}{hint}; got {value!r}.")


def check_steps(value: Any, argument: str = "num_inference_steps") -> list[int]:
    """A step count (an integer >= 1) or a non-empty sequence of them, as a list (a ValueError naming
    ``argument`` otherwise: an empty list would calibrate nothing, 2.5 and None fail inside ``range``)."""
    items = [value] if not isinstance(value, Sequence) or isinstance(value, str) else list(value)
    ok = bool(items) and all(is_real(v) and isinstance(v, numbers.Integral) and v >= 1 for v in items)
    if not ok:
        raise ValueError(f"`{argument}` must be a positive integer or a non-empty sequence of them; got {value!r}.")
    return [int(v) for v in items]


def check_finite(value: torch.Tensor, argument: str) -> None:
    """A ValueError naming ``argument`` when the tensor holds NaN or infinite values (one host sync: for inputs
    checked once, not inside a sampling loop)."""
    bad = int((~torch.isfinite(value)).sum())
    if bad:
        raise ValueError(f"`{argument}` contains NaN or infinite values ({bad} of {value.numel()} entries).")


def check_samples(value: Any, argument: str, shape: Sequence[int] | None = None) -> torch.Tensor:
    """A finite floating-point tensor of samples, batch first: (N, *shape) when ``shape`` (one sample's) is given,
    else (N, ...) with at least one more dimension. Errors name ``argument`` and the expected shape."""
    check_tensor(value, argument, floating=True)
    if shape is not None and (value.ndim != len(shape) + 1 or tuple(value.shape[1:]) != tuple(shape)):
        expected = ", ".join(["N", *map(str, shape)])
        raise ValueError(
            f"`{argument}` must have shape ({expected}): N samples of the model's sample shape {tuple(shape)}; got "
            f"{tuple(value.shape)}."
        )
    if value.ndim < 2 or len(value) == 0:
        raise ValueError(f"`{argument}` must hold N >= 1 samples, batch first (N, ...); got {tuple(value.shape)}.")
    check_finite(value, argument)
    return value


def check_calibration(
    count: int,
    dim: int,
    *,
    num_clusters: Any,
    rank: Any,
    shrinkage: Any,
    batch_size: Any,
    generator: Any,
    factor_iterations: Any,
    source: str = "`samples`",
) -> None:
    """The settings of a calibrated covariance table (``mmgibbs.calibration``) for ``count`` clean samples of
    dimension ``dim``: ``num_clusters`` in [1, count] (k-means needs a sample per cluster), ``rank`` in [1, dim] (or
    None),
    ``shrinkage`` finite >= 0, ``batch_size`` an integer >= 1 or None, ``factor_iterations`` >= 1, one generator.

    Without these checks rank -1 gave rank d - 1, 0 or -2 clusters gave one, a negative shrinkage a math domain
    error and a negative batch size a k-means error, after every model call."""
    check_number(num_clusters, "num_clusters", integer=True, low=1)
    if rank is not None:  # None: the default rank, at most d
        check_number(rank, "rank", integer=True, low=1, high=dim, hint=f" (the sample dimension is {dim})")
    check_number(shrinkage, "shrinkage", low=0.0)
    if batch_size is not None:
        check_number(batch_size, "batch_size", integer=True, low=1, hint=" (or None: all samples at once)")
    check_number(factor_iterations, "factor_iterations", integer=True, low=1)
    check_generator(generator, one="the calibration noise of every sample and the clustering come from one stream")
    if count < num_clusters:
        raise ValueError(
            f"{source} holds {count} sample{'s' * (count != 1)} for `num_clusters`={num_clusters}: k-means needs at "
            "least one sample per cluster (and each cluster's covariance many more); pass more samples or fewer "
            "clusters."
        )


def pixel_images(image: Any) -> Any:
    """The ``image`` of image-to-image and inpainting as diffusers' image processor should read it: uint8 numpy
    arrays (N, H, W, C) / (H, W, C) and uint8 tensors (N, C, H, W) / (C, H, W) are scaled from [0, 255] to
    [0, 1] (float32), PIL images of another mode than RGB (RGBA, grayscale, palette) are converted to RGB, and a
    uint8 image with 4 channels is RGBA: its alpha channel is dropped. Lists are converted item by item; float
    images (in [0, 1], or 4-channel latents) pass unchanged.

    The processor itself reads a uint8 image as if it were in [0, 1] (values up to 2 * 255 - 1 = 509 after its
    normalisation), an RGBA image as four latent channels and a grayscale image as one channel (failing in the
    VAE)."""
    from PIL import Image

    if isinstance(image, list):
        return [pixel_images(item) for item in image]
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        image = image[..., :3] if image.ndim >= 3 and image.shape[-1] == 4 else image
        return image.astype(np.float32) / 255.0
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8:
        image = image[..., :3, :, :] if image.ndim >= 3 and image.shape[-3] == 4 else image
        return image.float() / 255.0
    return image


def per_image(value: torch.Tensor, argument: str, prompts: int, images_per_prompt: int) -> torch.Tensor:
    """Images (or masks, latents) ``value`` (n, ...) for ``prompts`` x ``images_per_prompt`` generated images: one
    for all (n = 1, as passed: the host repeats it), one per prompt (repeated for each image of its prompt), or one
    per generated image; any other count is a ValueError naming ``argument``.

    diffusers' image-to-image hosts tile images (``torch.cat([image] * k)``) where prompts repeat per image, so one
    image per prompt went with the wrong prompt for ``images_per_prompt`` > 1, and more images than prompts failed
    inside the UNet's cross-attention (or in ``add_noise`` with 0 images)."""
    count, batch = len(value), prompts * images_per_prompt
    if count == 1 or count == batch:
        return value
    if count == prompts:
        return value.repeat_interleave(images_per_prompt, dim=0)
    raise ValueError(
        f"`{argument}` holds {count} images for {batch} generated image{'s' * (batch != 1)} ({prompts} "
        f"prompt{'s' * (prompts != 1)} x num_images_per_prompt={images_per_prompt}): pass one, one per prompt or "
        "one per generated image."
    )


def check_embeddings(value: Any, argument: str, ndim: int, width: int | None, what: str) -> None:
    """Prompt embeddings passed instead of prompts: a floating-point torch tensor of ``ndim`` dimensions ((batch,
    sequence, width) or pooled (batch, width)) whose last dimension is ``width`` (``what`` says whose), or an error
    naming ``argument`` (numpy arrays failed with AttributeError, other shapes inside the network)."""
    check_tensor(value, argument, floating=True)
    if value.ndim != ndim:
        axes = "(batch, sequence, width)" if ndim == 3 else "(batch, width)"
        raise ValueError(f"`{argument}` must be a {ndim}-d tensor {axes}; got shape {tuple(value.shape)}.")
    if width is not None and value.shape[-1] != width:
        raise ValueError(f"`{argument}` must have width {width} ({what}); got {value.shape[-1]}.")


def check_prompt(value: Any, argument: str) -> None:
    """``value`` is None, a string or a non-empty list of strings (what diffusers' text encoders take)."""
    if value is None or isinstance(value, str):
        return
    if not (isinstance(value, list) and value and all(isinstance(item, str) for item in value)):
        raise ValueError(f"`{argument}` must be a string or a non-empty list of strings; got {value!r}.")


#: host pipeline call arguments that are plain numbers, with their ranges (checked before any host method runs)
HOST_NUMBERS: dict[str, dict[str, Any]] = {
    "num_images_per_prompt": {"integer": True, "low": 1},
    "height": {"integer": True, "low": 1},
    "width": {"integer": True, "low": 1},
    "guidance_scale": {},
    "true_cfg_scale": {},
    "guidance_rescale": {"low": 0.0, "high": 1.0},
    "strength": {"low": 0.0, "high": 1.0},
    "clip_skip": {"integer": True, "low": 0},
    "max_sequence_length": {"integer": True, "low": 1},
    "aesthetic_score": {},
    "negative_aesthetic_score": {},
}

#: host pipeline call arguments that are prompts
PROMPTS = ("prompt", "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3")

#: prompt embeddings -> the prompts they replace (diffusers' pipelines refuse both)
EMBEDDED_PROMPTS = {
    "prompt_embeds": ("prompt", "prompt_2", "prompt_3"),
    "negative_prompt_embeds": ("negative_prompt", "negative_prompt_2", "negative_prompt_3"),
}


def check_host_arguments(arguments: dict[str, Any]) -> None:
    """The host pipeline's numeric call arguments and prompts, each against its range (:data:`HOST_NUMBERS`),
    naming the argument; None means the host's default. Host pipelines check only some of them, late (a zero
    ``num_images_per_prompt`` fails inside the text encoder's reshape, a NaN ``guidance_scale`` runs)."""
    for embeds, words in EMBEDDED_PROMPTS.items():
        passed = [name for name in words if arguments.get(name) is not None]
        if passed and arguments.get(embeds) is not None:  # the host's message prints the whole tensor
            raise ValueError(f"Pass `{passed[0]}` or `{embeds}`, not both: the embeddings replace the encoded prompt.")
    for name, value in arguments.items():
        if value is None:
            continue
        if name in HOST_NUMBERS:
            check_number(value, name, **HOST_NUMBERS[name])
        elif name in PROMPTS:
            check_prompt(value, name)
