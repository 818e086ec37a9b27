"""Covariance estimators: one small class per structure of Sigma in q(x | y) = N(mu(y), Sigma(y)).

An estimator has one job: the moments N(mu, Sigma) of a denoiser y -> mu(y) at (y, sigma),
:meth:`CovarianceEstimator.moments`, with what they cost (``num_forward`` / ``num_backward`` / ``num_jvp`` /
``num_product_passes`` of the :class:`~mmgibbs.moments.DenoisingMoments` it returns). It is a frozen dataclass of
its settings, checked when it is built, before any model call; estimators that need no derivatives also give the
moments from one denoiser output, :meth:`DerivativeFree.from_mean` (the drop-in scheduler's ``step`` has only the
model output). The Gibbs kernel (:func:`mmgibbs.gibbs.sample`) takes an estimator; the scheduler's ``covariance``
names one (:data:`ESTIMATORS`, a table name -> class), and :func:`make_estimator` builds it with the settings its
class takes:

    none             Mean               Sigma = 0
    isotropic        Isotropic          Sigma = v I per sample, Analytic-DPM's v
    isotropic_batch  IsotropicBatch     the same, ||eps_hat||^2 averaged over the batch
    diagonal         Diagonal           sigma^2 diag(J), Hutchinson
    exact_diagonal   ExactDiagonal      sigma^2 diag(J), d products
    full             Full               sigma^2 sym(J), PSD, d products
    projection       Projection         one draw sigma J z
    calibrated       Calibrated         a calibrated table's low rank + diagonal, per cluster of mu
    calibrated_stationary CalibratedStationary  a calibrated stationary covariance (Fourier basis), per cluster
    calibrated_jacobian CalibratedJacobian  the table corrected on its leading span by Jacobian products

Tweedie's second-order formula Sigma(y) = sigma^2 d mu / d y and the variance bounds are in ``mmgibbs.moments``; the
Jacobian products, the Hutchinson estimate and the other pieces the estimators call live there too.

A new estimator is one class: subclass :class:`CovarianceEstimator` (or :class:`DerivativeFree` /
:class:`JacobianEstimator`), give it a ``name`` and ``moments``, and pass an instance to :func:`mmgibbs.gibbs.sample`;
adding it to :data:`ESTIMATORS` makes it a ``covariance=`` choice of the scheduler and the pipeline.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from diffusers.utils.torch_utils import randn_tensor

from .checks import is_real
from .moments import (
    DEFAULT_MAX_FULL_DIM,
    JACOBIAN_MODES,
    CalibratedLevel,
    Denoiser,
    DenoisingMoments,
    Generator,
    LowRankCovariance,
    _clamp_variance,
    _flat_product,
    _Linearisation,
    _linearise,
    _per_sample,
    full_covariance,
    hutchinson_diagonal,
    isotropic_variance,
    jacobian_correction,
    jacobian_matrix,
)
from .noise import _check_choice

Variance = torch.Tensor | LowRankCovariance | None


class CovarianceTableLike(Protocol):
    """What the calibrated estimators read: ``mmgibbs.calibration.CovarianceTable`` (one level per sigma)."""

    def level(self, sigma: float) -> CalibratedLevel: ...


# ---------------------------------------------------------------------------------------------- inputs and settings
def noise_levels(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``sigma`` (a float or a per-sample tensor) checked, positive and finite, and as one level per sample (N,) in
    ``like``'s dtype and device. A CPU tensor or a float is checked where it lives: no device sync."""
    if isinstance(sigma, torch.Tensor):
        valid = sigma.device.type != "cpu" or bool(torch.all(torch.isfinite(sigma) & (sigma > 0)))
    else:
        valid = math.isfinite(sigma) and sigma > 0
    if not valid:
        raise ValueError(f"`sigma` must be positive and finite; got {sigma}.")
    if isinstance(sigma, torch.Tensor):
        return sigma.to(like.device, like.dtype).expand(like.shape[0]).clone()
    return torch.full((like.shape[0],), float(sigma), dtype=like.dtype, device=like.device)  # a fill, not a copy


