"""Argument checks shared by the scheduler and the pipeline: a bad input gets an error naming the argument where it
was passed, instead of an AttributeError or a broadcast deep inside torch or diffusers.

The conventions are diffusers' own wherever it has one: a list of generators has one generator per sample (its
pipelines refuse other lengths), tensors are torch tensors (its pipelines call ``.to`` on ``latents``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def check_generator(generator: Any, batch: int | None = None, argument: str = "generator") -> None:
    """``generator`` is None, a ``torch.Generator`` or a list of them with one per sample (``batch`` of them).

    diffusers' ``randn_tensor`` reads a one-element list as a single generator and ignores generators past the
    batch; both would pass silently here, so any other length than ``batch`` is refused, as diffusers' pipelines
    refuse it (``prepare_latents``).
    """
    if generator is None or isinstance(generator, torch.Generator):
        return
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
) -> None:
    """A real (or integer) finite number in [low, high] (``low_open``: (low, high]); bools are not numbers here.

    Raises a ValueError naming ``argument``; numpy scalars count as numbers, bools and strings do not.
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
        raise ValueError(f"`{argument}` must be {kind}{bounds}; got {value!r}.")


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


def check_host_arguments(arguments: dict[str, Any]) -> None:
    """The host pipeline's numeric call arguments and prompts, each against its range (:data:`HOST_NUMBERS`),
    naming the argument; None means the host's default. Host pipelines check only some of them, late (a zero
    ``num_images_per_prompt`` fails inside the text encoder's reshape, a NaN ``guidance_scale`` runs)."""
    for name, value in arguments.items():
        if value is None:
            continue
        if name in HOST_NUMBERS:
            check_number(value, name, **HOST_NUMBERS[name])
        elif name in PROMPTS:
            check_prompt(value, name)
