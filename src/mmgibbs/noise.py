"""Noise parametrisation: every diffusers noise family in the variance-exploding frame of the method.

A diffusers model at timestep ``t`` sees

    x_t = alpha_t * x + s_t * eps,        eps ~ N(0, I).

Dividing by ``alpha_t`` gives the frame of Zhang et al. (2023), in which the denoiser at noise level ``sigma``
represents the noisy marginal p~(y):

    y = x_t / alpha_t = x + sigma * eps,   sigma = s_t / alpha_t.

Families (``timestep`` is always the value the model is called with):

=========  ==========================  ====================  ============================================
family     alpha_t, s_t                 timestep              configs
=========  ==========================  ====================  ============================================
``vp``     sqrt(abar_t), sqrt(1-abar_t) integer train step    DDPM, DDIM, PNDM, Euler(-ancestral), DPM-Solver,
                                                                UniPC, ... (``beta_schedule``/``trained_betas``)
``ve``     1, sigma                     sigma                 ScoreSdeVe / NCSN, single-level DSM models
``edm``    1, sigma                     log(sigma) / 4        EDM-Euler, EDM-DPM-Solver (Karras et al. 2022)
                                        atan(sigma) * 2 / pi  CosineDPMSolverMultistep (Stable Audio)
``flow``   1 - u, u                     u * num_train_steps   FlowMatchEuler (rectified flow), DPM-Solver /
                                                                UniPC with ``use_flow_sigmas``
=========  ==========================  ====================  ============================================

VP timesteps may be fractional (Euler, Heun, LMS lay them out so); sigma = s_t / alpha_t is then interpolated
linearly between training steps, as those schedulers do. A flow level at u = 1 (alpha = 0, pure noise) has no
finite sigma: laid-out levels there are clamped to u = 1 - 1 / num_train_timesteps, custom timesteps refused.

Each prediction type maps to the posterior mean mu = E[x | x_t] = E[x | y] (Tweedie):

* ``epsilon``:      mu = (x_t - s_t eps_hat) / alpha_t
* ``v_prediction``: mu = (alpha_t x_t - s_t v_hat) / (alpha_t^2 + s_t^2),  v = alpha_t eps - s_t x
* ``sample``:       mu = x0_hat
* ``flow``:         mu = (x_t - s_t v_hat) / (alpha_t + s_t),              v = eps - x
* ``score``:        mu = (x_t + s_t^2 score_hat) / alpha_t,                score = grad log p(x_t) = -eps / s_t
* ``edm`` family:   mu = c_skip x_t + c_out F(c_in x_t, c_noise)            (EDM preconditioning, F the network)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .checks import check_choice as _check_choice
from .moments import check_network_output

NOISE_FAMILIES = ("vp", "ve", "edm", "flow")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow", "score")

# diffusers scheduler class -> noise family; every other diffusers scheduler with betas is VP.
_FAMILY_OF_SCHEDULER = {
    "ScoreSdeVeScheduler": "ve",
    "KarrasVeScheduler": "ve",
    "EDMEulerScheduler": "edm",
    "EDMDPMSolverMultistepScheduler": "edm",
    "CosineDPMSolverMultistepScheduler": "edm",
    "FlowMatchEulerDiscreteScheduler": "flow",
    "FlowMatchHeunDiscreteScheduler": "flow",
    "FlowMatchLCMScheduler": "flow",
}
# prediction type of schedulers whose config does not declare one
_DEFAULT_PREDICTION = {"ve": "score", "edm": "epsilon", "flow": "flow", "vp": "epsilon"}
# other names diffusers configs use for our prediction types
_PREDICTION_ALIASES = {"flow_prediction": "flow"}
# EDM noise conditioning c_noise(sigma): the timestep the network is called with
EDM_NOISE_CONDITIONINGS = ("log", "atan")
_NOISE_CONDITIONING_OF_SCHEDULER = {"CosineDPMSolverMultistepScheduler": "atan"}
# abar_T of zero-terminal-SNR schedules, which is 0, is replaced by this (as diffusers' Euler scheduler does)
_MIN_ALPHA_CUMPROD = 2.0**-24


def infer_noise_family(config: Mapping[str, Any]) -> str:
    """Noise family of a diffusers scheduler config (a dict or ``scheduler.config``).

    Uses ``noise_family`` if present, else the source class (``_class_name``, present in loaded configs), else
    the keys that only one family's schedulers declare.
    """
    family = config.get("noise_family")
    if family is not None:
        _check_choice("noise_family", family, NOISE_FAMILIES)
        return family
    class_name = config.get("source_scheduler") or config.get("_class_name")
    if config.get("use_flow_sigmas"):  # DPM-Solver / UniPC run as flow-matching samplers (Wan, Sana, ...)
        return "flow"
    if class_name in _FAMILY_OF_SCHEDULER:
        return _FAMILY_OF_SCHEDULER[class_name]
    if "beta_schedule" in config or "trained_betas" in config:
        return "vp"
    if "sigma_data" in config:
        return "edm"
    if "shift" in config or "use_dynamic_shifting" in config:
        return "flow"
    if "snr" in config or "sigma_max" in config:
        return "ve"
    if not config or (class_name or "").endswith("Scheduler"):
        return "vp"  # every other diffusers scheduler discretises a VP (beta) schedule
    raise ValueError(
        f"Cannot tell the noise family of this scheduler config ({class_name or sorted(config)}): pass "
        f"`noise_family` as one of {', '.join(map(repr, NOISE_FAMILIES))}."
    )


def _vp_betas(config: Mapping[str, Any], num_train_timesteps: int) -> torch.Tensor:
    """Betas exactly as diffusers' DDPM/DDIM schedulers build them (float32, then float64 here)."""
    from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar, rescale_zero_terminal_snr

    trained = config.get("trained_betas")
    schedule = config.get("beta_schedule", "linear")
    start, end = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
    if trained is not None:
        betas = torch.as_tensor(trained, dtype=torch.float32)
    elif schedule == "linear":
        betas = torch.linspace(start, end, num_train_timesteps, dtype=torch.float32)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(num_train_timesteps)
    elif schedule == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps)) * (end - start) + start
    else:
        raise ValueError(
            "`beta_schedule` must be one of 'linear', 'scaled_linear', 'squaredcos_cap_v2', 'sigmoid' "
            f"(or pass `trained_betas`); got {schedule!r}."
        )
    finite = bool(torch.isfinite(betas).all())
    if betas.numel() == 0 or not finite or bool((betas <= 0).any()) or bool((betas > 1).any()):
        # 1 - beta is the share of signal kept per step: a beta outside (0, 1] gives NaN or negative alpha-bars
        if trained is not None:
            got = f"min {float(betas.min()):g}, max {float(betas.max()):g}" if betas.numel() else "empty"
            raise ValueError(f"`trained_betas` must lie in (0, 1] (finite); got {got}.")
        raise ValueError(
            f"The betas of beta_schedule={schedule!r} must lie in (0, 1]: `beta_start`={start!r}, `beta_end`={end!r} "
            "give betas outside it."
        )
    if config.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def _as_float64(values: Any, argument: str) -> torch.Tensor:
    """A 1-d float64 tensor of custom levels; empty or non-finite values are refused naming ``argument``."""
    try:
        t = torch.as_tensor(values if not isinstance(values, torch.Tensor) else values.detach().cpu())
        t = t.to(torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"`{argument}` must be a sequence of numbers; got {values!r}.") from err
    if t.ndim > 1:
        raise ValueError(f"`{argument}` must be a 1-d sequence of numbers; got shape {tuple(t.shape)}.")
    t = t.flatten()
    if t.numel() == 0:
        raise ValueError(f"`{argument}` is empty.")
    if not bool(torch.all(torch.isfinite(t))):
        raise ValueError(f"`{argument}` contains NaN or infinite values: {t.tolist()[:8]}.")
    return t