def prepare(y: torch.Tensor, sigma: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """The estimators' working inputs: y detached and contiguous (forward-mode AD refuses expanded inputs), in
    float64 if it is float64, else float32, whatever dtype the model runs in; sigma as :func:`noise_levels`."""
    y = y.detach().to(torch.float64 if y.dtype == torch.float64 else torch.float32).contiguous()
    return y, noise_levels(sigma, y)


def _positive_integer(value: Any, argument: str, covariance: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{argument}` must be a positive integer; got {value!r}.")


def _jacobian_mode(value: Any, argument: str, covariance: str) -> None:
    _check_choice(argument, value, JACOBIAN_MODES)


def _variance_bound(value: Any, argument: str, covariance: str) -> None:
    if value is not None and not (is_real(value) and value > 0):
        raise ValueError(f"`{argument}` must be positive (a number, or None for no bound); got {value!r}.")


def _covariance_table(value: Any, argument: str, covariance: str) -> None:
    if value is None:
        raise ValueError(
            f"covariance={covariance!r} reads a calibrated covariance table (`{argument}`): calibrate one first "
            "(`MomentMatchingGibbsPipeline.calibrate_covariance`, or `mmgibbs.calibration.calibrate_covariance` "
            "and `MMGibbsScheduler.set_covariance_table`)."
        )
    if not callable(getattr(value, "level", None)):
        raise TypeError(
            f"`{argument}` must be a calibrated covariance table (`mmgibbs.calibration.CovarianceTable`); got "
            f"{type(value).__name__}."
        )


#: every estimator setting, by the name it has everywhere (estimator field, scheduler config, pipeline argument),
#: and its check: ``check(value, argument, covariance)``
SETTING_CHECKS: dict[str, Callable[[Any, str, str], None]] = {
    "num_probes": _positive_integer,
    "jacobian": _jacobian_mode,
    "product_batch": _positive_integer,
    "variance_bound": _variance_bound,
    "max_full_dim": _positive_integer,
    "covariance_table": _covariance_table,
}


# ---------------------------------------------------------------------------------------------- the estimators
@dataclass(frozen=True, kw_only=True)
class CovarianceEstimator(ABC):
    """One estimator of the moments q(x | y) = N(mu(y), Sigma(y)) of a denoiser (module docstring).

    ``name`` is the ``covariance=`` name (it becomes ``DenoisingMoments.covariance``); ``needs_jacobian``: the
    moments need the denoiser itself (its Jacobian), not only one output mu(y). The dataclass fields are the
    settings; those named in :data:`SETTING_CHECKS` are checked when the estimator is built.
    """

    name: ClassVar[str]
    needs_jacobian: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name in SETTING_CHECKS:
                SETTING_CHECKS[f.name](getattr(self, f.name), f.name, self.name)

    def check_levels(self, sigmas: Sequence[float]) -> None:  # noqa: B027 (a hook: most estimators serve any level)
        """Refuse, before the first model call, noise levels this estimator cannot serve (default: none)."""

    def check_sample(self, sigmas: Sequence[float], sample: torch.Tensor) -> None:  # noqa: B027 (a hook, as above)
        """Refuse, before the first model call, a first ``sample`` whose size this estimator cannot serve at
        ``sigmas`` (default: any)."""

    def check_run(self, sigmas: Sequence[float], sample: torch.Tensor) -> None:
        """Both hooks for a run over ``sigmas`` from ``sample``, before its first model call (the kernel's
        ``sample`` and the drop-in's first ``scale_model_input``)."""
        self.check_levels(sigmas)
        self.check_sample(sigmas, sample)

    @abstractmethod
    def moments(
        self, denoiser: Denoiser, y: torch.Tensor, sigma: torch.Tensor | float, generator: Generator = None
    ) -> DenoisingMoments:
        """N(mu, Sigma) of ``denoiser`` (y -> mu(y)) at the noisy points ``y`` (N, ...), noise level ``sigma`` (a
        float or a per-sample tensor (N,)); random draws (probes, a structured draw) from ``generator``."""


@dataclass(frozen=True, kw_only=True)
class DerivativeFree(CovarianceEstimator):
    """An estimator that needs one denoiser output mu(y) only: :meth:`from_mean` is its job, :meth:`moments` adds
    the one model call (under ``torch.no_grad``)."""

    def moments(
        self, denoiser: Denoiser, y: torch.Tensor, sigma: torch.Tensor | float, generator: Generator = None
    ) -> DenoisingMoments:
        y, _ = prepare(y, sigma)
        with torch.no_grad():
            return self.from_mean(y, denoiser(y).to(y.dtype), sigma)

    @abstractmethod
    def from_mean(self, y: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor | float) -> DenoisingMoments:
        """The moments from one denoiser output ``mu`` = mu(y) at ``sigma`` (a float, or a tensor (N,))."""


@dataclass(frozen=True, kw_only=True)
class Mean(DerivativeFree):
    """``none``: Sigma = 0, x = mu (the mean-only chain)."""

    name: ClassVar[str] = "none"

    def from_mean(self, y: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor | float) -> DenoisingMoments:
        return DenoisingMoments(mu=mu, sigma=noise_levels(sigma, y), covariance=self.name)


@dataclass(frozen=True, kw_only=True)
class Isotropic(DerivativeFree):
    """``isotropic``: Sigma = v I with one scalar per sample, v = sigma^2 (1 - ||eps_hat||^2 / d),
    eps_hat = (y - mu) / sigma (Analytic-DPM's estimate, Bao et al. 2022, from the sample itself, so samples stay
    independent of each other), clamped to [0, min(sigma^2, ``variance_bound``)]
    (:func:`mmgibbs.moments.isotropic_variance`); no extra model calls."""

    name: ClassVar[str] = "isotropic"
    #: average ||eps_hat||^2 over the batch (``isotropic_batch``)
    pooled: ClassVar[bool] = False
    variance_bound: float | None = None

    def from_mean(self, y: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor | float) -> DenoisingMoments:
        sigma = noise_levels(sigma, y)
        variance = isotropic_variance(y, mu, sigma, self.variance_bound, pooled=self.pooled)
        return DenoisingMoments(mu=mu, sigma=sigma, covariance=self.name, variance=variance)


@dataclass(frozen=True, kw_only=True)
class IsotropicBatch(Isotropic):
    """``isotropic_batch``: :class:`Isotropic` with ||eps_hat||^2 averaged over the batch (Analytic-DPM's own form):
    better in very low dimension, but every sample then depends on the others in its batch."""

    name: ClassVar[str] = "isotropic_batch"
    pooled: ClassVar[bool] = True


class _ReadsTable:
    """The calibrated estimators' table: every level of a schedule looked up before the first model call, and of
    the kind the estimator reads (``level_kind``: ``mmgibbs.calibration.LEVEL_KINDS``)."""

    covariance_table: CovarianceTableLike
    name: ClassVar[str]
    level_kind: ClassVar[str] = "low_rank"

    def check_sample(self, sigmas: Sequence[float], sample: torch.Tensor) -> None:
        for sigma in sigmas:  # a level of another model or sample size fails here, naming both sizes
            self.covariance_table.level(float(sigma)).check_dimension(sample)

    def check_levels(self, sigmas: Sequence[float]) -> None:
        for sigma in sigmas:  # a missing level fails here, naming its sigma
            kind = getattr(self.covariance_table.level(float(sigma)), "kind", self.level_kind)
            if kind != self.level_kind:
                readers = [n for n, cls in ESTIMATORS.items() if getattr(cls, "level_kind", None) == kind]
                raise ValueError(
                    f"covariance={self.name!r} reads {self.level_kind.replace('_', ' ')} levels; the covariance "
                    f"table holds {kind.replace('_', ' ')} levels: sample it with covariance={readers[0]!r}, or "
                    f"calibrate for {self.name!r} (`calibrate_covariance(..., covariance={self.name!r})`)."
                )


@dataclass(frozen=True, kw_only=True)
class Calibrated(_ReadsTable, DerivativeFree):
    """``calibrated``: the expected posterior covariance, estimated once per model and level and cached
    (``mmgibbs.calibration``): by the law of total covariance, with eps_hat = (y - mu(y)) / sigma,

        E_y[Cov[x | y]] = sigma^2 (I - E[eps_hat eps_hat^T]) = E[(x - mu(y)) (x - mu(y))^T],

    the second form from clean samples x and y = x + sigma * eps (PSD by construction and far less noisy in the
    small directions). It is stored low rank + diagonal per cluster of mu(y), i.e. E[Cov[x | y] | cluster of mu(y)]:
    per-sample structure at zero extra calls, no coupling of the samples of a batch
    (:func:`mmgibbs.moments.low_rank_plus_diagonal`, :class:`mmgibbs.moments.LowRankCovariance`)."""

    name: ClassVar[str] = "calibrated"
    covariance_table: CovarianceTableLike | None = None
    #: each sample's condition group in a conditional table (``CovarianceTable.group_of``; -1 or None: assigned
    #: by mu over every cluster, as the drop-in scheduler does); set by the pipeline per call
    condition_groups: torch.Tensor | None = None

    def from_mean(self, y: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor | float) -> DenoisingMoments:
        variance = self.covariance_table.level(sigma).covariance(mu, self.condition_groups)
        return DenoisingMoments(mu=mu, sigma=noise_levels(sigma, y), covariance=self.name, variance=variance)


@dataclass(frozen=True, kw_only=True)
class CalibratedStationary(Calibrated):
    """``calibrated_stationary``: :class:`Calibrated` with a stationary (translation-invariant, periodic) covariance
    per cluster of mu, diagonal in the 2-D Fourier basis per channel pair: Sigma_c = F^H blockdiag_k(S_c(k)) F, one
    C x C spectral density per frequency (``mmgibbs.calibration.StationaryLevel``,
    :class:`mmgibbs.moments.StationaryCovariance`). For latents (C, H, W) at any size: K (d + H (W / 2 + 1) C^2)
    numbers per level instead of K d (rank + 1), and one FFT pair per draw. Image-shaped samples only."""

    name: ClassVar[str] = "calibrated_stationary"
    level_kind: ClassVar[str] = "stationary"


@dataclass(frozen=True, kw_only=True)
class JacobianEstimator(CovarianceEstimator):
    """An estimator from products with the denoiser's Jacobian J = d mu / d y: by ``jacobian`` ``"reverse"`` (one
    forward kept, one backward per product), ``"forward"`` (one JVP per product), ``"finite_difference"`` (one more
    forward per product, step 1e-2 sigma) or ``"auto"`` (reverse, else forward, else finite differences, warning
    why). ``product_batch`` k > 1 computes k products per pass where an estimator has several, vectorised with
    ``torch.func.vmap`` (reverse and forward mode; the same draws, so the same results to float rounding).
    Measured on CPU (README, "Speed"): in forward mode the k JVPs share one primal forward (K = 4: 1.9x / 1.4x
    faster on the digits / an SD-shaped UNet); in reverse mode it is slower and holds far more memory
    (``torch.func.vjp`` keeps ~2.4x what autograd keeps, and every product in the batch adds the backward's working
    memory): leave it at 1 there. Gradients are enabled locally, so this works inside ``torch.no_grad()``."""

    needs_jacobian: ClassVar[bool] = True
    jacobian: str = "auto"
    product_batch: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.product_batch > 1 and self.jacobian == "finite_difference":
            raise ValueError(
                "`product_batch` > 1 batches reverse- or forward-mode products; finite differences take one forward "
                "per product (jacobian='finite_difference' needs product_batch=1)."
            )

    def linearise(self, denoiser: Denoiser, y: torch.Tensor, sigma: torch.Tensor, batched: bool) -> _Linearisation:
        """mu(y) and Jacobian products at ``y`` in the estimator's mode (``batched``: several products per pass)."""
        return _linearise(denoiser, y, self.jacobian, sigma, batched=batched and self.product_batch > 1)

    def result(
        self, lin: _Linearisation, sigma: torch.Tensor, variance: Variance, draw: torch.Tensor | None = None
    ) -> DenoisingMoments:
        """The moments with mu and the counts of ``lin`` (read after the products: forward mode's first JVP gives
        mu)."""
        mu = lin.mean().to(lin.y.dtype)
        return DenoisingMoments(
            mu=mu,
            sigma=sigma,
            covariance=self.name,
            variance=variance,
            draw=draw,
            num_forward=lin.num_forward,
            num_backward=lin.num_backward,
            num_jvp=lin.num_jvp,
            num_product_passes=lin.num_product_passes,
        )


@dataclass(frozen=True, kw_only=True)
class Diagonal(JacobianEstimator):
    """``diagonal``: Sigma = sigma^2 diag(J), Hutchinson: diag J ~ mean_k v_k * (J v_k) (forward mode) or
    v_k * (J^T v_k) (reverse mode) over ``num_probes`` Rademacher probes v_k (:func:`mmgibbs.moments.
    hutchinson_diagonal`), clamped to [0, ``variance_bound``]."""

    name: ClassVar[str] = "diagonal"
    num_probes: int = 1
    variance_bound: float | None = None

    def moments(
        self, denoiser: Denoiser, y: torch.Tensor, sigma: torch.Tensor | float, generator: Generator = None
    ) -> DenoisingMoments:
        y, sigma = prepare(y, sigma)
        lin = self.linearise(denoiser, y, sigma, batched=self.num_probes > 1)
        products = lin.products if lin.batched else None
        diag = hutchinson_diagonal(lin.product, y, self.num_probes, generator, products, self.product_batch)
        return self.result(lin, sigma, _clamp_variance(_per_sample(sigma**2, y) * diag, self.variance_bound))


@dataclass(frozen=True, kw_only=True)
class _WholeJacobian(JacobianEstimator):
    """Sigma from the whole per-sample Jacobian J (N, d, d), d products with basis vectors
    (:func:`mmgibbs.moments.jacobian_matrix`); refused above ``max_full_dim``."""

    max_full_dim: int = DEFAULT_MAX_FULL_DIM
    variance_bound: float | None = None

    def moments(
        self, denoiser: Denoiser, y: torch.Tensor, sigma: torch.Tensor | float, generator: Generator = None
    ) -> DenoisingMoments:
        y, sigma = prepare(y, sigma)
        d = y[0].numel()
        if d > self.max_full_dim:
            raise ValueError(
                f"covariance={self.name!r} needs d = {d} Jacobian products per level and an (N, d, d) matrix; d "
                f"exceeds max_full_dim={self.max_full_dim}. Use covariance='diagonal' (Hutchinson, `num_probes` "
                "products) or 'isotropic', or raise `max_full_dim`."
            )
        lin = self.linearise(denoiser, y, sigma, batched=True)
        products = lin.products if lin.batched else None
        jac = jacobian_matrix(lin.product, y, lin.transpose, products, self.product_batch)
        return self.result(lin, sigma, self.from_jacobian(jac, y, sigma))

    @abstractmethod
    def from_jacobian(self, jac: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Sigma, in the estimator's form, from J (N, d, d) at y and the per-sample sigma (N,)."""


@dataclass(frozen=True, kw_only=True)
class ExactDiagonal(_WholeJacobian):
    """``exact_diagonal``: Sigma = sigma^2 diag(J) from the whole Jacobian (d products), clamped to
    [0, ``variance_bound``]."""

    name: ClassVar[str] = "exact_diagonal"

    def from_jacobian(self, jac: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        diag = torch.diagonal(jac, dim1=-2, dim2=-1).reshape(y.shape)
        return _clamp_variance(_per_sample(sigma**2, y) * diag, self.variance_bound)


@dataclass(frozen=True, kw_only=True)
class Full(_WholeJacobian):
    """``full``: Sigma = sigma^2 (J + J^T) / 2 with its spectrum clamped at 0 and every per-dimension variance at
    most ``variance_bound``, the correlations kept (:func:`mmgibbs.moments.full_covariance`; d products)."""

    name: ClassVar[str] = "full"

    def from_jacobian(self, jac: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return full_covariance(jac, sigma, self.variance_bound)


@dataclass(frozen=True, kw_only=True)
class Projection(JacobianEstimator):
    """``projection``: one structured draw x = mu + sigma J z, z ~ N(0, I) (one product). Its covariance is
    Sigma J: exact where J is a projection (a data manifold at small noise: J ~ 1 along it, ~ 0 across), smaller
    than Sigma in between. Unlike isotropic or diagonal noise it stays on the data manifold, at the cost of one
    Jacobian product per draw (one forward by finite differences). The moments hold the draw, not Sigma."""

    name: ClassVar[str] = "projection"

    def moments(
        self, denoiser: Denoiser, y: torch.Tensor, sigma: torch.Tensor | float, generator: Generator = None
    ) -> DenoisingMoments:
        y, sigma = prepare(y, sigma)
        lin = self.linearise(denoiser, y, sigma, batched=False)  # one product: nothing to batch
        z = randn_tensor(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        return self.result(lin, sigma, None, draw=_per_sample(sigma, y) * lin.product(z))


@dataclass(frozen=True, kw_only=True)
class CalibratedJacobian(_ReadsTable, JacobianEstimator):
    """``calibrated_jacobian``: :class:`Calibrated` corrected per sample with ``num_probes`` Jacobian products on the
    span of the table's leading directions for the sample's cluster (:func:`mmgibbs.moments.jacobian_correction`):
    there Sigma is the sample's own sigma^2 sym(J), clamped to [0, ``variance_bound``]; elsewhere the table's."""

    name: ClassVar[str] = "calibrated_jacobian"
    num_probes: int = 1
    variance_bound: float | None = None
    covariance_table: CovarianceTableLike | None = None
    condition_groups: torch.Tensor | None = None  # as :class:`Calibrated`'s

    def moments(
        self, denoiser: Denoiser, y: torch.Tensor, sigma: torch.Tensor | float, generator: Generator = None
    ) -> DenoisingMoments:
        level = self.covariance_table.level(sigma)  # the kernel passes a float: the table's key
        y, sigma = prepare(y, sigma)
        # the products go one at a time; ``product_batch`` > 1 only changes how reverse mode keeps its forward
        lin = self.linearise(denoiser, y, sigma, batched=True)
        prior = level.covariance(lin.mean().to(y.dtype), self.condition_groups)  # directions: the cluster of mu
        directions = prior.factor[..., : self.num_probes]
        product = _flat_product(lin.product, y)
        return self.result(lin, sigma, jacobian_correction(prior, product, directions, sigma, self.variance_bound))


#: the covariance estimators by ``covariance=`` name, in the order the docs list them
ESTIMATORS: dict[str, type[CovarianceEstimator]] = {
    cls.name: cls
    for cls in (
        Mean,
        Isotropic,
        IsotropicBatch,
        Diagonal,
        ExactDiagonal,
        Full,
        Projection,
        Calibrated,
        CalibratedStationary,
        CalibratedJacobian,
    )
}
COVARIANCES = tuple(ESTIMATORS)
#: covariances that need the denoiser's Jacobian (not a drop-in scheduler's model output)
JACOBIAN_COVARIANCES = tuple(name for name, cls in ESTIMATORS.items() if cls.needs_jacobian)
#: covariances read from a calibrated table (``mmgibbs.calibration.CovarianceTable``)
CALIBRATED_COVARIANCES = tuple(name for name, cls in ESTIMATORS.items() if issubclass(cls, _ReadsTable))


def estimator_class(covariance: str) -> type[CovarianceEstimator]:
    """The estimator class ``covariance`` names (:data:`ESTIMATORS`); a ValueError lists the names."""
    _check_choice("covariance", covariance, COVARIANCES)
    return ESTIMATORS[covariance]


def make_estimator(covariance: str, **settings: Any) -> CovarianceEstimator:
    """The estimator ``covariance`` names, built with the settings its class takes (e.g. ``num_probes`` for
    ``diagonal``, ``covariance_table`` for ``calibrated``); the others are checked (a bad value is an error even
    where it is unused; None means not given) and left out, so one dict of all the settings serves every name.

    ``make_estimator("diagonal", num_probes=4, jacobian="forward", variance_bound=1.0)`` is
    ``Diagonal(num_probes=4, jacobian="forward", variance_bound=1.0)``. A setting that is no estimator's (not in
    :data:`SETTING_CHECKS`) is a TypeError naming it.
    """
    cls = estimator_class(covariance)
    takes = {f.name for f in dataclasses.fields(cls) if f.init}
    check_settings(**{k: v for k, v in settings.items() if k not in takes})
    return cls(**{k: v for k, v in settings.items() if k in takes})


def check_settings(**settings: Any) -> None:
    """Check estimator settings by name (:data:`SETTING_CHECKS`) whatever the covariance, None meaning not given:
    the scheduler's config holds them all, for whichever covariance a call may choose. A name that is no estimator
    setting is a TypeError naming it."""
    unknown = sorted(set(settings) - set(SETTING_CHECKS))
    if unknown:
        raise TypeError(
            f"unknown estimator setting(s) {', '.join(map(repr, unknown))}; the estimator settings are "
            f"{', '.join(SETTING_CHECKS)}."
        )
    for name, value in settings.items():
        if value is not None:
            SETTING_CHECKS[name](value, name, "")


@dataclass(frozen=True)
class FixedLevel:
    """A one-level stand-in for a covariance table: every sigma reads ``calibration`` (the string API's
    ``calibration=`` argument, one ``mmgibbs.calibration.LevelCovariance``)."""

    calibration: CalibratedLevel

    def level(self, sigma: float) -> CalibratedLevel:
        return self.calibration


__all__ = [
    "CALIBRATED_COVARIANCES",
    "COVARIANCES",
    "ESTIMATORS",
    "JACOBIAN_COVARIANCES",
    "SETTING_CHECKS",
    "Calibrated",
    "CalibratedJacobian",
    "CalibratedStationary",
    "CovarianceEstimator",
    "CovarianceTableLike",
    "DerivativeFree",
    "Diagonal",
    "ExactDiagonal",
    "FixedLevel",
    "Full",
    "Isotropic",
    "IsotropicBatch",
    "JacobianEstimator",
    "Mean",
    "Projection",
    "check_settings",
    "estimator_class",
    "make_estimator",
    "noise_levels",
    "prepare",
]
