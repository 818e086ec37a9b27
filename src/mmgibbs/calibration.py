"""Calibrated posterior covariances: estimated once per model and noise level, cached, used at zero extra calls.

At a level sigma (y = x + sigma * eps) the law of total covariance gives the expected posterior covariance

    E_y[Cov[x | y]] = sigma^2 (I - E[eps_hat eps_hat^T]) = E[(x - mu(y)) (x - mu(y))^T],

where mu(y) = E[x | y] is the model's denoiser and eps_hat = (y - mu(y)) / sigma. The right-hand form needs clean
samples x (the model's own samples, or data) and one model call per sample and level; it is PSD by construction
and, unlike the eps_hat form, accurate in the directions whose posterior variance is far below sigma^2.

One matrix per level ignores that the posterior differs between samples (between the modes of the data, most of
all at low noise). The table therefore keeps one covariance per cluster of the denoised prediction:

    Sigma_c = E[(x - mu(y)) (x - mu(y))^T | mu(y) in cluster c],   c = nearest centroid of mu(y) (k-means),

the best predictor of Cov[x | y] that is a function of the cluster of mu(y), shrunk towards the pooled one with
weight n_c / (n_c + shrinkage) (n_c calibration samples in the cluster). Each Sigma_c is stored low rank + diagonal
(``F F^T + diag(D)``, :func:`mmgibbs.moments.low_rank_plus_diagonal`), so a table costs levels x clusters x d x
(rank + 1) numbers and scales to latents with d ~ 1e4 - 1e5.

Conditional models. For a class- or text-conditional (and guided) denoiser mu(y, c), the table is fitted to the
denoiser as it is sampled, guidance included, on clean samples of that conditioning, and keeps one group of
clusters per condition c (a class, a prompt with its negative prompt; a cluster of conditions when there are more
than ``num_conditions``):

    Sigma_{c,k} = E[(x - mu(y, c)) (x - mu(y, c))^T | condition c, mu(y, c) in cluster k of c],

each group fitted as its own table would be (k-means of its mu, shrinkage towards the group's pooled matrix). A
sample of condition c reads the nearest centroid of its mu among c's clusters; a sample whose condition was not
calibrated (or the drop-in scheduler, which sees no condition) reads the nearest over all clusters. The guidance
settings are part of the denoiser: a table is fitted for one guidance scale (``settings["guidance"]``).

At sampling time a sample's covariance depends on its own mu(y) only: no coupling between the samples of a batch,
batch size 1 works, a NaN stays in its sample, and the variances are those of the model's own residuals at that
level (bounded by the data's variance), so a handful of levels cannot blow up. Calibration cost (reported
apart): ``num_samples`` model calls per calibrated level, plus whatever produced the clean samples.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from .checks import check_calibration, check_number, check_samples
from .moments import LowRankCovariance, StationaryCovariance, compress_low_rank, low_rank_plus_diagonal

#: ``(y, step index) -> mu(y)`` in the variance-exploding frame (as ``mmgibbs.gibbs.LevelDenoiser``)
LevelDenoiser = Callable[[torch.Tensor, int], torch.Tensor]
TABLE_FILE = "covariance_table.safetensors"
#: the rank of a table's factors when none is given (fewer where the dimension or the samples allow fewer)
DEFAULT_RANK = 16
#: two levels are the same when their sigmas agree to this relative tolerance
SIGMA_RTOL = 1e-6
#: a condition key matches a calibrated condition group within the group's radius plus this share of its norm
CONDITION_RTOL = 1e-4


def kmeans(
    points: torch.Tensor, num_clusters: int, generator: torch.Generator | None = None, iterations: int = 25
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means (k-means++ seeding from ``generator``, then Lloyd iterations) of the rows of ``points`` (n, d).

    Returns ``(centroids (C, d), assignment (n,))`` with C = min(num_clusters, n).
    """
    n = points.shape[0]
    c = min(num_clusters, n)
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [points[first]]
    dist = (points - points[first]).pow(2).sum(-1)
    for _ in range(1, c):
        probs = dist / dist.sum() if float(dist.sum()) > 0 else torch.full_like(dist, 1.0 / n)
        pick = int(torch.multinomial(probs.float().cpu(), 1, generator=generator))
        centroids.append(points[pick])
        dist = torch.minimum(dist, (points - points[pick]).pow(2).sum(-1))
    centroids = torch.stack(centroids)
    assignment = torch.cdist(points, centroids).argmin(-1)
    for _ in range(iterations):
        counts = torch.bincount(assignment, minlength=c).to(points.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        new = torch.cdist(points, centroids).argmin(-1)
        if torch.equal(new, assignment):
            break
        assignment = new
    return centroids, assignment


class _Clustered:
    """What every kind of calibrated level shares: ``centroids`` (C, d) of mu, one covariance per cluster, and
    ``groups`` (C,), the condition group of each cluster (None: one group, an unconditional table)."""

    sigma: float
    centroids: torch.Tensor
    groups: torch.Tensor | None

    def assign(self, mu: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        """The cluster of each sample's own prediction mu (N, ...): the nearest centroid (a NaN row gets cluster
        0), among the clusters of the sample's condition group where ``groups`` (N,) gives one (-1: none)."""
        if self.centroids.shape[0] == 1:
            return torch.zeros(mu.shape[0], dtype=torch.long, device=mu.device)
        work = torch.promote_types(self.centroids.dtype, torch.float32)  # a float16 table: distances in float32
        centroids = self.centroids.to(mu.device, work)
        dist = torch.cdist(mu.flatten(1).to(work), centroids).nan_to_num(nan=math.inf)
        if groups is not None and self.groups is not None:
            groups = groups.to(dist.device)
            other = (self.groups.to(dist.device)[None, :] != groups[:, None]) & (groups[:, None] >= 0)
            dist = dist.masked_fill(other, math.inf)
        return dist.argmin(-1)

    def check_dimension(self, mu: torch.Tensor) -> None:
        dim = self.centroids.shape[-1]
        if mu[0].numel() != dim:
            raise ValueError(
                f"The calibrated covariance at sigma={self.sigma:.6g} has dimension {dim}, the samples have "
                f"{mu[0].numel()} ({tuple(mu.shape[1:])}): the table was calibrated for another model or sample size "
                "(a latent model: another `height` / `width`); calibrate for this one (`calibrate_covariance`) or "
                "pass its own table to `set_covariance_table`."
            )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The level's tensors by name (what ``CovarianceTable.save`` writes)."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """The bytes the level's tensors hold."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


@dataclass
class LevelCovariance(_Clustered):
    """The calibrated covariance of one noise level: per cluster of mu, ``factor`` F_c (C, d, r) (columns in
    decreasing variance) and ``diagonal`` D_c (C, d), Sigma_c = F_c F_c^T + diag(D_c); ``centroids`` (C, d);
    ``groups`` (C,): the condition group of each cluster (None: one group, an unconditional table)."""

    sigma: float
    centroids: torch.Tensor
    factor: torch.Tensor
    diagonal: torch.Tensor
    groups: torch.Tensor | None = None
    kind: ClassVar[str] = "low_rank"

    def covariance(self, mu: torch.Tensor, groups: torch.Tensor | None = None) -> LowRankCovariance:
        """The per-sample :class:`LowRankCovariance` of a batch with predictions mu (and condition groups, see
        :meth:`assign`), in mu's dtype and device."""
        self.check_dimension(mu)
        cluster = self.assign(mu, groups).to(self.factor.device)  # the clusters' rows, then cast: not the table
        factor = self.factor[cluster].to(mu.device, mu.dtype)
        return LowRankCovariance(factor, self.diagonal[cluster].to(mu.device, mu.dtype))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LevelCovariance:
        tensors = (self.centroids, self.factor, self.diagonal)
        groups = None if self.groups is None else self.groups.to(device=device)
        return LevelCovariance(self.sigma, *(t.to(device=device, dtype=dtype) for t in tensors), groups)

    def dense(self) -> torch.Tensor:
        """Sigma_c as (C, d, d) (for tests and small d)."""
        return self.factor @ self.factor.transpose(-1, -2) + torch.diag_embed(self.diagonal)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"centroids": self.centroids, "factor": self.factor, "diagonal": self.diagonal}
        return out if self.groups is None else {**out, "groups": self.groups}

    @classmethod
    def from_tensors(cls, sigma: float, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> LevelCovariance:
        return cls(sigma, tensors["centroids"], tensors["factor"], tensors["diagonal"], tensors.get("groups"))

    @staticmethod
    def concat(sigma: float, levels: Sequence[LevelCovariance]) -> LevelCovariance:
        """One level from the levels of the condition groups, in order (factors zero-padded to one width)."""
        width = max(lv.factor.shape[-1] for lv in levels)
        return LevelCovariance(
            sigma,
            torch.cat([lv.centroids for lv in levels]),
            torch.cat([torch.nn.functional.pad(lv.factor, (0, width - lv.factor.shape[-1])) for lv in levels]),
            torch.cat([lv.diagonal for lv in levels]),
            _group_index(levels),
        )


@dataclass
class StationaryLevel(_Clustered):
    """A calibrated level whose covariance per cluster of mu is stationary (translation-invariant, periodic) over
    image-shaped samples (C, H, W): diagonal in the 2-D Fourier basis per channel pair, one Hermitian PSD C x C
    spectral density S_c(k) per frequency (:class:`mmgibbs.moments.StationaryCovariance`). ``root`` (K, H, W // 2
    + 1, C, C) complex: L_c(k) = S_c(k)^(1/2) on the half spectrum, per cluster; ``centroids`` (K, d), ``groups``
    as :class:`LevelCovariance`'s. It costs K (d + H (W / 2 + 1) C^2) numbers per level (complex ones count twice)
    and one FFT pair per draw, whatever the image size."""

    sigma: float
    centroids: torch.Tensor
    root: torch.Tensor
    groups: torch.Tensor | None = None
    kind: ClassVar[str] = "stationary"

    @property
    def shape(self) -> tuple[int, int, int]:
        channels, height = self.root.shape[-1], self.root.shape[1]
        return channels, height, self.centroids.shape[-1] // (channels * height)

    def covariance(self, mu: torch.Tensor, groups: torch.Tensor | None = None) -> StationaryCovariance:
        """The per-sample :class:`StationaryCovariance` of a batch with predictions mu (N, C, H, W)."""
        self.check_dimension(mu)
        cluster = self.assign(mu, groups).to(self.root.device)
        complex_dtype = torch.complex128 if mu.dtype == torch.float64 else torch.complex64
        return StationaryCovariance(self.root[cluster].to(mu.device, complex_dtype), self.shape)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> StationaryLevel:
        complex_dtype = None if dtype is None else {torch.float64: torch.complex128}.get(dtype, torch.complex64)
        groups = None if self.groups is None else self.groups.to(device=device)
        return StationaryLevel(
            self.sigma, self.centroids.to(device, dtype), self.root.to(device, complex_dtype), groups
        )

    def dense(self) -> torch.Tensor:
        """Sigma_c as (K, d, d) (for tests and small d)."""
        return StationaryCovariance(self.root, self.shape).dense()

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"centroids": self.centroids, "root": torch.view_as_real(self.root)}
        return out if self.groups is None else {**out, "groups": self.groups}

    @classmethod
    def from_tensors(cls, sigma: float, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> StationaryLevel:
        return cls(sigma, tensors["centroids"], torch.view_as_complex(tensors["root"]), tensors.get("groups"))

    @staticmethod
    def concat(sigma: float, levels: Sequence[StationaryLevel]) -> StationaryLevel:
        return StationaryLevel(
            sigma,
            torch.cat([lv.centroids for lv in levels]),
            torch.cat([lv.root for lv in levels]),
            _group_index(levels),
        )


#: the kinds of calibrated level by ``kind`` (what a table file records per level)
LEVEL_KINDS: dict[str, type[LevelCovariance] | type[StationaryLevel]] = {
    cls.kind: cls for cls in (LevelCovariance, StationaryLevel)
}
Level = LevelCovariance | StationaryLevel


def _group_index(levels: Sequence[_Clustered]) -> torch.Tensor:
    """Which condition group (the position in ``levels``) each cluster of the concatenated level is of."""
    return torch.cat([torch.full((len(lv.centroids),), g, dtype=torch.long) for g, lv in enumerate(levels)])


def _clusters(
    mu: torch.Tensor, num_clusters: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids and assignment of mu's rows (n, d): k-means, or one cluster at the mean."""
    if num_clusters <= 1:
        return mu.mean(0, keepdim=True), torch.zeros(len(mu), dtype=torch.long, device=mu.device)
    return kmeans(mu, num_clusters, generator)


def hermitian_sqrt(matrices: torch.Tensor) -> torch.Tensor:
    """The PSD square root of Hermitian matrices (..., C, C), negative eigenvalues clamped to 0."""
    evals, evecs = torch.linalg.eigh(matrices)
    return (evecs * evals.clamp(min=0).sqrt().unsqueeze(-2).to(evecs.dtype)) @ evecs.mH


def spectral_moment(residuals: torch.Tensor) -> torch.Tensor:
    """sum_n R_n(k) R_n(k)^H per frequency k of residuals (n, C, H, W), R = rfft2(r, norm="ortho"): (H, W // 2 + 1,
    C, C) complex, the sufficient statistic of the stationary covariance (E[R R^H] is its spectral density)."""
    spectrum = torch.fft.rfft2(residuals, norm="ortho")
    return torch.einsum("nahw,nbhw->hwab", spectrum, spectrum.conj())


def calibrate_stationary_level(
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: float,
    num_clusters: int = 16,
    shrinkage: float = 64.0,
    generator: torch.Generator | None = None,
    groups: torch.Tensor | None = None,
) -> StationaryLevel:
    """The :class:`StationaryLevel` at ``sigma`` from clean samples x (n, C, H, W) and mu = mu(x + sigma * eps):
    per k-means cluster c of mu the spectral density S_c(k) = mean over the cluster of R(k) R(k)^H (R the
    orthonormal rfft2 of the residual x - mu), mixed as w_c S_c + (1 - w_c) S_pooled with w_c = n_c / (n_c +
    ``shrinkage``), and its Hermitian square root stored. ``groups``: as :func:`calibrate_level`'s."""
    if x.ndim != 4:
        raise ValueError(
            "covariance='calibrated_stationary' needs image-shaped samples (N, C, H, W); these have shape "
            f"{tuple(x.shape)}. Use covariance='calibrated' (low rank + diagonal) for other shapes (e.g. Flux's "
            "packed latents)."
        )
    if groups is not None:
        rows = [groups == g for g in range(int(groups.max()) + 1)]
        fits = [calibrate_stationary_level(x[r], mu[r], sigma, num_clusters, shrinkage, generator) for r in rows]
        return StationaryLevel.concat(sigma, fits)
    centroids, assignment = _clusters(mu.flatten(1), num_clusters, generator)
    r = x - mu
    moments = [spectral_moment(r[assignment == c]) for c in range(len(centroids))]
    counts = torch.bincount(assignment, minlength=len(centroids)).tolist()
    return StationaryLevel(sigma, centroids, stationary_roots(torch.stack(moments), counts, shrinkage))


def stationary_roots(moments: torch.Tensor, counts: Sequence[int], shrinkage: float) -> torch.Tensor:
    """Per cluster, from its summed spectral moment (C, H, W', c, c) and sample count n_c: the Hermitian square root
    of w_c S_c + (1 - w_c) S_pooled, S_c = moment / n_c (0 below 2 samples), S_pooled = the summed moments over
    all samples, w_c = n_c / (n_c + ``shrinkage``)."""
    pooled = moments.sum(0) / sum(counts)
    roots = []
    for moment, count in zip(moments, counts, strict=True):
        weight = count / (count + shrinkage)
        own = moment / count if count >= 2 else torch.zeros_like(pooled)
        roots.append(hermitian_sqrt(weight * own + (1.0 - weight) * pooled))
    return torch.stack(roots)


def calibrate_level(
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: float,
    num_clusters: int = 16,
    rank: int = 16,
    shrinkage: float = 64.0,
    generator: torch.Generator | None = None,
    factor_iterations: int = 1,
    groups: torch.Tensor | None = None,
) -> LevelCovariance:
    """The :class:`LevelCovariance` at ``sigma`` from clean samples x (n, ...) and mu = mu(x + sigma * eps).

    Residuals r = x - mu; pooled F_p F_p^T + diag(D_p) ~ E[r r^T]; per k-means cluster c of mu the same from the
    cluster's residuals, mixed as w_c Sigma_c + (1 - w_c) Sigma_pooled with w_c = n_c / (n_c + ``shrinkage``) and
    brought back to ``rank`` columns (:func:`mmgibbs.moments.compress_low_rank`, diagonal kept exact).
    ``factor_iterations``: of :func:`mmgibbs.moments.low_rank_plus_diagonal` (1: PCA + diagonal remainder).
    ``groups`` (n,): the condition group 0 .. G-1 of each sample; every group is fitted as above on its own samples
    (its clusters shrunk towards its own pooled matrix) and the level keeps which group each cluster is of.
    """
    if groups is not None:
        rows = [groups == g for g in range(int(groups.max()) + 1)]
        fits = [
            calibrate_level(x[r], mu[r], sigma, num_clusters, rank, shrinkage, generator, factor_iterations)
            for r in rows
        ]
        return LevelCovariance.concat(sigma, fits)
    r, m = (x - mu).flatten(1), mu.flatten(1)
    pooled_factor, pooled_diag = low_rank_plus_diagonal(r, rank, factor_iterations)
    if num_clusters <= 1:
        centroids = m.mean(0, keepdim=True)
        return LevelCovariance(sigma, centroids, pooled_factor[None], pooled_diag[None])
    centroids, assignment = kmeans(m, num_clusters, generator)
    fits = []
    for c in range(centroids.shape[0]):
        rc = r[assignment == c]
        fits.append((low_rank_plus_diagonal(rc, rank, factor_iterations) if len(rc) >= 2 else None, len(rc)))
    factor, diagonal = shrink_clusters((pooled_factor, pooled_diag), fits, shrinkage, rank)
    return LevelCovariance(sigma, centroids, factor, diagonal)


def shrink_clusters(
    pooled: tuple[torch.Tensor, torch.Tensor],
    fits: Sequence[tuple[tuple[torch.Tensor, torch.Tensor] | None, int]],
    shrinkage: float,
    rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every cluster's low rank + diagonal fit (``(F_c, D_c)``, None for fewer than 2 samples, and its sample count
    n_c) mixed with the pooled one, w_c Sigma_c + (1 - w_c) Sigma_pooled, w_c = n_c / (n_c + ``shrinkage``), and
    brought back to ``rank`` columns (:func:`mmgibbs.moments.compress_low_rank`, the diagonal kept exact); returns
    the factors (C, d, r) (zero-padded to one width, columns by decreasing variance) and diagonals (C, d)."""
    pooled_factor, pooled_diag = pooled
    factors, diagonals = [], []
    for fit, count in fits:
        weight = count / (count + shrinkage)
        fc, dc = (
            fit if fit is not None else (pooled_factor.new_zeros(pooled_factor.shape), torch.zeros_like(pooled_diag))
        )
        mixed = torch.cat([math.sqrt(weight) * fc, math.sqrt(1.0 - weight) * pooled_factor], dim=-1)
        f, d = compress_low_rank(mixed, weight * dc + (1.0 - weight) * pooled_diag, rank)
        factors.append(f)
        diagonals.append(d)
    width = max(f.shape[-1] for f in factors)  # clusters with fewer samples than `rank` have fewer columns
    factor = torch.stack([torch.nn.functional.pad(f, (0, width - f.shape[-1])) for f in factors])  # zeros: no variance
    order = factor.pow(2).sum(-2).argsort(-1, descending=True)  # columns by decreasing variance
    factor = torch.gather(factor, -1, order.unsqueeze(-2).expand_as(factor))
    return factor, torch.stack(diagonals)


@dataclass
class CovarianceTable:
    """Calibrated covariances by noise level (VE sigma), with what they cost.

    ``num_samples`` clean samples, ``num_forward`` batched model passes and ``sample_forwards`` single-sample model
    evaluations were spent (not counting how the clean samples were made). ``settings`` records the calibration's
    arguments and sources (``settings["guidance"]``: the guidance the denoiser was calibrated with, for conditional
    models). ``conditions`` (G, k): the key of each condition group of the levels' clusters (a class id, flattened
    prompt embeddings: ``mmgibbs.families.base.condition_key``), ``condition_radii`` (G,) how far the keys of its
    calibration rows lay from it (0 for one condition per group); None for an unconditional table.
    """

    levels: list[LevelCovariance] = field(default_factory=list)
    num_samples: int = 0
    num_forward: int = 0
    sample_forwards: int = 0
    settings: dict = field(default_factory=dict)
    conditions: torch.Tensor | None = None
    condition_radii: torch.Tensor | None = None

    def group_of(self, keys: torch.Tensor | None) -> torch.Tensor | None:
        """The condition group of each sample from its condition key (N, k): the nearest group key, if within the
        group's radius (plus :data:`CONDITION_RTOL` of its norm); -1 (every cluster) for a condition the table was
        not calibrated for. None for an unconditional table or no keys."""
        if self.conditions is None or keys is None:
            return None
        if keys.shape[-1] != self.conditions.shape[-1]:
            raise ValueError(
                f"The covariance table's condition keys have width {self.conditions.shape[-1]}, this call's "
                f"{keys.shape[-1]}: the table was calibrated for another model's conditioning (another text encoder "
                "or family); calibrate this pipeline (`calibrate_covariance`) or pass its own table."
            )
        dist = torch.cdist(keys.to(self.conditions), self.conditions)
        nearest = dist.argmin(-1)
        reach = self.condition_radii + CONDITION_RTOL * (1.0 + self.conditions.norm(dim=-1))
        inside = dist.gather(-1, nearest[:, None])[:, 0] <= reach[nearest]
        return torch.where(inside, nearest, torch.full_like(nearest, -1))

    @property
    def structure(self) -> str:
        """The kind of its levels (``LevelCovariance.kind``, ``StationaryLevel.kind``)."""
        return self.settings.get("structure", LevelCovariance.kind)

    @property
    def nbytes(self) -> int:
        """The bytes the table's tensors hold (every level, and the condition keys)."""
        keys = 0 if self.conditions is None else 2 * self.conditions.element_size() * self.conditions.numel()
        return sum(lv.nbytes for lv in self.levels) + keys

    def same_conditions(self, other: CovarianceTable) -> bool:
        """Whether both tables were calibrated for the same conditions, guidance and structure (so their levels can
        merge)."""
        if self.structure != other.structure or self.settings.get("guidance") != other.settings.get("guidance"):
            return False
        if self.conditions is None or other.conditions is None:
            return self.conditions is None and other.conditions is None
        return self.conditions.shape == other.conditions.shape and torch.equal(self.conditions, other.conditions)

    @property
    def sigmas(self) -> list[float]:
        return [lv.sigma for lv in self.levels]

    def find(self, sigma: float) -> LevelCovariance | None:
        for lv in self.levels:
            if math.isclose(lv.sigma, sigma, rel_tol=SIGMA_RTOL):
                return lv
        return None

    def level(self, sigma: float) -> LevelCovariance:
        """The calibrated covariance of level ``sigma``; a ValueError names the missing level."""
        found = self.find(float(sigma))
        if found is None:
            raise ValueError(
                f"No calibrated covariance for sigma={float(sigma):.6g} (calibrated: {len(self.levels)} levels). "
                "Calibrate for this schedule first, e.g. `pipe.calibrate_covariance(num_inference_steps=...)` with "
                "the same number of steps and timestep spacing you sample with (or the same custom `timesteps`; a "
                "flow model with dynamic shifting: at the image size you sample, which shifts its levels)."
            )
        return found

    def merge(self, other: CovarianceTable) -> CovarianceTable:
        """Both tables' levels (this table's where both have one) and summed costs (``other``'s only if one of its
        levels is kept: a table replaced level for level adds no cost), with this table's settings; both must be
        calibrated for the same conditions and guidance (:meth:`same_conditions`)."""
        if not self.same_conditions(other):
            raise ValueError(
                "Cannot merge covariance tables calibrated for different conditions, guidance or structures "
                f"({self.settings.get('guidance')} and {other.settings.get('guidance')}): a table serves the "
                "conditioning it was calibrated with."
            )
        kept = [lv for lv in other.levels if self.find(lv.sigma) is None]
        levels = sorted([*self.levels, *kept], key=lambda lv: -lv.sigma)
        samples, forwards, sample_forwards = (
            (other.num_samples, other.num_forward, other.sample_forwards) if kept else (0, 0, 0)
        )
        return CovarianceTable(
            levels,
            max(self.num_samples, samples),
            self.num_forward + forwards,
            self.sample_forwards + sample_forwards,
            dict(self.settings),  # this table's fit (the other's settings, e.g. streaming, do not carry over)
            self.conditions,
            self.condition_radii,
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> CovarianceTable:
        levels = [lv.to(device, dtype) for lv in self.levels]
        return CovarianceTable(
            levels,
            self.num_samples,
            self.num_forward,
            self.sample_forwards,
            dict(self.settings),
            self.conditions,
            self.condition_radii,
        )

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write the table as one safetensors file (tensors per level; sigmas and costs in the metadata)."""
        from safetensors.torch import save_file

        tensors = {}
        for i, lv in enumerate(self.levels):
            for name, tensor in lv.tensors().items():
                tensors[f"{i}.{name}"] = tensor.contiguous().cpu()
        if self.conditions is not None:
            tensors["conditions"] = self.conditions.contiguous().cpu()
            tensors["condition_radii"] = self.condition_radii.contiguous().cpu()
        meta = {
            "sigmas": json.dumps([repr(s) for s in self.sigmas]),
            "num_samples": str(self.num_samples),
            "num_forward": str(self.num_forward),
            "sample_forwards": str(self.sample_forwards),
            "settings": json.dumps(self.settings),
            "kinds": json.dumps([lv.kind for lv in self.levels]),
        }
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> CovarianceTable:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            sigmas = [float(s) for s in json.loads(meta["sigmas"])]
            names = set(f.keys())

            def optional(name: str) -> torch.Tensor | None:
                return f.get_tensor(name) if name in names else None

            kinds = json.loads(meta.get("kinds", json.dumps([LevelCovariance.kind] * len(sigmas))))
            levels = []
            for i, (sigma, kind) in enumerate(zip(sigmas, kinds, strict=True)):
                prefix = f"{i}."
                tensors = {k[len(prefix) :]: f.get_tensor(k) for k in names if k.startswith(prefix)}
                levels.append(LEVEL_KINDS[kind].from_tensors(sigma, tensors, meta))
            conditions, radii = optional("conditions"), optional("condition_radii")
        return cls(
            levels,
            int(meta["num_samples"]),
            int(meta["num_forward"]),
            int(meta["sample_forwards"]),
            json.loads(meta["settings"]),
            conditions,
            radii,
        )


def condition_groups(
    keys: torch.Tensor, num_conditions: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Condition groups of calibration rows from their condition keys (n, k): one group per distinct key when there
    are at most ``num_conditions``, else ``num_conditions`` k-means clusters of the keys (prompt clusters).

    Returns ``(group of each row (n,), group keys (G, k), radii (G,))``, the radius being the largest distance of
    a row's key from its group's key (0 for one key per group)."""
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    if len(unique) <= num_conditions:
        return inverse, unique, torch.zeros(len(unique), dtype=keys.dtype)
    centroids, groups = kmeans(keys, num_conditions, generator)
    used = torch.unique(groups)  # k-means may leave a centroid without rows: drop it, renumber the rest
    renumber = torch.full((len(centroids),), -1, dtype=torch.long)
    renumber[used] = torch.arange(len(used))
    groups, centroids = renumber[groups], centroids[used]
    distance = (keys - centroids[groups]).norm(dim=-1)
    radii = torch.zeros(len(centroids), dtype=keys.dtype).scatter_reduce(0, groups, distance, "amax")
    return groups, centroids, radii


def calibrate_covariance(
    denoiser: LevelDenoiser | Sequence[LevelDenoiser],
    sigmas: Sequence[float],
    samples: torch.Tensor,
    *,
    num_clusters: int = 16,
    rank: int | None = None,
    shrinkage: float = 64.0,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    skip: CovarianceTable | None = None,
    factor_iterations: int = 1,
    conditions: torch.Tensor | None = None,
    num_conditions: int = 16,
    structure: str = "low_rank",
    progress: Callable[[Iterable[int]], Iterable[int]] = iter,
) -> CovarianceTable:
    """Calibrate the covariance of every distinct level of a schedule from clean ``samples`` (n, ...).

    Args:
        denoiser: ``(y, i) -> mu(y)`` at step i of the schedule (``MMGibbsScheduler.denoiser``), in the VE frame;
            for a conditional model, a sequence of them, one per batch of ``batch_size`` samples (the denoiser with
            that batch's conditioning).
        sigmas: the schedule's VE noise levels, one per step (``MMGibbsScheduler.ve_sigmas()``); repeated levels
            (Gibbs sweeps) are calibrated once.
        samples: clean samples x: the model's own (e.g. from a long sampler run) or data.
        num_clusters, rank, shrinkage: the table's structure (:func:`calibrate_level`); ``rank`` in [1, d] for
            samples of dimension d, default 16 (fewer where d or the samples allow fewer).
        batch_size: model batch (default: all samples at once).
        generator: the generator of the calibration noise eps and of the k-means seeding.
        dtype: the table's storage dtype (default: float64 for float64 samples, else float32).
        skip: levels this table already holds are not calibrated again.
        factor_iterations: of the low rank + diagonal fit (:func:`mmgibbs.moments.low_rank_plus_diagonal`).
        conditions: each sample's condition key (n, k) (``mmgibbs.families.base.condition_key``), for a
            conditional model: the table keeps a group of clusters per condition (:func:`condition_groups`, at most
            ``num_conditions`` groups; the module docstring).
        structure: the kind of the levels, ``"low_rank"`` (:class:`LevelCovariance`, read by
            ``covariance="calibrated"``) or ``"stationary"`` (:class:`StationaryLevel`, image-shaped samples only,
            read by ``covariance="calibrated_stationary"``; ``rank`` and ``factor_iterations`` do not apply).

    Per level: y = x + sigma * eps, mu = denoiser(y, i), then :func:`calibrate_level`. Costs ``len(samples)`` model
    evaluations per distinct level, recorded in the returned table. Every argument is checked before the first
    model call (:func:`mmgibbs.checks.check_calibration`): ``samples`` a finite floating-point tensor (n, ...) with
    n >= ``num_clusters``, ``rank`` in [1, d], ... A rank above a cluster's sample count gives that cluster fewer
    nonzero columns (zero columns pad the table's factors to one width).
    """
    if structure not in LEVEL_KINDS:
        raise ValueError(f"`structure` must be one of {', '.join(map(repr, LEVEL_KINDS))}; got {structure!r}.")
    per_batch = not callable(denoiser)
    if per_batch and not (isinstance(denoiser, Sequence) and all(callable(d) for d in denoiser)):
        raise TypeError(
            "`denoiser` must be callable as denoiser(y, step), or a sequence of such denoisers (one per batch); "
            f"got {type(denoiser).__name__}."
        )
    check_samples(samples, "samples")
    if structure == StationaryLevel.kind and samples.ndim != 4:
        raise ValueError(
            "covariance='calibrated_stationary' needs image-shaped samples (N, C, H, W); these have shape "
            f"{tuple(samples.shape)}. Use covariance='calibrated' (low rank + diagonal) for other shapes (e.g. "
            "Flux's packed latents)."
        )
    if isinstance(sigmas, (str, bytes)) or not isinstance(sigmas, Sequence) or len(sigmas) == 0:
        raise ValueError(f"`sigmas` must be a non-empty sequence of noise levels; got {sigmas!r}.")
    for i, sigma in enumerate(sigmas):
        check_number(sigma, f"sigmas[{i}]", low=0.0, low_open=True)
    check_calibration(
        len(samples),
        samples[0].numel(),
        num_clusters=num_clusters,
        rank=rank,
        shrinkage=shrinkage,
        batch_size=batch_size,
        generator=generator,
        factor_iterations=factor_iterations,
    )
    rank = DEFAULT_RANK if rank is None else rank  # calibrate_level keeps at most what d and the samples allow
    x = samples.detach()
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(work)
    n = x.shape[0]
    batch = batch_size or n
    if per_batch and len(denoiser) != math.ceil(n / batch):
        raise ValueError(
            f"`denoiser` holds {len(denoiser)} denoisers; {n} samples in batches of {batch} need "
            f"{math.ceil(n / batch)}, one per batch."
        )
    groups = keys = radii = None
    if conditions is not None:
        check_number(num_conditions, "num_conditions", integer=True, low=1)
        if not isinstance(conditions, torch.Tensor) or conditions.ndim != 2 or len(conditions) != n:
            raise ValueError(
                f"`conditions` must be a tensor of one condition key per sample ({n}, k); got "
                f"{tuple(conditions.shape) if isinstance(conditions, torch.Tensor) else type(conditions).__name__}."
            )
        groups, keys, radii = condition_groups(conditions.to("cpu", torch.float64), num_conditions, generator)
    table = CovarianceTable(
        num_samples=n,
        settings={
            "num_clusters": num_clusters,
            "rank": rank,
            "shrinkage": shrinkage,
            "factor_iterations": factor_iterations,
            **({} if structure == LevelCovariance.kind else {"structure": structure}),
        },
        conditions=keys,
        condition_radii=radii,
    )
    if keys is not None:
        table.settings["num_conditions"] = num_conditions
    for i in progress(range(len(sigmas))):
        sigma = float(sigmas[i])
        if table.find(sigma) is not None or (skip is not None and skip.find(sigma) is not None):
            continue
        mu = torch.empty_like(x)
        for start in range(0, n, batch):
            chunk = x[start : start + batch]
            eps = torch.randn(chunk.shape, generator=generator, dtype=work).to(chunk.device)
            call = denoiser[start // batch] if per_batch else denoiser
            with torch.no_grad():
                mu[start : start + batch] = call(chunk + sigma * eps, i).to(work)
            table.num_forward += 1
        table.sample_forwards += n
        rows = None if groups is None else groups.to(x.device)
        if structure == StationaryLevel.kind:
            level = calibrate_stationary_level(x, mu, sigma, num_clusters, shrinkage, generator, rows)
        else:
            level = calibrate_level(x, mu, sigma, num_clusters, rank, shrinkage, generator, factor_iterations, rows)
        table.levels.append(level.to(dtype=dtype or work))
    table.levels.sort(key=lambda lv: -lv.sigma)
    return table
