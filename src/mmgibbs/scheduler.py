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

import inspect
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput, logging

from . import sources
from .calibration import TABLE_FILE, CovarianceTable
from .checks import check_generator, check_number, check_tensor, is_real
from .covariances import CovarianceEstimator, _ReadsTable, check_settings, estimator_class, make_estimator
from .energy import DROP_IN_ERROR
from .gibbs import FINAL_OUTPUTS, TRANSITIONS, LevelDenoiser, check_mean_order, gibbs_step
from .moments import Generator
from .multistep import MultistepMean, VarianceMatch
from .noise import (
    _DEFAULT_PREDICTION,
    _PREDICTION_ALIASES,
    NOISE_FAMILIES,
    NoiseSchedule,
    _as_float64,
    _check_choice,
    denoise_in_ve_frame,
    infer_noise_family,
)

logger = logging.get_logger(__name__)

#: the module diffusers' pipeline loader imports this scheduler from: a file saved into the scheduler's folder
LOADER_MODULE = "mmgibbs_scheduler"
_LOADER_SOURCE = '''"""MMGibbsScheduler for diffusers' pipeline loader (a custom component, see model_index.json).

It needs the diffusers-mmgibbs package (`pip install diffusers-mmgibbs`); load the pipeline with
`DiffusionPipeline.from_pretrained(path, trust_remote_code=True)`.
"""

from mmgibbs.scheduler import MMGibbsScheduler

__all__ = ["MMGibbsScheduler"]
'''

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
        covariance: ``"none"`` (mean only), ``"isotropic"`` (Analytic-DPM's estimate per sample),
            ``"isotropic_batch"`` (the same averaged over the batch, which couples the samples), ``"calibrated"``
            (the per-level expected posterior covariance of a calibrated table, :meth:`set_covariance_table`; zero
            extra calls, no coupling), or, inside :class:`MomentMatchingGibbsPipeline` only, ``"diagonal"``,
            ``"exact_diagonal"``, ``"full"``, ``"projection"``, ``"calibrated_jacobian"``: the estimators of
            ``mmgibbs.covariances``, one class each (:meth:`estimator` builds the one named here).
        gibbs_sweeps: Gibbs sweeps per noise level; the model is called levels x sweeps times. It is also the
            scheduler's ``order`` (model calls per level, as Heun-type schedulers have order 2), so that
            img2img/inpainting `strength` slices (``timesteps[t_start * order:]``) start on a level.
        schedule: ``"annealed"`` (levels from high to low noise) or ``"single_level"`` (every sweep at ``sigma``).
        sigma: the noise level of the single-level chain (VE frame; VP models use the nearest timestep).
        transition: how to move between levels, ``"ancestral"`` or ``"gibbs"`` (see the module docstring).
        eta: share of fresh noise in the ancestral transition: 1 is the DDPM posterior, 0 a DDIM step.
        mean_order: 1 centres each draw on the posterior mean mu_i; 2 on DPM-Solver++(2M)'s multistep extrapolation
            mu_i + (mu_i - mu_{i-1}) h_i / (2 h_{i-1}), h = log(sigma_i / sigma_{i+1}) (ancestral transition
            only; with ``covariance="none"`` it is DPM-Solver++(2M), at eta 1 its SDE form; see ``mmgibbs.gibbs``).
        corrector: UniPC's corrector (UniC, bh2) on the draw's centre: once the model has given mu at the level a
            transition reached, that transition's centre is corrected with it and y moved accordingly (no extra
            model call; ancestral transition only). With ``mean_order=2``, ``covariance="none"`` and eta 0 the chain
            is UniPC step for step (``mmgibbs.multistep``).
        final_output: return the last drawn ``"sample"`` x or the last posterior ``"mean"`` mu.
        num_probes: Rademacher probes of the Hutchinson diagonal, or Jacobian products of the
            ``calibrated_jacobian`` correction (pipeline only).
        jacobian: ``"auto"``, ``"reverse"``, ``"forward"`` or ``"finite_difference"`` Jacobian products for
            Jacobian covariances (pipeline only).
        product_batch: Jacobian products per model pass (pipeline only): 1 computes them one at a time; k > 1
            computes k probes (or k basis vectors of ``full``) in one pass vectorised with ``torch.func.vmap``, same
            draws, same results to float rounding (see ``mmgibbs.moments.denoising_moments``).
        variance_bound: optional upper bound on per-dimension posterior variances (r^2 for data in [-r, r]).
        noise_family: ``"vp"``, ``"ve"``, ``"edm"`` or ``"flow"``; inferred by :meth:`from_config`.
        source_scheduler: the diffusers scheduler class the config came from (set by :meth:`from_config`):
            ``set_timesteps`` lays out the levels that class lays out, with all its options (``mmgibbs.sources``);
            ``None`` for MMGibbs's own layout.
        The remaining arguments are the source scheduler's noise-schedule settings, with diffusers' meanings.
        Options of the source that MMGibbs does not take as arguments stay in the config (``from_config``).

    VP models expose ``betas``, ``alphas`` and ``alphas_cumprod`` as DDPMScheduler does. ``order`` is
    ``gibbs_sweeps``. :meth:`save_pretrained` also writes the loader file diffusers needs to reload a pipeline with
    this scheduler in a fresh interpreter (``trust_remote_code=True``).
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + [
        "ScoreSdeVeScheduler",
        "EDMDPMSolverMultistepScheduler",
        "FlowMatchEulerDiscreteScheduler",
    ]
    order = 1  # the class default; every instance sets its own, ``gibbs_sweeps``

    @register_to_config
    def __init__(
        self,
        covariance: str = "isotropic",
        gibbs_sweeps: int = 1,
        schedule: str = "annealed",
        sigma: float | None = None,
        transition: str = "ancestral",
        eta: float = 1.0,
        mean_order: int = 1,
        corrector: bool = False,
        final_output: str = "sample",
        num_probes: int = 1,
        jacobian: str = "auto",
        product_batch: int = 1,
        variance_bound: float | None = 1.0,
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
        source_scheduler: str | None = None,
    ):
        estimator_class(covariance)  # the estimator itself is built when sampling (the table comes later)
        _check_choice("schedule", schedule, SCHEDULES)
        _check_choice("transition", transition, TRANSITIONS)
        _check_choice("final_output", final_output, FINAL_OUTPUTS)
        if isinstance(gibbs_sweeps, bool) or not isinstance(gibbs_sweeps, int) or gibbs_sweeps < 1:
            raise ValueError(f"`gibbs_sweeps` must be a positive integer; got {gibbs_sweeps!r}.")
        # every estimator setting, also those this covariance does not use (a per-call covariance may)
        check_settings(
            num_probes=num_probes, jacobian=jacobian, product_batch=product_batch, variance_bound=variance_bound
        )
        if schedule == "single_level" and not (is_real(sigma) and sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"schedule='single_level' needs a positive noise level `sigma` (finite); got {sigma!r}.")
        check_number(eta, "eta", low=0.0, high=1.0)
        check_mean_order(mean_order, transition, corrector)
        if num_train_timesteps is not None:
            check_number(num_train_timesteps, "num_train_timesteps", integer=True, low=1)
        sources.refuse_source(source_scheduler)
        family = noise_family or (
            infer_noise_family({"source_scheduler": source_scheduler}) if source_scheduler else "vp"
        )
        _check_choice("noise_family", family, NOISE_FAMILIES)
        self.register_to_config(noise_family=family, prediction_type=prediction_type or _DEFAULT_PREDICTION[family])
        # the resolved family is what marks a config as ours: it must travel through other schedulers' configs,
        # which drop the keys listed as left at their defaults (diffusers' `_use_default_values`)
        internal = dict(self._internal_dict)
        defaults = [k for k in internal.pop("_use_default_values", []) if k != "noise_family"]
        self._internal_dict = FrozenDict({**internal, "_use_default_values": defaults} if defaults else internal)
        if family == "vp" and trained_betas is not None and num_train_timesteps != len(trained_betas):
            if num_train_timesteps is not None:
                logger.warning(
                    f"`trained_betas` has {len(trained_betas)} entries but `num_train_timesteps` is "
                    f"{num_train_timesteps}: the model has {len(trained_betas)} training steps."
                )
            self.register_to_config(num_train_timesteps=len(trained_betas))
        self.noise_schedule = NoiseSchedule.from_config(self.config)
        # what a pipeline's model_index.json records as this component's library: the loader file saved beside
        # the config (see save_pretrained), not `mmgibbs.scheduler`, which diffusers imports only if already imported
        self.__module__ = LOADER_MODULE
        # Model calls per level, as Heun-type schedulers declare order 2: img2img/inpainting pipelines start at
        # timesteps[t_start * order] (and set_begin_index(t_start * order)), which must be the first sweep of a level
        self.order = gibbs_sweeps
        self.covariance_table: CovarianceTable | None = None
        self.num_inference_steps: int | None = None
        if schedule == "single_level":
            self.timesteps = self._single_level(sigma).reshape(1)
        elif family == "vp":  # every training step, as DDPMScheduler starts
            self.timesteps = torch.arange(self.noise_schedule.num_train_timesteps).flip(0)
        else:  # with dynamic shifting mu is not known before set_timesteps: the unshifted levels (mu = 0)
            self.timesteps = self.noise_schedule.inference_timesteps(self.noise_schedule.num_train_timesteps, mu=0.0)
        self._set_levels(self.timesteps)

    def _single_level(self, sigma: float) -> torch.Tensor:
        """The timestep of the single-level chain's ``sigma``, which must be a level the model was trained at.

        VP and flow models refuse a sigma outside their training levels (ValueError: the nearest training step
        would be another noise level, or u >= 1); VE and EDM models warn (UserWarning), as the model is then
        evaluated at a noise level it was not trained at.
        """
        schedule = self.noise_schedule
        lo, hi = schedule.trained_sigma_range()
        if not lo * (1 - 1e-3) <= sigma <= hi * (1 + 1e-3):
            message = (
                f"`sigma`={sigma:g} lies outside the noise levels this {schedule.family.upper()} model was trained "
                f"at, [{lo:g}, {hi:g}]"
            )
            if schedule.family in ("vp", "flow"):
                raise ValueError(message + ".")
            warnings.warn(message + "; its predictions there are an extrapolation.", UserWarning, stacklevel=3)
        return schedule.timestep_for_sigma(sigma)

    # ------------------------------------------------------------------ configuration
    @classmethod
    def from_scheduler(cls, scheduler: SchedulerMixin, **settings: Any) -> MMGibbsScheduler:
        """From a live diffusers scheduler, e.g. ``pipe.scheduler = MMGibbsScheduler.from_scheduler(pipe.scheduler,
        covariance="isotropic")``: its config and its class (a config built in Python names no class, and some
        configs fit several schedulers whose levels differ). An MMGibbsScheduler without settings comes back as is;
        with settings, a new one that keeps its calibrated covariance table (the table is keyed by level, so a
        setting that moves the levels finds the missing ones named when sampling)."""
        if isinstance(scheduler, MMGibbsScheduler):
            if not settings:
                return scheduler
            new = cls.from_config(scheduler.config, **settings)
            new.set_covariance_table(scheduler.covariance_table)
            return new
        return cls.from_config({**scheduler.config, "_class_name": type(scheduler).__name__}, **settings)

    @classmethod
    def from_config(
        cls, config: dict[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs: Any
    ) -> MMGibbsScheduler | tuple[MMGibbsScheduler, dict[str, Any]]:
        """From the config of any supported scheduler, e.g. ``MMGibbsScheduler.from_config(pipe.scheduler.config,
        covariance="isotropic", gibbs_sweeps=2)``.

        The source scheduler class (``_class_name``, or the class whose arguments the config holds) is kept as
        ``source_scheduler``: its noise schedule and its layout of levels (``set_timesteps``) are used, and its
        noise family and a missing prediction type inferred from it. Keys of the config that MMGibbs does not use
        are kept (diffusers logs them). Explicit keyword arguments must be MMGibbs settings or options of the
        source scheduler (which then override the config's): anything else, e.g. a misspelt ``covarience=``,
        raises a TypeError naming it.
        """
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(
                f"`config` must be a scheduler config (a dict such as `pipe.scheduler.config`); got "
                f"{type(config).__name__}."
            )
        config = dict(config or {})
        native = config.get("noise_family") is not None  # our own config, maybe through another scheduler's
        if "source_scheduler" in kwargs:
            source = kwargs["source_scheduler"]
        else:
            source = config.get("source_scheduler") if native else sources.identify_source(config)
        sources.refuse_source(source)
        ours = frozenset(inspect.signature(cls.__init__).parameters) - {"self"}
        sources.check_keyword_arguments(kwargs, ours, source)
        # options of the source passed as keywords: diffusers would drop them (not ours), they must reach the
        # config that set_timesteps builds the source from, and count as given rather than as defaults
        for key in [k for k in kwargs if k not in ours and not k.startswith("_")]:
            config[key] = kwargs.pop(key)
            if key in config.get("_use_default_values", []):
                config["_use_default_values"] = [k for k in config["_use_default_values"] if k != key]
        if not native:
            # diffusers drops the keys a source left at *its* defaults (`_use_default_values`), which would swap in
            # ours (e.g. DDPM's clip_sample=True, Euler's linspace spacing): keep the source's noise schedule whole
            config.pop("_use_default_values", None)
            # a None there means the source's default; left out, it stays a default here too, so that a scheduler
            # converted from this config is not handed an explicit None (EDM's sigma_min=None would crash it)
            config = {k: v for k, v in config.items() if v is not None}
            if source is not None:
                kwargs.setdefault("source_scheduler", source)
            if "noise_family" not in kwargs:
                kwargs["noise_family"] = infer_noise_family(
                    {**config, **kwargs, "_class_name": source or config.get("_class_name")}
                )
            prediction = kwargs.get("prediction_type", config.get("prediction_type"))
            if prediction in _PREDICTION_ALIASES:
                kwargs["prediction_type"] = _PREDICTION_ALIASES[prediction]
        sources.check_options(source, {**config, **kwargs})
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def __len__(self) -> int:
        return self.noise_schedule.num_train_timesteps

    # ------------------------------------------------------------------ the calibrated covariance
    def set_covariance_table(self, table: CovarianceTable | None) -> None:
        """Use ``table`` (``mmgibbs.calibration.CovarianceTable``) for ``covariance="calibrated"``; it is state, not
        config: :meth:`save_pretrained` writes it next to the config and :meth:`from_pretrained` reads it back."""
        if table is not None and not isinstance(table, CovarianceTable):
            raise TypeError(
                "`table` must be a CovarianceTable (from `calibrate_covariance` or CovarianceTable.load) or None; "
                f"got {type(table).__name__}."
            )
        self.covariance_table = table

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        subfolder: str | None = None,
        return_unused_kwargs: bool = False,
        **kwargs: Any,
    ) -> MMGibbsScheduler | tuple[MMGibbsScheduler, dict[str, Any]]:
        """The saved config, and the calibrated covariance table saved with it (local folders)."""
        loaded = super().from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, return_unused_kwargs=return_unused_kwargs, **kwargs
        )
        scheduler = loaded[0] if isinstance(loaded, tuple) else loaded
        if pretrained_model_name_or_path is not None:
            path = Path(pretrained_model_name_or_path, subfolder or "", TABLE_FILE)
            if path.is_file():
                scheduler.set_covariance_table(CovarianceTable.load(path))
        return loaded

    # ------------------------------------------------------------------ the VP training schedule, as DDPM has it
    def _vp_betas(self, name: str) -> torch.Tensor:
        betas = self.noise_schedule.betas
        if betas is None:  # AttributeError keeps hasattr() False for families without betas
            raise AttributeError(
                f"`{name}` exists for VP (beta) schedules only; this one is {self.config.noise_family!r}."
            )
        return betas

    @property
    def betas(self) -> torch.Tensor:
        """The training betas (float32), exactly as diffusers' DDPMScheduler builds them (VP only)."""
        return self._vp_betas("betas").clone()

    @property
    def alphas(self) -> torch.Tensor:
        """1 - betas (float32, VP only)."""
        return 1.0 - self._vp_betas("alphas")

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The cumulative product of ``alphas`` (float32, as DDPMScheduler's; VP only)."""
        return torch.cumprod(1.0 - self._vp_betas("alphas_cumprod"), dim=0)

    # ------------------------------------------------------------------ timesteps
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | torch.Tensor | None = None,
        sigmas: list[float] | torch.Tensor | None = None,
        mu: float | None = None,
        **kwargs: Any,
    ) -> None:
        """Lay out levels x ``gibbs_sweeps`` model calls and reset all state.

        The levels are those the source scheduler (``source_scheduler``, see ``mmgibbs.sources``) lays out for
        ``num_inference_steps``, with all its layout options; without a source, MMGibbs's own (DDPM's spacing for
        VP, ScoreSdeVe's geometric VE levels, the Karras/exponential EDM ones, FlowMatchEuler's shifted ramp).

        Args:
            num_inference_steps: the number of noise levels (annealed) or of sweeps at ``sigma`` (single level);
                either way every level is repeated ``gibbs_sweeps`` times.
            device: where ``timesteps`` live.
            timesteps: custom levels, descending, as the model's timesteps (VP: training steps; flow: u * T with
                u < 1; EDM: c_noise(sigma)), instead of ``num_inference_steps`` (annealed only; passing both is an
                error, as in diffusers' schedulers).
            sigmas: custom noise levels, descending, in the source scheduler's units (flow: u in (0, 1], as
                FluxPipeline passes them, shifted like FlowMatchEuler shifts them; u = 1 is clamped to
                1 - 1/T, the largest level with a finite sigma; VE/EDM: sigma), instead of ``num_inference_steps``.
            mu: the resolution-dependent shift of flow models with ``use_dynamic_shifting`` (FluxPipeline, SD3);
                ignored otherwise, as FlowMatchEuler ignores it.
        """
        if kwargs:
            if "original_inference_steps" in kwargs:
                raise ValueError(
                    "`original_inference_steps` is a LatentConsistencyModelPipeline argument: latent consistency "
                    "models predict the end point of the probability-flow ODE, not the posterior mean that "
                    "moment-matching Gibbs sampling needs, so MMGibbsScheduler cannot sample them. Use LCMScheduler "
                    "with that pipeline, or MomentMatchingGibbsPipeline / a standard pipeline with a diffusion model."
                )
            raise TypeError(f"set_timesteps() got unexpected keyword argument(s): {', '.join(sorted(kwargs))}.")
        cfg, schedule = self.config, self.noise_schedule
        source = cfg.get("source_scheduler")
        if timesteps is not None and sigmas is not None:
            raise ValueError("Pass at most one of `timesteps` and `sigmas`.")
        custom_name = "timesteps" if timesteps is not None else "sigmas" if sigmas is not None else None
        custom = timesteps if timesteps is not None else sigmas
        if mu is not None and schedule.family != "flow":
            raise ValueError(
                f"`mu` shifts flow-matching levels; this is a {schedule.family!r} model (FluxPipeline and SD3 pass "
                "`mu` to their scheduler themselves: their loop needs a flow-matching config)."
            )
        if custom is None:
            if (
                isinstance(num_inference_steps, bool)
                or not isinstance(num_inference_steps, int)
                or num_inference_steps < 1
            ):
                raise ValueError(f"`num_inference_steps` must be a positive integer; got {num_inference_steps!r}.")
        else:
            if cfg.schedule == "single_level":
                raise ValueError(
                    f"`{custom_name}` cannot be set for schedule='single_level'; use `sigma` (a pipeline that passes "
                    f"its own `{custom_name}`, as FluxPipeline does, cannot run a single-level chain in its loop: use "
                    "MomentMatchingGibbsPipeline)."
                )
            if num_inference_steps is not None:  # as diffusers' schedulers refuse it
                raise ValueError(
                    f"Pass `num_inference_steps` or `{custom_name}`, not both: custom `{custom_name}` set the number "
                    f"of levels ({len(custom)} here)."
                )
        if timesteps is not None:
            levels = schedule.check_timesteps(timesteps, "timesteps")
        elif sigmas is not None:
            # VP sigmas only have a layout through the source (Euler's _sigma_to_t); flow sources shift them; EDM
            # sources take a ramp, not noise levels, under that name: EDM/VE sigmas are laid out here
            takes_sigmas = source is not None and sources.SOURCE_LAYOUTS[source] != "native"
            if takes_sigmas and schedule.family == "flow":
                takes_sigmas = "sigmas" in inspect.signature(getattr(diffusers, source).set_timesteps).parameters
            takes_sigmas = takes_sigmas and schedule.family in ("vp", "flow")
            if takes_sigmas:
                values = _as_float64(sigmas, "sigmas")
                if bool(torch.any(values <= 0)) or bool(torch.any(values[1:] >= values[:-1])):
                    raise ValueError("`sigmas` must be positive noise levels, strictly descending.")
                if schedule.family == "flow" and bool(torch.any(values > 1)):
                    raise ValueError(f"`sigmas` of a flow model are u in (0, 1]; got {float(values.max()):g}.")
                levels = self._source_levels(source, sigmas=values.tolist(), mu=mu)
            else:
                levels = schedule.timesteps_for_sigmas(sigmas, mu=mu)
        elif cfg.schedule == "single_level":
            levels = self._single_level(cfg.sigma).reshape(1).repeat(num_inference_steps)
        elif source is not None and sources.SOURCE_LAYOUTS[source] != "native":
            levels = self._source_levels(source, num_inference_steps=num_inference_steps, mu=mu)
            if len(levels) != num_inference_steps:
                logger.warning(
                    f"{source} lays out {len(levels)} distinct levels for {num_inference_steps} steps (its rounded "
                    "timesteps repeat); each is visited once per sweep."
                )
        else:
            levels = schedule.inference_timesteps(num_inference_steps, mu=mu)
        self.num_inference_steps = len(levels)
        timesteps_all = levels.repeat_interleave(cfg.gibbs_sweeps)
        integral = schedule.family == "vp" and bool(torch.all(levels == levels.round()))
        self.timesteps = timesteps_all.to(torch.int64 if integral else torch.float32).to(device)
        self._set_levels(timesteps_all)

    def _source_levels(self, source: str, **kwargs: Any) -> torch.Tensor:
        """The source scheduler's levels, validated; flow levels at u = 1 (alpha = 0) clamped to u = 1 - 1/T."""
        levels = sources.source_levels(source, self.config, **kwargs)
        if self.noise_schedule.family == "flow":
            n = self.noise_schedule.num_train_timesteps
            levels = levels.clamp(max=n - 1)
            keep = torch.ones(len(levels), dtype=torch.bool)
            keep[1:] = levels[1:] != levels[:-1]
            levels = levels[keep]
        try:
            return self.noise_schedule.check_timesteps(levels, f"timesteps laid out by {source}")
        except ValueError as err:
            raise ValueError(f"{err} ({source} with {sources.layout_options(source, self.config)})") from None

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
        self._table_checked = False  # by the run's first scale_model_input
        # the previous transition's mean (and the corrector's record of it), for step()
        self._multistep = MultistepMean(self.config.mean_order, self.config.corrector)
        self._match: tuple[int, float, VarianceMatch] | None = None  # (first step, eta, factors) of this run

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
        t = self._one_timestep(timestep).to(self.timesteps.device)
        hits = (self.timesteps.double() == t).nonzero()
        if len(hits) == 0:
            raise ValueError(f"`timestep` {float(t)} is not in this scheduler's timesteps; call `set_timesteps`.")
        self._step_index = int(hits[0])

    @staticmethod
    def _one_timestep(timestep: torch.Tensor | float) -> torch.Tensor:
        """The single level of a step's ``timestep``: a number, a 0-d tensor or a per-sample tensor of equal values."""
        try:
            t = torch.as_tensor(timestep, dtype=torch.float64).flatten()
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"`timestep` must be a number or a tensor; got {type(timestep).__name__}: {timestep!r}."
            ) from None
        if t.numel() == 0:
            raise ValueError("`timestep` is empty.")
        if bool(torch.any(t != t[0])):
            raise ValueError(
                "`timestep` holds different per-sample values; every sample of a batch is at one noise level in "
                f"this scheduler (got {t.unique().tolist()[:4]}...)."
            )
        return t[0]

    # ------------------------------------------------------------------ the model's frame
    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor | float | None = None) -> torch.Tensor:
        """The network input at the current step (identity, or c_in * x_t for EDM models). At a run's first call,
        before the host's first model call, a calibrated covariance's table is checked against the run's levels
        and the sample's size (a missing table or level, another model's table)."""
        if not self._table_checked:
            self._table_checked = True
            if issubclass(estimator_class(self.config.covariance), _ReadsTable):
                self.estimator().check_run(self.ve_sigmas()[self._begin_index or 0 :], sample)
        if self.noise_schedule.family != "edm":
            return sample
        if self._step_index is None:
            self._init_step_index(timestep)
        return sample * self._levels[self._step_index][2]  # c_in of this step, a Python float: no device sync

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | float
    ) -> torch.Tensor:
        """x_t = alpha_t x + s_t eps, in the model's frame; ``timesteps`` is one value or one per sample."""
        check_tensor(original_samples, "original_samples")
        check_tensor(noise, "noise")
        t = torch.as_tensor(timesteps).cpu()
        if t.ndim > 1:
            t = t.flatten()
        if t.ndim == 1 and len(t) == 1:
            t = t[0]
        if t.ndim == 1 and len(t) != len(original_samples):
            raise ValueError(
                f"`timesteps` must be one value or one per sample; got {len(t)} for a batch of "
                f"{len(original_samples)}."
            )
        if noise.shape != original_samples.shape:
            raise ValueError(
                f"`noise` must have the shape of `original_samples` {tuple(original_samples.shape)}; got "
                f"{tuple(noise.shape)}."
            )
        return self.noise_schedule.add_noise(original_samples, noise, t)

    # ------------------------------------------------------------------ loops MMGibbs does not run
    _PREDICTOR_CORRECTOR = (
        "ScoreSdeVePipeline runs a predictor-corrector loop (set_sigmas, step_correct, step_pred) that "
        "MMGibbsScheduler does not implement: sample this model with "
        "MomentMatchingGibbsPipeline(unet=pipe.unet, scheduler=pipe.scheduler), whose Gibbs sweeps take the "
        "corrector's place (gibbs_sweeps), or with ScoreSdeVeScheduler."
    )

    def set_sigmas(self, *args: Any, **kwargs: Any) -> None:
        """Refused: only ScoreSdeVePipeline's predictor-corrector loop calls it (see the error)."""
        raise ValueError(self._PREDICTOR_CORRECTOR)

    def step_pred(self, *args: Any, **kwargs: Any) -> None:
        """Refused: ScoreSdeVe's predictor step (see :meth:`set_sigmas`)."""
        raise ValueError(self._PREDICTOR_CORRECTOR)

    def step_correct(self, *args: Any, **kwargs: Any) -> None:
        """Refused: ScoreSdeVe's Langevin corrector step (see :meth:`set_sigmas`)."""
        raise ValueError(self._PREDICTOR_CORRECTOR)

    # ------------------------------------------------------------------ saving for diffusers' pipeline loader
    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Save the config, a calibrated covariance table (``covariance_table.safetensors``) if one is set, and
        ``mmgibbs_scheduler.py`` beside them for diffusers' pipeline loader.

        diffusers 0.42 imports a pipeline component's library only if it is its own (diffusers, transformers)
        or already imported; for any other code its convention is a file in the component's folder, named in
        model_index.json and run with ``trust_remote_code=True``. This scheduler is recorded there as
        ``["mmgibbs_scheduler", "MMGibbsScheduler"]`` and the file imports it from the installed package, so a
        saved pipeline reloads in a fresh interpreter with
        ``DiffusionPipeline.from_pretrained(path, trust_remote_code=True)``.
        """
        os.makedirs(save_directory, exist_ok=True)  # before the config, so that push_to_hub uploads the file too
        with open(os.path.join(save_directory, LOADER_MODULE + ".py"), "w", encoding="utf-8") as handle:
            handle.write(_LOADER_SOURCE)
        if self.covariance_table is not None:  # state, not config: the calibrated covariances beside the config
            self.covariance_table.save(Path(save_directory) / TABLE_FILE)
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

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
            alpha, _, c_in, c_skip, c_out = self._levels[first_step + i]
            return denoise_in_ve_frame(predict, y, self.timesteps[first_step + i], alpha, c_in, c_skip, c_out)

        return mu

    def snapshot_levels(self) -> list[tuple[float, Any, tuple[float, float, float, float]]]:
        """Every step now laid out as ``(sigma, timestep, (alpha, c_in, c_skip, c_out))``, for denoisers that must
        outlive this layout (:meth:`denoiser_over`: a calibration over the levels of several schedules at once)."""
        return [(lv[1], self.timesteps[i], (lv[0], lv[2], lv[3], lv[4])) for i, lv in enumerate(self._levels)]

    @staticmethod
    def denoiser_over(
        predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        levels: list[tuple[float, Any, tuple[float, float, float, float]]],
    ) -> LevelDenoiser:
        """The kernel's denoiser ``(y, j) -> mu`` at level j of ``levels`` (:meth:`snapshot_levels`), as
        :meth:`denoiser` is at the steps of the current layout."""

        def mu(y: torch.Tensor, j: int) -> torch.Tensor:
            _, timestep, (alpha, c_in, c_skip, c_out) = levels[j]
            return denoise_in_ve_frame(predict, y, timestep, alpha, c_in, c_skip, c_out)

        return mu

    def estimator(self) -> CovarianceEstimator:
        """The covariance estimator the config's ``covariance`` names, built with the config's settings and the
        calibrated table (:func:`mmgibbs.covariances.make_estimator`), for :func:`mmgibbs.gibbs.sample`."""
        return make_estimator(**self._estimator_settings())

    def kernel_settings(self) -> dict[str, Any]:
        """The keyword arguments of :func:`mmgibbs.gibbs.sample` that this scheduler's config sets (the estimator
        aside: :meth:`estimator`)."""
        cfg = self.config
        return {
            "transition": cfg.transition,
            "eta": cfg.eta,
            "mean_order": cfg.mean_order,
            "corrector": cfg.corrector,
            "final_output": cfg.final_output,
            "clip_range": self._clip_range(),
        }

    def gibbs_settings(self) -> dict[str, Any]:
        """Every Gibbs setting of this scheduler by name: the estimator's (``covariance``, its settings and the
        ``covariance_table``, from which :meth:`estimator` builds it) and the kernel's (:meth:`kernel_settings`)."""
        return {**self._estimator_settings(), **self.kernel_settings()}

    def _estimator_settings(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "covariance": cfg.covariance,
            "num_probes": cfg.num_probes,
            "jacobian": cfg.jacobian,
            "product_batch": cfg.product_batch,
            "variance_bound": cfg.variance_bound,
            "covariance_table": self.covariance_table,
        }

    def _clip_range(self) -> float | None:
        return self.config.clip_sample_range if self.config.clip_sample else None

    # ------------------------------------------------------------------ the Gibbs step
    def _step_eta(self, kwargs: dict[str, Any]) -> float:
        """The eta of this step: ``kwargs["eta"]`` (DDIMPipeline passes it) or the config's; other kwargs checked."""
        kwargs = dict(kwargs)
        eta = kwargs.pop("eta", None)
        clipped = kwargs.pop("use_clipped_model_output", None)
        if kwargs.pop("variance_noise", None) is not None:
            raise ValueError("`variance_noise` is not supported: the draws come from `generator`.")
        if kwargs:
            raise TypeError(f"step() got unexpected keyword argument(s): {', '.join(sorted(kwargs))}.")
        if clipped is False and self.config.clip_sample:
            warnings.warn(
                "use_clipped_model_output=False cannot be honoured with clip_sample=True: the transition derives "
                "its noise from the clipped mean (DDIM's use_clipped_model_output=True).",
                UserWarning,
                stacklevel=3,
            )
        if eta is None:
            return self.config.eta
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"`eta` must lie in [0, 1]; got {eta!r}.")
        return float(eta)

    def _prediction_of(self, model_output: Any, sample: Any) -> torch.Tensor:
        """``model_output`` checked against ``sample``: tensors of one shape, or, when the source config's
        ``variance_type`` is learned (``"learned"``, ``"learned_range"``: improved-DDPM UNets), a 2C-channel output
        [F, v] for a C-channel sample, of which the prediction F is kept, as DDPMScheduler splits it. The learned
        variance v is not used: the moment-matched covariance (``covariance``) takes its place."""
        check_tensor(model_output, "model_output")
        check_tensor(sample, "sample", floating=True)
        if model_output.shape == sample.shape:
            return model_output
        doubled = (
            model_output.ndim == sample.ndim >= 2
            and model_output.shape[1] == 2 * sample.shape[1]
            and model_output.shape[0] == sample.shape[0]
            and model_output.shape[2:] == sample.shape[2:]
        )
        if doubled:
            if str(self.config.get("variance_type") or "").startswith("learned"):
                return model_output[:, : sample.shape[1]]
            raise ValueError(
                f"`model_output` has {model_output.shape[1]} channels for a {sample.shape[1]}-channel `sample`: a "
                "model with a learned variance? Build the scheduler from its own config (variance_type='learned' "
                "or 'learned_range'), and the prediction, the first half of the channels, is used; otherwise pass "
                "the prediction alone."
            )
        if model_output.ndim == 1 and sample.ndim > 1 and len(model_output) == len(sample):
            raise ValueError(
                f"`model_output` has shape {tuple(model_output.shape)}, one scalar per sample: an energy model? "
                f"{DROP_IN_ERROR}."
            )
        raise ValueError(
            f"`model_output` has shape {tuple(model_output.shape)} but `sample` has shape {tuple(sample.shape)}: "
            "the model's prediction must have the sample's shape (it is not broadcast)."
        )

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | float,
        sample: torch.Tensor,
        generator: Generator = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> MMGibbsSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One Gibbs sweep (``mmgibbs.gibbs``): x ~ N(mu, Sigma) at this level, then re-noise to the next step's.

        Args:
            model_output: the model's prediction at ``sample`` (of the config's ``prediction_type``), of the
                sample's shape; with a learned-variance config (``variance_type`` "learned"/"learned_range") a
                2C-channel output for a C-channel sample is split, its first C channels are the prediction.
            timestep: the current timestep (steps are counted by index; this only seeds the first index).
            sample: x_t, the current model input (before ``scale_model_input``).
            generator: a torch generator for the draws, or a list with one per sample.
            kwargs: what DDIM-style pipelines pass (``DDIMPipeline``): ``eta``, the ancestral transition's eta for
                this step instead of the config's (the same meaning: 1 the DDPM posterior, 0 a DDIM step);
                ``use_clipped_model_output``, accepted: the transition always re-derives the noise from the
                clipped mean (DDIM's True); False is impossible with ``clip_sample`` and warns. They are keyword-only
                (``**kwargs``), so pipelines that pass ``eta`` only to schedulers whose signature names it (Stable
                Diffusion's ``prepare_extra_step_kwargs``, default eta 0) do not override the config's eta.

        Only ``covariance="none"``, ``"isotropic(_batch)"`` and ``"calibrated"`` (once a table is set) can be stepped
        from a model output; the Jacobian covariances need the model itself (:class:`MomentMatchingGibbsPipeline`).
        """
        eta = self._step_eta(kwargs)
        model_output = self._prediction_of(model_output, sample)
        check_generator(generator, len(sample))
        cfg = self.config
        if estimator_class(cfg.covariance).needs_jacobian:
            raise ValueError(
                f"covariance={cfg.covariance!r} needs the model's Jacobian, which a standard pipeline loop does "
                "not give the scheduler. Use `MomentMatchingGibbsPipeline` (which computes it), or "
                "covariance='none' / 'isotropic' here."
            )
        estimator = self.estimator()
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= len(self.timesteps):
            raise IndexError("`step` called more often than there are timesteps; call `set_timesteps` again.")
        work = torch.float64 if sample.dtype == torch.float64 else torch.float32
        x_t = sample.to(work)
        y, (_, sigma, *coefficients) = self.to_ve(x_t, i), self._levels[i]
        mu = denoise_in_ve_frame(lambda *_: model_output, y, timestep, self._levels[i][0], *coefficients)
        moments = estimator.from_mean(y, mu, sigma)
        last = i == len(self.timesteps) - 1
        rescale = None
        if cfg.mean_order == 2:  # the draw's variance matched to the second-order step, for this run's levels
            if self._match is None or self._match[1] != eta:
                first = i if self._match is None else self._match[0]
                sigmas = self.ve_sigmas()[first:]
                match = VarianceMatch(sigmas, transition=cfg.transition, eta=eta, final_output=cfg.final_output)
                self._match = (first, eta, match)
            first, _, match = self._match
            rescale = lambda m: match.scale(i - first, m)  # noqa: E731
        out, mu = gibbs_step(
            moments,
            y,
            sigma,
            None if last else self._levels[i + 1][1],
            transition=cfg.transition,
            eta=eta,
            final_output=cfg.final_output,
            clip_range=self._clip_range(),
            generator=generator,
            multistep=self._multistep,
            rescale=rescale,
        )
        prev = out if last else self.from_ve(out, i + 1)
        self._step_index = i + 1
        prev, mu = prev.to(sample.dtype), mu.to(sample.dtype)
        if not return_dict:
            return prev, mu
        return MMGibbsSchedulerOutput(prev_sample=prev, pred_original_sample=mu)


# Once mmgibbs is imported, the loader module name resolves to this module, so that diffusers also accepts a
# scheduler passed explicitly, e.g. DiffusionPipeline.from_pretrained(path, scheduler=MMGibbsScheduler...(...)),
# where it imports the library model_index.json names to check the passed object's type.
sys.modules.setdefault(LOADER_MODULE, sys.modules[__name__])
