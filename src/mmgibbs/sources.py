"""The diffusers scheduler a config came from (its *source*), and the noise levels that scheduler lays out.

``MMGibbsScheduler.from_config(pipe.scheduler.config)`` remembers the source class in the config key
``source_scheduler``; ``set_timesteps`` then builds that diffusers class from the same config and takes the
timesteps it lays out, so every layout option of the source is honoured by the source's own code:
``timestep_spacing``, ``steps_offset``, ``use_karras_sigmas`` / ``use_exponential_sigmas`` / ``use_beta_sigmas``,
``use_lu_lambdas``, ``lambda_min_clipped``, flow ``shift`` / ``use_dynamic_shifting`` (``mu``) / ``shift_terminal`` /
``time_shift_type``, ``use_flow_sigmas`` / ``flow_shift``, EDM ``sigma_schedule`` / ``rho`` and so on.

The levels are the source's timesteps, i.e. what the model is called with; each level's noise follows from its
timestep (``NoiseSchedule.alpha_s``), so the model's conditioning and the Gibbs step agree. Where the source
rounds its timesteps (DPM-Solver, UniPC, DEIS with Karras sigmas), a level's sigma is that of the rounded
timestep the model is told, not the unrounded Karras sigma. Second-order layouts are reduced to their levels:
Heun's repeated timesteps once each, KDPM2's interleaved midpoints dropped, PNDM's Runge-Kutta warm-up
replaced by its base grid (``_timesteps``).

Options of the source that are not about noise levels belong to its solver, which the Gibbs step replaces:
solver order/type, ``lower_order_final``, ``euler_at_final``, ``algorithm_type``, DDPM's ``variance_type``
(``fixed_small``, ...), DDIM's ``set_alpha_to_one`` and PNDM's ``skip_prk_steps`` (the chain ends with x itself
at noise 0, as ``final_output`` says), stochastic-sampling settings (``s_churn``, ``s_noise``, ...).
Options that would change the result but are not implemented are refused with a clear error
(:data:`REFUSED_OPTIONS`), as are schedulers whose models are not denoisers (:data:`REFUSED_SOURCES`).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import logging as std_logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch

# source class -> how its `timesteps` become levels
_TIMESTEPS, _PNDM, _EVERY_OTHER, _NATIVE = "timesteps", "pndm", "every_other", "native"
SOURCE_LAYOUTS: dict[str, str] = {
    # VP (beta) schedules
    "DDPMScheduler": _TIMESTEPS,
    "DDPMParallelScheduler": _TIMESTEPS,
    "DDIMScheduler": _TIMESTEPS,
    "DDIMParallelScheduler": _TIMESTEPS,
    "DEISMultistepScheduler": _TIMESTEPS,
    "DPMSolverMultistepScheduler": _TIMESTEPS,
    "DPMSolverSinglestepScheduler": _TIMESTEPS,
    "DPMSolverSDEScheduler": _TIMESTEPS,
    "UniPCMultistepScheduler": _TIMESTEPS,
    "SASolverScheduler": _TIMESTEPS,
    "EulerDiscreteScheduler": _TIMESTEPS,
    "EulerAncestralDiscreteScheduler": _TIMESTEPS,
    "LMSDiscreteScheduler": _TIMESTEPS,
    "HeunDiscreteScheduler": _TIMESTEPS,
    "PNDMScheduler": _PNDM,
    "KDPM2DiscreteScheduler": _EVERY_OTHER,
    "KDPM2AncestralDiscreteScheduler": _EVERY_OTHER,
    # EDM
    "EDMEulerScheduler": _TIMESTEPS,
    "EDMDPMSolverMultistepScheduler": _TIMESTEPS,
    # flow matching
    "FlowMatchEulerDiscreteScheduler": _TIMESTEPS,
    "FlowMatchHeunDiscreteScheduler": _TIMESTEPS,
    # laid out by NoiseSchedule.inference_timesteps: ScoreSdeVe's `timesteps` are not what its model is called
    # with (its sigmas are); the cosine scheduler is the EDM layout and needs torchsde to be built
    "ScoreSdeVeScheduler": _NATIVE,
    "CosineDPMSolverMultistepScheduler": _NATIVE,
}

_CONSISTENCY = (
    "its model is a consistency model: it predicts the end point of the probability-flow ODE, not the posterior "
    "mean E[x | x_t] that moment-matching Gibbs sampling needs (Tweedie's formula does not apply)"
)
#: schedulers whose configs cannot be sampled with MMGibbs, and why
REFUSED_SOURCES: dict[str, str] = {
    "CMStochasticIterativeScheduler": _CONSISTENCY + "; sample it with CMStochasticIterativeScheduler",
    "LCMScheduler": _CONSISTENCY + " (latent consistency distillation); sample it with LCMScheduler",
    "TCDScheduler": _CONSISTENCY + " (trajectory consistency distillation); sample it with TCDScheduler",
    "FlowMatchLCMScheduler": _CONSISTENCY + "; sample it with FlowMatchLCMScheduler",
    "SCMScheduler": _CONSISTENCY + "; sample it with SCMScheduler",
    "DDIMInverseScheduler": "it inverts (data -> noise) rather than samples; use DDIMScheduler's config",
    "DPMSolverMultistepInverseScheduler": "it inverts (data -> noise) rather than samples; use "
    "DPMSolverMultistepScheduler's config",
    "KarrasVeScheduler": "its model convention (input (x + 1) / 2, output scaled by sigma / 2) lives in the "
    "deprecated KarrasVePipeline; use a ScoreSdeVeScheduler or EDM config",
    "RePaintScheduler": "its resampling loop (undo_step) belongs to RePaintPipeline",
}

#: option -> (allowed values, why other values are refused)
REFUSED_OPTIONS: dict[str, tuple[tuple[Any, ...], str]] = {
    "thresholding": (
        (False, None),
        "dynamic thresholding (Imagen) of the predicted x0 is not implemented; `clip_sample` is",
    ),
    "timestep_type": (
        ("discrete", None),
        "Euler's continuous timesteps (0.25 log sigma, VE-frame model input) are not supported",
    ),
    "final_sigmas_type": (
        ("zero", None),
        "the chain ends with x itself at noise 0 (`final_output`), not at sigma_min",
    ),
    "invert_sigmas": ((False, None), "inverted (noise -> data reversed) sigmas are not a sampling schedule"),
}

# configs with identical keys whose layouts agree: a key-set match may pick any, the first is used
_EQUIVALENT = (
    ("DDIMScheduler", "DDIMParallelScheduler"),
    ("DDPMScheduler", "DDPMParallelScheduler"),
    ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"),
    ("LCMScheduler", "TCDScheduler"),
)
_SIGMA_SPACINGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def _diffusers_class(name: str) -> Any:
    import diffusers

    return getattr(diffusers, name, None)


def _is_dummy(cls: Any) -> bool:
    from diffusers.utils import DummyObject

    return isinstance(cls, DummyObject)


@functools.cache
def init_keys(name: str) -> frozenset[str]:
    """The ``__init__`` arguments (config keys) of diffusers scheduler ``name``; empty if it cannot be imported."""
    cls = _diffusers_class(name)
    if cls is None or _is_dummy(cls):
        return frozenset()
    return frozenset(k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "args", "kwargs"))


def refuse_source(name: str | None) -> None:
    """Raise the reason a source scheduler cannot be sampled with MMGibbs, if it cannot."""
    if name in REFUSED_SOURCES:
        raise ValueError(f"MMGibbsScheduler cannot sample a {name} config: {REFUSED_SOURCES[name]}.")
    if name is not None and name not in SOURCE_LAYOUTS:
        raise ValueError(
            f"MMGibbsScheduler does not know how {name} lays out its noise levels; supported sources are "
            f"{', '.join(sorted(SOURCE_LAYOUTS))}. To sample with MMGibbs's own layout instead, pass "
            "`source_scheduler=None` and `noise_family`."
        )


def identify_source(config: Mapping[str, Any]) -> str | None:
    """The diffusers scheduler class a (foreign) config belongs to.

    ``_class_name`` when the config has it (configs loaded from disk, and converted ones); else the class whose
    ``__init__`` arguments are all keys of the config, the largest such set (``scheduler.config`` of a scheduler
    built in Python has exactly its class's keys, plus keys kept for compatible classes). ``None`` when no class
    matches (a hand-written dict): MMGibbs then lays out levels itself.
    """
    name = config.get("_class_name")
    if isinstance(name, str) and name != "MMGibbsScheduler":
        return name
    keys = {k for k in config if not k.startswith("_")}
    names = [n for n in (*SOURCE_LAYOUTS, *REFUSED_SOURCES) if init_keys(n) and init_keys(n) <= keys]
    if not names:
        return None
    size = max(len(init_keys(n)) for n in names)
    best = [n for n in names if len(init_keys(n)) == size]
    for group in _EQUIVALENT:
        if set(best) <= set(group):
            return next(n for n in group if n in best)
    kdpm2 = {"KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"}
    if set(best) <= kdpm2 | {"LMSDiscreteScheduler"} and not any(config.get(k) for k in _SIGMA_SPACINGS):
        return "LMSDiscreteScheduler"  # the same levels, unless KDPM2 rounds Karras/exponential/beta timesteps
    if len(best) > 1:
        raise ValueError(
            f"This config fits several schedulers ({', '.join(sorted(best))}) whose levels differ with its "
            "options: pass `source_scheduler=` naming the one it belongs to."
        )
    return best[0]


def check_options(source: str | None, config: Mapping[str, Any]) -> None:
    """Refuse option values of the source that MMGibbs would otherwise ignore (see :data:`REFUSED_OPTIONS`)."""
    keys = init_keys(source) if source else frozenset(config)
    for key, (allowed, why) in REFUSED_OPTIONS.items():
        if key in keys and key in config and config[key] not in allowed:
            raise ValueError(
                f"`{key}={config[key]!r}` of the {source or 'source'} config is not supported: {why}. Pass "
                f"`{key}={allowed[0]!r}` to convert this config."
            )


def check_keyword_arguments(kwargs: Mapping[str, Any], ours: frozenset[str], source: str | None) -> None:
    """Every explicit keyword of ``from_config`` is a setting of MMGibbs or an option of the source scheduler.

    A misspelt setting (``covarience=``) would otherwise be dropped by diffusers with a log line, silently
    keeping the default.
    """
    allowed = ours | init_keys(source) if source else ours
    for key in kwargs:
        if key.startswith("_") or key in allowed:
            continue
        close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        where = f"MMGibbsScheduler or of the source scheduler {source}" if source else "MMGibbsScheduler"
        raise TypeError(f"`{key}` is not a setting of {where}.{hint}")


@contextlib.contextmanager
def _quiet(module: str) -> Iterator[None]:
    """Silence a source scheduler's warnings about its own solver settings while we only read its layout."""
    logger = std_logging.getLogger(module)
    level = logger.level
    logger.setLevel(std_logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


#: options that shape a source's levels, quoted when its layout is refused
LAYOUT_OPTIONS = (
    "num_train_timesteps",
    "timestep_spacing",
    "steps_offset",
    *_SIGMA_SPACINGS,
    "use_lu_lambdas",
    "lambda_min_clipped",
    "shift",
    "use_dynamic_shifting",
    "shift_terminal",
    "use_flow_sigmas",
    "flow_shift",
    "sigma_schedule",
)


def layout_options(name: str, config: Mapping[str, Any]) -> str:
    """``timestep_spacing='leading', steps_offset=1, ...``: the layout options of source ``name`` in ``config``."""
    keys = init_keys(name)
    return ", ".join(f"{k}={config[k]!r}" for k in LAYOUT_OPTIONS if k in keys and k in config)


def source_levels(
    name: str,
    config: Mapping[str, Any],
    num_inference_steps: int | None = None,
    sigmas: Any = None,
    mu: float | None = None,
) -> torch.Tensor:
    """The descending levels (float64 model timesteps) that diffusers scheduler ``name`` lays out.

    ``config`` is the MMGibbs config: the keys the source's ``__init__`` takes are passed to it (``None`` values
    left to its defaults; ``prediction_type`` is not about levels). ``sigmas`` (the source's units) and ``mu``
    go to its ``set_timesteps`` when it takes them.
    """
    cls = _diffusers_class(name)
    if cls is None or _is_dummy(cls):
        raise ImportError(
            f"Laying out the levels of {name} needs its diffusers class, which cannot be imported here (it "
            "needs an optional backend such as torchsde)."
        )
    kwargs = {k: config[k] for k in init_keys(name) if config.get(k) is not None and k != "prediction_type"}
    params = inspect.signature(cls.set_timesteps).parameters
    call: dict[str, Any] = {}
    if sigmas is not None:
        if "sigmas" not in params:
            raise ValueError(f"`sigmas` cannot be passed: the source scheduler {name} does not take custom sigmas.")
        call["sigmas"] = sigmas
    else:
        call["num_inference_steps"] = num_inference_steps
    if mu is not None and "mu" in params:
        call["mu"] = mu
    with _quiet(cls.__module__):
        source = cls(**kwargs)
        source.set_timesteps(**call)
    kind = SOURCE_LAYOUTS[name]
    if kind == _PNDM:
        levels = torch.as_tensor(source._timesteps[::-1].copy(), dtype=torch.float64)
    else:
        levels = torch.as_tensor(source.timesteps, dtype=torch.float64).cpu()
        if kind == _EVERY_OTHER:
            levels = levels[::2]
    keep = torch.ones(len(levels), dtype=torch.bool)
    keep[1:] = levels[1:] != levels[:-1]  # a level is visited once per sweep; repeats are sweeps, not levels
    return levels[keep]
