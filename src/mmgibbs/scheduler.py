"""MMGibbsScheduler: moment-matching denoising Gibbs sampling as a drop-in diffusers scheduler.

At a noise level sigma one Gibbs sweep of Zhang et al. (2023) is

    y = x + sigma * eps                     (re-noise)
    x ~ N(mu(y), Sigma(y))                  (moment-matched denoising posterior, see ``mmgibbs.moments``)

The algorithm, the transition between levels included, is ``mmgibbs.gibbs`` (one kernel); this module adapts it
to diffusers' scheduler interface. The scheduler keeps the sample in the model's own frame, x_t = alpha_t * y, so
``init_noise_sigma`` and ``scale_model_input`` are those the model was trained with (1 and identity for VP models,
whatever config the scheduler came from). The frame change is written once: :meth:`MMGibbsScheduler.to_ve` /
:meth:`MMGibbsScheduler.from_ve` for the sample, :meth:`MMGibbsScheduler.denoiser` for the model, where every
prediction type is affine in the network output F: mu = c_skip x_t + c_out F(c_in x_t).

In model-frame terms, moving from level t to the next level s with x drawn at level t is

    x_s = alpha_s x + s_s (c r + sqrt(1 - c^2) z),    r = (x_t - alpha_t x) / s_t,   z ~ N(0, I),

* ``transition="gibbs"`` (the paper): c = 0, fresh re-noising; also every sweep within one level.
* ``transition="ancestral"``: c^2 = 1 - eta^2 (1 - sigma_s^2 / sigma_t^2). With ``eta=1``, c = sigma_s / sigma_t
  and x_s ~ q(x_s | x_t, x), the DDPM posterior with x ~ N(mu, Sigma) integrated out:
  x_s ~ N(a x_t + b mu, b^2 Sigma + var_ts I), a = s_s c / s_t, b = alpha_s - a alpha_t, var_ts = s_s^2 (1 - c^2);
  with Sigma = 0 this is DDPM's step (Analytic-DPM's when Sigma = v I). ``eta=0`` keeps all of r: a DDIM step
  around the drawn x (deterministic DDIM when Sigma = 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from .gibbs import FINAL_OUTPUTS, TRANSITIONS, LevelDenoiser, gibbs_step
from .moments import COVARIANCES, JACOBIAN_COVARIANCES, JACOBIAN_MODES, Generator, moments_from_mean
from .noise import _DEFAULT_PREDICTION, NOISE_FAMILIES, NoiseSchedule, _check_choice, infer_noise_family

SCHEDULES = ("annealed", "single_level")


@dataclass
class MMGibbsSchedulerOutput(BaseOutput):
    """Output of :meth:`MMGibbsScheduler.step`.

    Args:
        prev_sample: the next model input x_s (or, after the last step, the clean sample).
        pred_original_sample: the posterior mean mu = E[x | x_t] at the current level.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class MMGibbsScheduler(SchedulerMixin, ConfigMixin):
    """Moment Matching Denoising Gibbs Sampling (Zhang, Hawkins-Hooker, Paige, Barber, NeurIPS 2023).

    Build it from any pipeline's scheduler: ``MMGibbsScheduler.from_config(pipe.scheduler.config, ...)``; the
    source's noise schedule (betas, sigmas, shift, prediction type) is kept and its family inferred.

    Args:
        covariance: ``"none"`` (mean only), ``"isotropic"`` (Analytic-DPM batch estimate), or, inside
            :class:`MomentMatchingGibbsPipeline` only, ``"diagonal"``, ``"exact_diagonal"``, ``"full"``,
            ``"projection"`` (see ``mmgibbs.moments``).
        gibbs_sweeps: Gibbs sweeps per noise level; the model is called levels x sweeps times.
        schedule: ``"annealed"`` (levels from high to low noise) or ``"single_level"`` (every sweep at ``sigma``).
        sigma: the noise level of the single-level chain (VE frame; VP models use the nearest timestep).
        transition: how to move between levels, ``"ancestral"`` or ``"gibbs"`` (see the module docstring).
        eta: share of fresh noise in the ancestral transition: 1 is the DDPM posterior, 0 a DDIM step.
        final_output: return the last drawn ``"sample"`` x or the last posterior ``"mean"`` mu.
        num_probes: Rademacher probes of the Hutchinson diagonal (pipeline only).
        jacobian: ``"auto"``, ``"reverse"``, ``"forward"`` or ``"finite_difference"`` Jacobian products for
            Jacobian covariances (pipeline only).
        variance_bound: optional upper bound on per-dimension posterior variances (r^2 for data in [-r, r]).
        noise_family: ``"vp"``, ``"ve"``, ``"edm"`` or ``"flow"``; inferred by :meth:`from_config`.
        The remaining arguments are the source scheduler's noise-schedule settings, with diffusers' meanings.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + [
        "ScoreSdeVeScheduler",
        "EDMDPMSolverMultistepScheduler",
        "FlowMatchEulerDiscreteScheduler",
    ]
    order = 1

    @register_to_config
    def __init__(
        self,
        covariance: str = "isotropic",
        gibbs_sweeps: int = 1,
        schedule: str = "annealed",
        sigma: float | None = None,
        transition: str = "ancestral",
        eta: float = 1.0,
        final_output: str = "sample",
        num_probes: int = 1,
        jacobian: str = "auto",
        variance_bound: float | None = None,
        noise_family: str | None = None,
        num_train_timesteps: int | None = None,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        prediction_type: str | None = None,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        sigma_data: float = 0.5,
        sigma_schedule: str = "karras",
        rho: float = 7.0,
        sampling_eps: float = 1e-5,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
    ):
        _check_choice("covariance", covariance, COVARIANCES)
        _check_choice("schedule", schedule, SCHEDULES)
        _check_choice("transition", transition, TRANSITIONS)
        _check_choice("final_output", final_output, FINAL_OUTPUTS)
        _check_choice("jacobian", jacobian, JACOBIAN_MODES)
        for name, value in (("gibbs_sweeps", gibbs_sweeps), ("num_probes", num_probes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
        if schedule == "single_level" and (sigma is None or not sigma > 0):
            raise ValueError(f"schedule='single_level' needs a positive noise level `sigma`; got {sigma!r}.")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"`eta` must lie in [0, 1]; got {eta!r}.")
        if variance_bound is not None and not variance_bound > 0:
            raise ValueError(f"`variance_bound` must be positive or None; got {variance_bound!r}.")
        family = noise_family or "vp"
        _check_choice("noise_family", family, NOISE_FAMILIES)
        self.register_to_config(noise_family=family, prediction_type=prediction_type or _DEFAULT_PREDICTION[family])
        self.noise_schedule = NoiseSchedule.from_config(self.config)
        self.num_inference_steps: int | None = None
        if schedule == "single_level":
            self.timesteps = self.noise_schedule.timestep_for_sigma(sigma).reshape(1)
        elif family == "vp":  # every training step, as DDPMScheduler starts
            self.timesteps = torch.arange(self.noise_schedule.num_train_timesteps).flip(0)
        else:
            # with dynamic shifting mu is not known before set_timesteps: the unshifted levels (mu = 0)
            self.timesteps = self.noise_schedule.inference_timesteps(self.noise_schedule.num_train_timesteps, mu=0.0)
        self._set_levels(self.timesteps)

    # ------------------------------------------------------------------ configuration
    @classmethod
    def from_config(
        cls, config: dict[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs: Any
    ) -> MMGibbsScheduler | tuple[MMGibbsScheduler, dict[str, Any]]:
        """From the config of any supported scheduler; the noise family (and a missing prediction type) is
        inferred from the source class, e.g. ``MMGibbsScheduler.from_config(pipe.scheduler.config,
        covariance="isotropic", gibbs_sweeps=2)``."""
        config = dict(config or {})
        if config.get("noise_family") is None:  # another scheduler's config
            # diffusers drops the keys a source left at *its* defaults (`_use_default_values`), which would swap in
            # ours (e.g. DDPM's clip_sample=True, Euler's linspace spacing): keep the source's noise schedule whole
            config.pop("_use_default_values", None)
            if "noise_family" not in kwargs:
                kwargs["noise_family"] = infer_noise_family({**config, **kwargs})
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def __len__(self) -> int:
        return self.noise_schedule.num_train_timesteps

    # ------------------------------------------------------------------ timesteps
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | None = None,
        mu: float | None = None,
        sigmas: list[float] | torch.Tensor | None = None,
    ) -> None:
        """Lay out levels x ``gibbs_sweeps`` model calls and reset all state.

        Args:
            num_inference_steps: the number of noise levels (annealed) or of sweeps at ``sigma`` (single level);
                either way every level is repeated ``gibbs_sweeps`` times.
            device: where ``timesteps`` live.
            timesteps: custom descending levels instead of ``num_inference_steps`` (annealed only).
            mu: resolution-dependent shift of flow models with ``use_dynamic_shifting``.
            sigmas: (flow) custom unshifted levels u in (0, 1], as FluxPipeline passes them (see
                :meth:`NoiseSchedule.inference_timesteps`).
        """
        cfg = self.config
        if sigmas is not None:
            if self.noise_schedule.family != "flow" or timesteps is not None or cfg.schedule == "single_level":
                raise ValueError("`sigmas` are taken for annealed flow-matching schedules only, without `timesteps`.")
            num_inference_steps = num_inference_steps or len(sigmas)
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("Pass exactly one of `num_inference_steps` and `timesteps`.")
        if timesteps is not None:
            if cfg.schedule == "single_level":
                raise ValueError("`timesteps` cannot be set for schedule='single_level'; use `sigma`.")
            levels = torch.as_tensor(timesteps, dtype=torch.float64)
            if torch.any(levels[1:] >= levels[:-1]):
                raise ValueError("custom `timesteps` must be strictly descending.")
        elif (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or num_inference_steps < 1
        ):
            raise ValueError(f"`num_inference_steps` must be a positive integer; got {num_inference_steps!r}.")
        elif cfg.schedule == "single_level":
            levels = self.noise_schedule.timestep_for_sigma(cfg.sigma).reshape(1).repeat(num_inference_steps)
        else:
            levels = self.noise_schedule.inference_timesteps(num_inference_steps, mu=mu, sigmas=sigmas)
        self.num_inference_steps = len(levels)
        timesteps_all = levels.repeat_interleave(cfg.gibbs_sweeps)
        dtype = torch.int64 if self.noise_schedule.family == "vp" else torch.float32
        self.timesteps = timesteps_all.to(dtype).to(device)
        self._set_levels(timesteps_all)

    def _set_levels(self, timesteps: torch.Tensor) -> None:
        alpha, s = self.noise_schedule.alpha_s(timesteps)
        c_in, c_skip, c_out = self.noise_schedule.preconditioning(timesteps)
        self._alpha, self._s = alpha.cpu(), s.cpu()
        # per step, as Python floats: no host-device traffic inside the sampling loop
        table = torch.stack([alpha, s / alpha, c_in, c_skip, c_out], dim=-1)
        self._levels: list[tuple[float, ...]] = [tuple(row) for row in table.tolist()]
        self.sigmas = torch.cat([(s / alpha).float(), torch.zeros(1)]).cpu()  # VE sigma per step, then 0
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @property
    def init_noise_sigma(self) -> float:
        """Std of the first model input when x ~ N(0, I): sqrt(alpha^2 + s^2) at the first level (1 for VP)."""
        return float(math.hypot(self._alpha[0], self._s[0]))

    @property
    def step_index(self) -> int | None:
        """Index of the next step in ``timesteps`` (timesteps repeat, so steps are tracked by index)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The first step index, if a pipeline set one (img2img)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at ``begin_index`` instead of the first occurrence of the first timestep passed to ``step``."""
        self._begin_index = begin_index

    def _init_step_index(self, timestep: torch.Tensor | float) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        t = torch.as_tensor(timestep, dtype=torch.float64).to(self.timesteps.device)
        hits = (self.timesteps.double() == t).nonzero()
        if len(hits) == 0:
            raise ValueError(f"`timestep` {float(t)} is not in this scheduler's timesteps; call `set_timesteps`.")
        self._step_index = int(hits[0])

    # ------------------------------------------------------------------ the model's frame
    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor | float | None = None) -> torch.Tensor:
        """The network input at the current step (identity, or c_in * x_t for EDM models)."""
        if self.noise_schedule.family != "edm":
            return sample
        if self._step_index is None:
            self._init_step_index(timestep)
        return self.noise_schedule.model_input(sample, self.timesteps[self._step_index].cpu())

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | float
    ) -> torch.Tensor:
        """x_t = alpha_t x + s_t eps, in the model's frame."""
        return self.noise_schedule.add_noise(original_samples, noise, torch.as_tensor(timesteps).cpu())

    def level(self, step_index: int) -> tuple[float, float]:
        """``(alpha_t, s_t)`` of step ``step_index``; sigma = s_t / alpha_t."""
        return float(self._alpha[step_index]), float(self._s[step_index])

    # ------------------------------------------------------------------ the frame change, written once
    def to_ve(self, sample: torch.Tensor, step_index: int) -> torch.Tensor:
        """y = x_t / alpha_t: the model-frame sample of step ``step_index`` in the variance-exploding frame."""
        return sample / self._levels[step_index][0]

    def from_ve(self, y: torch.Tensor, step_index: int) -> torch.Tensor:
        """x_t = alpha_t y: inverse of :meth:`to_ve`."""
        return y * self._levels[step_index][0]

    def ve_sigmas(self) -> list[float]:
        """sigma = s_t / alpha_t of every step (levels x sweeps) in float64, for :func:`mmgibbs.gibbs.sample`."""
        return [level[1] for level in self._levels]

    def _mean(self, model_output: torch.Tensor, x_t: torch.Tensor, step_index: int) -> torch.Tensor:
        _, _, _, c_skip, c_out = self._levels[step_index]
        return c_skip * x_t + c_out * model_output.to(x_t.dtype)

    def denoiser(
        self, predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], first_step: int = 0
    ) -> LevelDenoiser:
        """The kernel's denoiser ``(y, i) -> mu`` at step ``first_step + i``, around ``predict(model_input,
        timestep) -> prediction``.

        x_t = alpha_t y; the network sees c_in x_t (:meth:`scale_model_input`) at ``timesteps[i]``; mu = c_skip x_t +
        c_out F(c_in x_t) (see ``mmgibbs.noise``). ``predict`` carries the conditioning, guidance and output
        convention of the model family and may run in any dtype; mu comes back in y's dtype.
        """

        def mu(y: torch.Tensor, i: int) -> torch.Tensor:
            i += first_step
            alpha, _, c_in, _, _ = self._levels[i]
            x_t = alpha * y
            return self._mean(predict(c_in * x_t if c_in != 1.0 else x_t, self.timesteps[i]), x_t, i)

        return mu

    def gibbs_settings(self) -> dict[str, Any]:
        """The keyword arguments of :func:`mmgibbs.gibbs.sample` that this scheduler's config sets."""
        cfg = self.config
        return {
            "covariance": cfg.covariance,
            "num_probes": cfg.num_probes,
            "jacobian": cfg.jacobian,
            "variance_bound": cfg.variance_bound,
            "transition": cfg.transition,
            "eta": cfg.eta,
            "final_output": cfg.final_output,
            "clip_range": self._clip_range(),
        }

    def _clip_range(self) -> float | None:
        return self.config.clip_sample_range if self.config.clip_sample else None

    # ------------------------------------------------------------------ the Gibbs step
    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | float,
        sample: torch.Tensor,
        generator: Generator = None,
        return_dict: bool = True,
    ) -> MMGibbsSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One Gibbs sweep (``mmgibbs.gibbs``): x ~ N(mu, Sigma) at this level, then re-noise to the next step's.

        Args:
            model_output: the model's prediction at ``sample`` (of the config's ``prediction_type``).
            timestep: the current timestep (steps are counted by index; this only seeds the first index).
            sample: x_t, the current model input (before ``scale_model_input``).
            generator: torch generator(s) for the draws.
            return_dict: return a :class:`MMGibbsSchedulerOutput` rather than a tuple.

        Only ``covariance="none"`` and ``"isotropic"`` can be stepped from a model output; the Jacobian covariances
        need the model itself (:class:`MomentMatchingGibbsPipeline`).
        """
        cfg = self.config
        if cfg.covariance in JACOBIAN_COVARIANCES:
            raise ValueError(
                f"covariance={cfg.covariance!r} needs the model's Jacobian, which a standard pipeline loop does "
                "not give the scheduler. Use `MomentMatchingGibbsPipeline` (which computes it), or "
                "covariance='none' / 'isotropic' here."
            )
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= len(self.timesteps):
            raise IndexError("`step` called more often than there are timesteps; call `set_timesteps` again.")
        work = torch.float64 if sample.dtype == torch.float64 else torch.float32
        x_t = sample.to(work)
        y, sigma = self.to_ve(x_t, i), self._levels[i][1]
        mu = self._mean(model_output, x_t, i)
        moments = moments_from_mean(
            y, mu, torch.full((len(y),), sigma, dtype=work, device=y.device), cfg.covariance, cfg.variance_bound
        )
        last = i == len(self.timesteps) - 1
        out, mu = gibbs_step(
            moments,
            y,
            sigma,
            None if last else self._levels[i + 1][1],
            transition=cfg.transition,
            eta=cfg.eta,
            final_output=cfg.final_output,
            clip_range=self._clip_range(),
            generator=generator,
        )
        prev = out if last else self.from_ve(out, i + 1)
        self._step_index = i + 1
        prev, mu = prev.to(sample.dtype), mu.to(sample.dtype)
        if not return_dict:
            return prev, mu
        return MMGibbsSchedulerOutput(prev_sample=prev, pred_original_sample=mu)
