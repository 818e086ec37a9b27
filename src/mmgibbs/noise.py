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
``flow``   1 - u, u                     u * num_train_steps   FlowMatchEuler (rectified flow)
=========  ==========================  ====================  ============================================

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
# abar_T of zero-terminal-SNR schedules, which is 0, is replaced by this (as diffusers' Euler scheduler does)
_MIN_ALPHA_CUMPROD = 2.0**-24


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, allowed))}; got {value!r}.")


def infer_noise_family(config: Mapping[str, Any]) -> str:
    """Noise family of a diffusers scheduler config (a dict or ``scheduler.config``).

    Uses ``noise_family`` if present, else the source class (``_class_name``, present in loaded configs), else
    the keys that only one family's schedulers declare.
    """
    family = config.get("noise_family")
    if family is not None:
        _check_choice("noise_family", family, NOISE_FAMILIES)
        return family
    class_name = config.get("_class_name")
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
    if config.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return betas


@dataclass(frozen=True)
class NoiseSchedule:
    """One noise family: timestep -> (alpha_t, s_t) and model prediction -> posterior mean.

    Build it with :meth:`from_config` from the config of any supported diffusers scheduler.
    """

    family: str
    prediction_type: str
    num_train_timesteps: int
    alphas_cumprod: torch.Tensor | None = None  # vp, float64
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    sigma_data: float = 0.5  # edm
    rho: float = 7.0  # edm karras schedule
    sigma_schedule: str = "karras"  # edm: "karras" | "exponential"
    sampling_eps: float = 1e-5  # ve: the last continuous time of the ScoreSdeVe schedule
    timestep_spacing: str = "leading"  # vp
    steps_offset: int = 0  # vp
    shift: float = 1.0  # flow
    use_dynamic_shifting: bool = False  # flow

    def __post_init__(self) -> None:
        _check_choice("noise_family", self.family, NOISE_FAMILIES)
        allowed = ("epsilon", "v_prediction") if self.family == "edm" else PREDICTION_TYPES
        _check_choice("prediction_type", self.prediction_type, allowed)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> NoiseSchedule:
        """From a diffusers scheduler config (DDPM, DDIM, PNDM, Euler, DPM-Solver, UniPC, ScoreSdeVe, EDM,
        FlowMatchEuler, or an ``MMGibbsScheduler``); ``overrides`` replace config keys."""
        config = {**dict(config), **overrides}
        family = infer_noise_family(config)
        # ScoreSdeVe configs declare no prediction type: NCSN++ UNets divide by sigma, their output is the score
        prediction = config.get("prediction_type") or _DEFAULT_PREDICTION[family]
        n_train = int(config.get("num_train_timesteps") or (2000 if family == "ve" else 1000))

        def get(key: str, default: Any) -> Any:
            value = config.get(key)
            return default if value is None else value

        kwargs: dict[str, Any] = {"family": family, "prediction_type": prediction, "num_train_timesteps": n_train}
        if family == "vp":
            abar = torch.cumprod(1.0 - _vp_betas(config, n_train).double(), dim=0)
            kwargs.update(
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
            if torch.any(t < 0) or torch.any(t > len(abar) - 1):
                raise ValueError(f"`timestep` must lie in [0, {len(abar) - 1}] for this VP schedule; got {t}.")
            lo = t.floor().long().clamp(max=len(abar) - 2)
            frac = t - lo  # fractional timesteps interpolate abar linearly
            a = torch.lerp(abar[lo], abar[lo + 1], frac)
            return a.sqrt(), (1.0 - a).sqrt()
        if self.family == "ve":
            return torch.ones_like(t), t
        if self.family == "edm":
            return torch.ones_like(t), torch.exp(4.0 * t)
        u = t / self.num_train_timesteps
        return 1.0 - u, u

    def sigma(self, timestep: torch.Tensor | float) -> torch.Tensor:
        """Noise level of the variance-exploding frame, sigma = s_t / alpha_t (float64)."""
        alpha, s = self.alpha_s(timestep)
        return s / alpha

    def timestep_for_sigma(self, sigma: float) -> torch.Tensor:
        """The timestep whose noise level is ``sigma`` (VP: the nearest integer training step)."""
        if not sigma > 0:
            raise ValueError(f"`sigma` must be positive; got {sigma}.")
        if self.family == "vp":
            sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
            return (sigmas - sigma).abs().argmin()
        if self.family == "ve":
            return torch.tensor(float(sigma), dtype=torch.float64)
        if self.family == "edm":
            return torch.tensor(0.25 * math.log(sigma), dtype=torch.float64)
        return torch.tensor(sigma / (1.0 + sigma) * self.num_train_timesteps, dtype=torch.float64)

    def inference_timesteps(
        self, num_levels: int, mu: float | None = None, sigmas: list[float] | torch.Tensor | None = None
    ) -> torch.Tensor:
        """``num_levels`` noise levels from high to low, as the family's own scheduler lays them out.

        VP follows ``timestep_spacing`` exactly as DDPMScheduler does; VE is geometric from sigma_max to
        sigma_min (ScoreSdeVe); EDM uses the Karras (rho) or exponential schedule; flow uses FlowMatchEuler's
        shifted linear ramp, starting one training step below pure noise (alpha_t = 0 has no finite sigma).
        ``mu`` is the resolution-dependent shift of flow models with ``use_dynamic_shifting``; ``sigmas`` (flow
        only) are custom unshifted levels u in (0, 1], as FluxPipeline passes them, shifted as FlowMatchEuler shifts
        them, u = 1 (alpha = 0, no finite sigma) clamped to 1 - 1 / num_train_timesteps.
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
            return 0.25 * torch.log(sig)
        u = torch.linspace(1.0 - 1.0 / n_train, 1.0 / n_train, n, dtype=torch.float64)
        if sigmas is not None:
            u = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
            if len(u) != n or bool(torch.any(u <= 0)) or bool(torch.any(u > 1)):
                raise ValueError(f"`sigmas` of a flow model are {n} levels u in (0, 1]; got {u.tolist()}.")
        if self.use_dynamic_shifting:
            if mu is None:
                raise ValueError("`mu` must be passed to `set_timesteps` when `use_dynamic_shifting` is True.")
            u = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        else:
            u = self.shift * u / (1 + (self.shift - 1) * u)
        return u.clamp(max=1.0 - 1.0 / n_train) * n_train

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
        float32/float64 even for fp16/bf16 models.
        """
        model_dtype = getattr(model, "dtype", None)
        kwargs = dict(model_kwargs or {})

        def mu(y: torch.Tensor) -> torch.Tensor:
            t = torch.as_tensor(timestep, device=y.device)
            if t.ndim == 0:
                t = t.expand(y.shape[0])
            x_t = self.coefficients(t, y)[0] * y
            net_in = self.model_input(x_t, t)
            out = model(net_in.to(model_dtype or y.dtype), t, **kwargs)
            out = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
            return self.posterior_mean(out.to(y.dtype), x_t, t)

        return mu