@dataclass(frozen=True)
class NoiseSchedule:
    """One noise family: timestep -> (alpha_t, s_t) and model prediction -> posterior mean.

    Build it with :meth:`from_config` from the config of any supported diffusers scheduler.
    """

    family: str
    prediction_type: str
    num_train_timesteps: int
    alphas_cumprod: torch.Tensor | None = None  # vp, float64
    betas: torch.Tensor | None = None  # vp, float32 exactly as diffusers' DDPMScheduler builds them
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    sigma_data: float = 0.5  # edm
    rho: float = 7.0  # edm karras schedule
    sigma_schedule: str = "karras"  # edm: "karras" | "exponential"
    noise_conditioning: str = "log"  # edm: timestep = 0.25 ln(sigma) ("log", EDM) or atan(sigma) 2 / pi ("atan")
    sampling_eps: float = 1e-5  # ve: the last continuous time of the ScoreSdeVe schedule
    timestep_spacing: str = "leading"  # vp
    steps_offset: int = 0  # vp
    shift: float = 1.0  # flow
    use_dynamic_shifting: bool = False  # flow

    def __post_init__(self) -> None:
        _check_choice("noise_family", self.family, NOISE_FAMILIES)
        allowed = ("epsilon", "v_prediction") if self.family == "edm" else PREDICTION_TYPES
        _check_choice("prediction_type", self.prediction_type, allowed)
        _check_choice("noise_conditioning", self.noise_conditioning, EDM_NOISE_CONDITIONINGS)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> NoiseSchedule:
        """From a diffusers scheduler config (DDPM, DDIM, PNDM, Euler, DPM-Solver, UniPC, ScoreSdeVe, EDM,
        FlowMatchEuler, or an ``MMGibbsScheduler``); ``overrides`` replace config keys."""
        config = {**dict(config), **overrides}
        source = config.get("source_scheduler") or config.get("_class_name")
        if source == "CMStochasticIterativeScheduler":
            raise ValueError(
                "A CMStochasticIterativeScheduler config describes a consistency model: its output (through the "
                "boundary-condition scalings c_skip, c_out and the timestep 250 ln(sigma)) is the end point of the "
                "probability-flow ODE, not a posterior mean E[x | x_t]; it has no NoiseSchedule here."
            )
        family = infer_noise_family(config)
        # ScoreSdeVe configs declare no prediction type: NCSN++ UNets divide by sigma, their output is the score
        prediction = config.get("prediction_type") or _DEFAULT_PREDICTION[family]
        prediction = _PREDICTION_ALIASES.get(prediction, prediction)
        n_train = int(config.get("num_train_timesteps") or (2000 if family == "ve" else 1000))
        if family == "vp" and config.get("trained_betas") is not None:
            n_train = len(config["trained_betas"])  # the betas define the training steps, whatever else is declared

        def get(key: str, default: Any) -> Any:
            value = config.get(key)
            return default if value is None else value

        kwargs: dict[str, Any] = {"family": family, "prediction_type": prediction, "num_train_timesteps": n_train}
        if family == "vp":
            betas = _vp_betas(config, n_train)
            abar = torch.cumprod(1.0 - betas.double(), dim=0)
            kwargs.update(
                betas=betas,
                alphas_cumprod=torch.where(abar > 0, abar, _MIN_ALPHA_CUMPROD),
                timestep_spacing=get("timestep_spacing", "leading"),
                steps_offset=int(get("steps_offset", 0)),
            )
        elif family == "ve":
            kwargs.update(
                sigma_min=float(get("sigma_min", 0.01)),
                sigma_max=float(get("sigma_max", 1348.0)),
                sampling_eps=float(get("sampling_eps", 1e-5)),
            )
        elif family == "edm":
            kwargs.update(
                sigma_min=float(get("sigma_min", 0.002)),
                sigma_max=float(get("sigma_max", 80.0)),
                sigma_data=float(get("sigma_data", 0.5)),
                rho=float(get("rho", 7.0)),
                sigma_schedule=get("sigma_schedule", "karras"),
                noise_conditioning=_NOISE_CONDITIONING_OF_SCHEDULER.get(source, "log"),
            )
        else:
            kwargs.update(
                shift=float(get("shift", 1.0)), use_dynamic_shifting=bool(get("use_dynamic_shifting", False))
            )
        return cls(**kwargs)

    # ------------------------------------------------------------------ timestep -> (alpha, s, sigma)
    def alpha_s(self, timestep: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, s_t)`` in float64, with the shape of ``timestep``: x_t = alpha_t x + s_t eps."""
        t = torch.as_tensor(timestep, dtype=torch.float64)
        if self.family == "vp":
            abar = self.alphas_cumprod.to(t.device)
            if not bool(torch.all((t >= 0) & (t <= len(abar) - 1))):
                bad = t[~((t >= 0) & (t <= len(abar) - 1))]
                raise ValueError(
                    f"`timestep` must lie in [0, {len(abar) - 1}] (the training steps of this VP schedule); got "
                    f"{bad.numel()} value(s) outside, e.g. {float(bad.flatten()[0])}."
                )
            lo = t.floor().long().clamp(min=0, max=len(abar) - 1)
            frac = t - lo
            if not bool(torch.any(frac > 0)):  # training steps: abar itself
                a = abar[lo]
                return a.sqrt(), (1.0 - a).sqrt()
            # between training steps sigma is linear in t, as Euler/Heun/LMS interpolate their sigmas
            sig = ((1.0 - abar) / abar).sqrt()
            sigma = torch.lerp(sig[lo], sig[(lo + 1).clamp(max=len(abar) - 1)], frac)
            alpha = (1.0 + sigma**2).rsqrt()
            return alpha, sigma * alpha
        if self.family == "ve":
            return torch.ones_like(t), t
        if self.family == "edm":
            if self.noise_conditioning == "atan":
                return torch.ones_like(t), torch.tan(t * (math.pi / 2))
            return torch.ones_like(t), torch.exp(4.0 * t)
        u = t / self.num_train_timesteps
        return 1.0 - u, u

    def sigma(self, timestep: torch.Tensor | float) -> torch.Tensor:
        """Noise level of the variance-exploding frame, sigma = s_t / alpha_t (float64)."""
        alpha, s = self.alpha_s(timestep)
        return s / alpha

    def timestep_for_sigma(self, sigma: float) -> torch.Tensor:
        """The timestep whose noise level is ``sigma`` (VP: the nearest integer training step)."""
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"`sigma` must be positive and finite; got {sigma}.")
        if self.family == "vp":
            sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
            return (sigmas - sigma).abs().argmin()
        if self.family == "ve":
            return torch.tensor(float(sigma), dtype=torch.float64)
        if self.family == "edm":
            if self.noise_conditioning == "atan":
                return torch.tensor(math.atan(sigma) * 2 / math.pi, dtype=torch.float64)
            return torch.tensor(0.25 * math.log(sigma), dtype=torch.float64)
        return torch.tensor(sigma / (1.0 + sigma) * self.num_train_timesteps, dtype=torch.float64)

    def inference_timesteps(self, num_levels: int, mu: float | None = None) -> torch.Tensor:
        """``num_levels`` noise levels from high to low, as the family's own scheduler lays them out.

        VP follows ``timestep_spacing`` exactly as DDPMScheduler does; VE is geometric from sigma_max to
        sigma_min (ScoreSdeVe); EDM uses the Karras (rho) or exponential schedule; flow uses FlowMatchEuler's
        shifted linear ramp, starting one training step below pure noise (alpha_t = 0 has no finite sigma).
        ``mu`` is the resolution-dependent shift of flow models with ``use_dynamic_shifting``.
        """
        if num_levels < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer; got {num_levels}.")
        n, n_train = num_levels, self.num_train_timesteps
        if self.family == "vp":
            if n > n_train:
                raise ValueError(f"`num_inference_steps` ({n}) cannot exceed `num_train_timesteps` ({n_train}).")
            if self.timestep_spacing == "linspace":
                t = torch.linspace(0, n_train - 1, n, dtype=torch.float64).round().flip(0)
            elif self.timestep_spacing == "leading":
                t = (torch.arange(n, dtype=torch.float64) * (n_train // n)).round().flip(0) + self.steps_offset
                if float(t[0]) > n_train - 1:  # it would repeat the last training step as a level
                    raise ValueError(
                        f"`steps_offset`={self.steps_offset} with {n} leading-spaced steps needs timestep "
                        f"{int(t[0])}, beyond the last training step {n_train - 1}: use fewer steps."
                    )
            elif self.timestep_spacing == "trailing":
                t = torch.arange(n_train, 0, -n_train / n, dtype=torch.float64).round() - 1
            else:
                raise ValueError(
                    "`timestep_spacing` must be one of 'linspace', 'leading', 'trailing'; "
                    f"got {self.timestep_spacing!r}."
                )
            return t.clamp(0, n_train - 1).long()
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        if self.family == "ve":
            return self.sigma_min * (self.sigma_max / self.sigma_min) ** (1 - ramp * (1 - self.sampling_eps))
        if self.family == "edm":
            lo, hi = self.sigma_min, self.sigma_max
            if self.sigma_schedule == "karras":
                sig = (hi ** (1 / self.rho) + ramp * (lo ** (1 / self.rho) - hi ** (1 / self.rho))) ** self.rho
            elif self.sigma_schedule == "exponential":
                sig = torch.exp(math.log(hi) + ramp * (math.log(lo) - math.log(hi)))
            else:
                raise ValueError(f"`sigma_schedule` must be 'karras' or 'exponential'; got {self.sigma_schedule!r}.")
            if self.noise_conditioning == "atan":
                return torch.atan(sig) * (2 / math.pi)
            return 0.25 * torch.log(sig)
        u = torch.linspace(1.0 - 1.0 / n_train, 1.0 / n_train, n, dtype=torch.float64)
        return self._shifted(u, mu).clamp(max=1.0 - 1.0 / n_train) * n_train

    def _shifted(self, u: torch.Tensor, mu: float | None) -> torch.Tensor:
        """FlowMatchEuler's shift of flow levels u: static ``shift``, or exp(mu) with ``use_dynamic_shifting``."""
        if self.use_dynamic_shifting:
            if mu is None:
                raise ValueError("`mu` must be passed to `set_timesteps` when `use_dynamic_shifting` is True.")
            return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        return self.shift * u / (1 + (self.shift - 1) * u)

    # ------------------------------------------------------------------ custom levels
    def trained_sigma_range(self) -> tuple[float, float]:
        """The lowest and highest noise level sigma (VE frame) this model was trained at."""
        if self.family == "vp":
            sig = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
            return float(sig[0]), float(sig[-1])
        if self.family == "flow":
            u_lo, u_hi = 1.0 / self.num_train_timesteps, 1.0 - 1.0 / self.num_train_timesteps
            return u_lo / (1 - u_lo), u_hi / (1 - u_hi)
        return self.sigma_min, self.sigma_max

    def check_timesteps(self, timesteps: Any, argument: str = "timesteps") -> torch.Tensor:
        """Validate model timesteps of this family, levels from high to low noise; returns them in float64.

        Refused with a ValueError naming ``argument``: empty, NaN/inf, not strictly descending, outside the
        trained range (VP: training steps 0..T-1; flow: 0 < t < T, t = T being pure noise; VE/EDM: sigma within
        [sigma_min, sigma_max]), and values in the wrong units (flow u or VP continuous times in [0, 1], EDM sigmas
        given as timesteps).
        """
        t = _as_float64(timesteps, argument)
        if bool(torch.any(t[1:] >= t[:-1])):
            raise ValueError(f"`{argument}` must be strictly descending (from high to low noise); got {t.tolist()}.")
        n = self.num_train_timesteps
        if self.family == "vp":
            if bool(torch.all(t <= 1)) and bool(torch.any(t != t.round())):
                raise ValueError(
                    f"`{argument}` of a VP model are training steps in [0, {n - 1}]; {t.tolist()} look like "
                    "continuous times in [0, 1]."
                )
            bad = t[(t < 0) | (t > n - 1)]
            if bad.numel():
                raise ValueError(
                    f"`{argument}` of this VP model must be training steps in [0, {n - 1}]; got {float(bad[0])}."
                )
            return t
        if self.family == "flow":
            if bool(torch.any(t >= n)):
                raise ValueError(
                    f"`{argument}` includes t={float(t.max()):g}: u = t / {n} = 1 is pure noise (alpha = 0), which "
                    f"has no noise level sigma = u / (1 - u); the highest level is t = {n - 1} (u = 1 - 1/{n})."
                )
            if bool(torch.any(t <= 0)):
                raise ValueError(f"`{argument}` of a flow model must lie in (0, {n}); got {float(t.min()):g}.")
            if bool(torch.all(t <= 1)):
                raise ValueError(
                    f"`{argument}` of a flow model are u * {n}; {t.tolist()} look like u itself: pass them as "
                    "`sigmas`."
                )
            return t
        with torch.no_grad():
            sig = self.sigma(t)
        lo, hi = self.trained_sigma_range()
        if not bool(torch.all(torch.isfinite(sig) & (sig >= lo * (1 - 1e-3)) & (sig <= hi * (1 + 1e-3)))):
            what = (
                "sigma itself"
                if self.family == "ve"
                else ("atan(sigma) * 2 / pi" if self.noise_conditioning == "atan" else "0.25 * ln(sigma)")
            )
            hint = "" if self.family == "ve" else "; noise levels themselves go to `sigmas`"
            raise ValueError(
                f"`{argument}` of this {self.family.upper()} model are {what}, for sigma in the trained range "
                f"[{lo:g}, {hi:g}]; {t.tolist()[:6]} mean sigma up to {float(sig.max()):g}{hint}."
            )
        return t

    def timesteps_for_sigmas(self, sigmas: Any, mu: float | None = None, argument: str = "sigmas") -> torch.Tensor:
        """Model timesteps of custom noise levels, in the units diffusers' scheduler of the family takes.

        Flow: u in (0, 1] (FlowMatchEuler's sigmas), shifted as FlowMatchEuler shifts them (``shift``, or ``mu``
        with ``use_dynamic_shifting``); u = 1 (pure noise, alpha = 0) cannot be a level of the variance-exploding
        frame and is clamped to the largest finite one, u = 1 - 1 / num_train_timesteps. VE/EDM: sigma. VP has no
        single sigma convention without its source scheduler: pass training steps as ``timesteps``.
        """
        sig = _as_float64(sigmas, argument)
        if bool(torch.any(sig <= 0)):
            raise ValueError(f"`{argument}` must be positive noise levels; got {float(sig.min()):g}.")
        if bool(torch.any(sig[1:] >= sig[:-1])):
            raise ValueError(f"`{argument}` must be strictly descending (from high to low noise).")
        n = self.num_train_timesteps
        if self.family == "flow":
            if bool(torch.any(sig > 1)):
                raise ValueError(f"`{argument}` of a flow model are u = t / {n} in (0, 1]; got {float(sig.max()):g}.")
            t = self._shifted(sig, mu).clamp(max=1.0 - 1.0 / n) * n
        elif self.family in ("ve", "edm"):
            t = torch.stack([self.timestep_for_sigma(float(x)) for x in sig])
        else:
            raise ValueError(
                f"`{argument}` cannot be laid out for a VP model without a source scheduler that takes sigmas "
                "(Euler, Heun, LMS, ...): pass training steps as `timesteps`."
            )
        return self.check_timesteps(t, argument)

    # ------------------------------------------------------------------ x <-> x_t
    def coefficients(self, timestep: torch.Tensor | float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t, s_t shaped to broadcast against ``like`` (batch-first), in ``like``'s float dtype."""
        alpha, s = self.alpha_s(timestep)
        dtype = like.dtype if like.is_floating_point() else torch.float32
        shape = (-1,) + (1,) * (like.ndim - 1) if alpha.ndim == 1 else ()
        return alpha.to(like.device, dtype).reshape(shape), s.to(like.device, dtype).reshape(shape)

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        """x_t = alpha_t x + s_t eps (the forward process, in the model's own frame)."""
        alpha, s = self.coefficients(timestep, x)
        return alpha * x + s * noise

    def preconditioning(self, timestep: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(c_in, c_skip, c_out)`` in float64: the network sees c_in x_t, and every prediction type is affine in
        the network output F, mu = c_skip x_t + c_out F (the table in the module docstring)."""
        alpha, s = self.alpha_s(timestep)
        one, zero = torch.ones_like(alpha), torch.zeros_like(alpha)
        if self.family == "edm":
            norm = (s**2 + self.sigma_data**2).sqrt()
            c_out = s * self.sigma_data / norm
            return 1.0 / norm, self.sigma_data**2 / norm**2, c_out if self.prediction_type == "epsilon" else -c_out
        table = {
            "epsilon": (1.0 / alpha, -s / alpha),
            "v_prediction": (alpha / (alpha**2 + s**2), -s / (alpha**2 + s**2)),
            "sample": (zero, one),
            "flow": (1.0 / (alpha + s), -s / (alpha + s)),
            "score": (1.0 / alpha, s**2 / alpha),
        }
        return (one, *table[self.prediction_type])

    def _shaped(self, timestep: torch.Tensor | float, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`preconditioning` shaped to broadcast against ``like`` (batch-first), in its float dtype."""
        dtype = like.dtype if like.is_floating_point() else torch.float32
        coefs = self.preconditioning(timestep)
        shape = (-1,) + (1,) * (like.ndim - 1) if coefs[0].ndim == 1 else ()
        return tuple(c.to(like.device, dtype).reshape(shape) for c in coefs)

    def model_input(self, x_t: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        """What the network is fed: c_in x_t (x_t itself but for EDM preconditioning)."""
        return x_t if self.family != "edm" else x_t * self._shaped(timestep, x_t)[0]

    def unscale_model_input(self, model_input: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        """Inverse of :meth:`model_input`."""
        return model_input if self.family != "edm" else model_input / self._shaped(timestep, model_input)[0]

    # ------------------------------------------------------------------ prediction <-> mu
    def posterior_mean(
        self, model_output: torch.Tensor, x_t: torch.Tensor, timestep: torch.Tensor | float
    ) -> torch.Tensor:
        """mu = E[x | x_t] = c_skip x_t + c_out F from the model's prediction F (module docstring)."""
        _, c_skip, c_out = self._shaped(timestep, x_t)
        return c_skip * x_t + c_out * model_output.to(x_t.dtype)

    def prediction(self, mu: torch.Tensor, x_t: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        """The model output whose posterior mean is ``mu`` (inverse of :meth:`posterior_mean`)."""
        _, c_skip, c_out = self._shaped(timestep, x_t)
        return (mu - c_skip * x_t) / c_out

    def denoiser(
        self,
        model: Callable[..., Any],
        timestep: torch.Tensor | float,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The map y -> mu(y) of a diffusers-style ``model(sample, timestep)`` at one level.

        ``y`` lives in the variance-exploding frame; the model is called on x_t = alpha_t y (scaled by
        :meth:`model_input`) in its own dtype, and mu comes back in ``y``'s dtype, so moments are computed in
        float32/float64 even for fp16/bf16 models. An energy model (:class:`mmgibbs.energy.EnergyModel`) gives
        mu = y - sigma^2 grad E~(y) (:func:`mmgibbs.energy.energy_predict`).
        """
        from .energy import energy_predict, is_energy_model  # it builds on this module

        model_dtype = getattr(model, "dtype", None)
        kwargs = dict(model_kwargs or {})

        def call(model_input: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = model(model_input.to(model_dtype or model_input.dtype), t, **kwargs)
            return out[0] if isinstance(out, tuple) else getattr(out, "sample", out)

        predict = energy_predict(model, self) if is_energy_model(model) else call

        def mu(y: torch.Tensor) -> torch.Tensor:
            t = torch.as_tensor(timestep, device=y.device)
            t = t.expand(y.shape[0]) if t.ndim == 0 else t
            alpha = self.coefficients(t, y)[0]
            return denoise_in_ve_frame(predict, y, t, alpha, *self._shaped(t, y))

        return mu


def denoise_in_ve_frame(
    predict: Callable[[torch.Tensor, Any], torch.Tensor],
    y: torch.Tensor,
    timestep: Any,
    alpha: torch.Tensor | float,
    c_in: torch.Tensor | float,
    c_skip: torch.Tensor | float,
    c_out: torch.Tensor | float,
) -> torch.Tensor:
    """The frame change, written once: mu(y) = c_skip x_t + c_out F(c_in x_t, t), x_t = alpha_t y.

    ``predict(model_input, timestep) -> F`` is the network (with its conditioning); it may run in any dtype and mu
    comes back in ``y``'s. Coefficients are floats (one level) or tensors broadcasting against ``y`` (per sample).
    The network output is checked against the Jacobian mode in progress (``mmgibbs.moments.check_network_output``).
    """
    x_t = alpha * y
    model_input = c_in * x_t if not (isinstance(c_in, float) and c_in == 1.0) else x_t
    out = predict(model_input, timestep)
    check_network_output(model_input, out)
    return c_skip * x_t + c_out * out.to(y.dtype)
