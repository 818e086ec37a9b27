"""Denoising moments: the Gaussian q(x | y) = N(mu(y), Sigma(y)) with the first two moments of p(x | y).

For y = x + sigma * eps, Tweedie's formula and its second-order form give

    mu(y)    = E[x | y]   = y + sigma^2 grad log p~(y),
    Sigma(y) = Cov[x | y] = sigma^2 d mu / d y = sigma^4 Hess log p~(y) + sigma^2 I,

so a denoiser y -> mu(y) determines both moments; the Jacobian J = d mu / d y is symmetric for an exact
denoiser. The covariance structures are the estimators of ``mmgibbs.covariances``, one class each (``none``,
``isotropic``, ``isotropic_batch``, ``diagonal``, ``exact_diagonal``, ``full``, ``projection``, ``calibrated``,
``calibrated_jacobian``, each with its equations); this module holds what they are made of: the moments
(:class:`DenoisingMoments`, :class:`LowRankCovariance`), the estimates (:func:`isotropic_variance`,
:func:`hutchinson_diagonal`, :func:`jacobian_matrix`, :func:`full_covariance`, :func:`jacobian_correction`, the
calibration's :func:`low_rank_plus_diagonal`), the Jacobian products, and the string-keyed entry points
:func:`denoising_moments` and :func:`moments_from_mean`.

Variance bounds (why, and how): a posterior variance is never negative, so every estimate is clamped at 0.
Data in [-r, r] has per-dimension variance at most r^2 (Popoviciu; Analytic-DPM's Thm. 2 bounds its reverse
variance the same way), and so has every posterior p(x | y) on that range: with ``variance_bound`` = r^2 every
per-dimension variance (isotropic, diagonal, the diagonal of ``full``) is clamped above by it. The scheduler's
default is 1.0, diffusers' image range [-1, 1]; ``None`` removes it. The isotropic scalar estimates the MMSE,
which is at most sigma^2 (the error of the estimator x_hat = y), so it is clamped above by sigma^2 as well.
Without the bound, learned denoisers at high noise give variances far above what any distribution on the data
range can have: at the first of a few levels (sigma ~ 160 for DDPM) one such draw lands the chain far outside it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.autograd.forward_ad as fwAD
from diffusers.utils.torch_utils import randn_tensor
from torch.overrides import TorchFunctionMode

JACOBIAN_MODES = ("auto", "reverse", "forward", "finite_difference")
#: relative step of finite-difference Jacobian products: h = FINITE_DIFFERENCE_STEP * sigma
FINITE_DIFFERENCE_STEP = 1e-2
DEFAULT_MAX_FULL_DIM = 1024

Generator = torch.Generator | list[torch.Generator] | None
Denoiser = Callable[[torch.Tensor], torch.Tensor]


class CalibratedLevel(Protocol):
    """What the ``calibrated`` covariances read: ``mmgibbs.calibration.LevelCovariance``."""

    def covariance(
        self, mu: torch.Tensor, groups: torch.Tensor | None = None
    ) -> LowRankCovariance | StationaryCovariance: ...


@dataclass
class DenoisingMoments:
    """q(x | y) = N(mu, Sigma) at one noise level, for a batch of N points y.

    ``variance`` holds Sigma in the structure's own form: ``None`` (none, projection), shape (N,) (isotropic,
    Sigma = v I), the shape of ``mu`` (diagonal), (N, d, d) (full, symmetric PSD), or a structured covariance
    (:data:`STRUCTURED`: a :class:`LowRankCovariance`, calibrated and calibrated_jacobian; a
    :class:`StationaryCovariance`, calibrated_stationary). ``projection`` instead holds
    its one structured ``draw`` sigma J z, made when the moments were computed. ``num_forward`` / ``num_backward`` /
    ``num_jvp`` count the batched model passes spent on these moments, one per Jacobian product (a backward, a JVP,
    or a finite difference's forward) even when ``product_batch`` > 1 computes k products in one vectorised pass;
    ``num_product_passes`` counts the passes that computed the products (one per product with ``product_batch=1``,
    one per batch of k otherwise).
    """

    mu: torch.Tensor
    sigma: torch.Tensor
    covariance: str
    variance: torch.Tensor | None = None
    draw: torch.Tensor | None = None
    num_forward: int = 1
    num_backward: int = 0
    num_jvp: int = 0
    num_product_passes: int = 0

    def sample(self, generator: Generator = None) -> torch.Tensor:
        """Draw x ~ N(mu, Sigma) (in ``mu``'s dtype, float32 or float64); ``projection``: mu + its draw."""
        if self.covariance == "projection":
            return self.mu + self.draw
        if isinstance(self.variance, STRUCTURED):
            return self.mu + self.variance.sample(generator, self.mu)
        z = randn_tensor(self.mu.shape, generator=generator, device=self.mu.device, dtype=self.mu.dtype)
        return self.mu + self.scale(z)

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Sigma^(1/2) z, for z of ``mu``'s shape."""
        if self.covariance == "projection":
            raise ValueError("covariance='projection' holds one draw, not Sigma: use `sample()`.")
        if self.covariance == "none":
            return torch.zeros_like(z)
        if isinstance(self.variance, STRUCTURED):
            raise ValueError(f"covariance={self.covariance!r} draws a structured covariance: use `sample()`.")
        if self.covariance == "full":
            evals, evecs = torch.linalg.eigh(self.variance)
            root = evecs * evals.clamp(min=0).sqrt().unsqueeze(-2)  # Q diag(sqrt(lambda))
            return torch.einsum("nij,nj->ni", root, z.flatten(1)).reshape(z.shape)
        return _per_sample(self.variance, z).sqrt() * z

    def scaled(self, factor: Callable[[torch.Tensor], torch.Tensor]) -> DenoisingMoments:
        """These moments with the variance v of every direction of Sigma multiplied by ``factor(v)`` (elementwise,
        on a tensor of variances), the directions taken in Sigma's own form: the per-sample scalar (isotropic), every
        entry (diagonal), the eigenvectors (full), the factor's orthogonal columns and the diagonal's entries (low rank
        + diagonal; on a corrected span the core's eigenvectors), each frequency's C x C eigenvectors (stationary),
        and for ``projection`` its draw as one direction of the draw's mean square. ``none`` is returned as it is.
        Used by the second-order chain (:class:`mmgibbs.multistep.VarianceMatch`)."""
        if self.covariance == "none":
            return self
        if self.draw is not None:
            v = self.draw.flatten(1).pow(2).mean(-1)
            return dataclasses.replace(self, draw=self.draw * _per_sample(factor(v).sqrt(), self.draw))
        var = self.variance
        if isinstance(var, LowRankCovariance):
            columns = var.factor.pow(2).sum(-2)  # (N, r): the columns are orthogonal
            scaled = LowRankCovariance(
                var.factor * factor(columns).sqrt().unsqueeze(-2), var.diagonal * factor(var.diagonal)
            )
            if var.basis is not None:
                evals, evecs = torch.linalg.eigh(var.core_root @ var.core_root.transpose(-1, -2))
                evals = evals.clamp(min=0.0)
                scaled.basis, scaled.core_root = var.basis, evecs * (evals * factor(evals)).sqrt().unsqueeze(-2)
            return dataclasses.replace(self, variance=scaled)
        if isinstance(var, StationaryCovariance):  # each frequency's C x C density S = L L^H, by its eigenvectors
            evals, evecs = torch.linalg.eigh(var.root @ var.root.mH)
            evals = evals.clamp(min=0.0)
            root = (evecs * (evals * factor(evals)).sqrt().unsqueeze(-2).to(evecs.dtype)) @ evecs.mH
            return dataclasses.replace(self, variance=StationaryCovariance(root, var.shape))
        if self.covariance == "full":
            evals, evecs = torch.linalg.eigh(var)
            evals = evals.clamp(min=0.0)
            return dataclasses.replace(self, variance=(evecs * (evals * factor(evals)).unsqueeze(-2)) @ evecs.mT)
        return dataclasses.replace(self, variance=var * factor(var))

    def mean_variance(self) -> torch.Tensor:
        """trace(Sigma) / d per sample, shape (N,)."""
        if self.covariance == "none":
            return torch.zeros(self.mu.shape[0], dtype=self.mu.dtype, device=self.mu.device)
        if self.covariance == "projection":  # a one-draw estimate
            return self.draw.flatten(1).pow(2).mean(-1)
        if self.covariance.startswith("isotropic"):
            return self.variance
        if isinstance(self.variance, STRUCTURED):
            return self.variance.mean_variance()
        if self.covariance == "full":
            return torch.diagonal(self.variance, dim1=-2, dim2=-1).mean(-1)
        return self.variance.flatten(1).mean(-1)


@dataclass
class LowRankCovariance:
    """Per-sample low-rank + diagonal covariances over the flattened sample (d entries):

        Sigma = B C B^T + (I - B B^T) (F F^T + diag(D)) (I - B B^T),        C = R R^T,

    with ``factor`` F (N, d, r), ``diagonal`` D (N, d) and, for a per-sample correction on a k-dimensional span
    (:func:`jacobian_correction`), orthonormal ``basis`` B (N, d, k) and ``core_root`` R (N, k, k); without a basis
    Sigma = F F^T + diag(D). Memory is N d (r + k + 1), never d^2.
    """

    factor: torch.Tensor
    diagonal: torch.Tensor
    basis: torch.Tensor | None = None
    core_root: torch.Tensor | None = None

    def scale(self, z_factor: torch.Tensor, z: torch.Tensor, z_core: torch.Tensor | None = None) -> torch.Tensor:
        """Sigma^(1/2)-distributed draw from normals z_factor (N, r), z (N, d) and z_core (N, k): (N, d)."""
        out = torch.einsum("ndr,nr->nd", self.factor, z_factor) + self.diagonal.sqrt() * z
        if self.basis is None:
            return out
        out = out - torch.einsum("ndk,nk->nd", self.basis, torch.einsum("ndk,nd->nk", self.basis, out))
        return out + torch.einsum("ndk,nk->nd", self.basis, torch.einsum("nkj,nj->nk", self.core_root, z_core))

    def sample(self, generator: Generator, like: torch.Tensor) -> torch.Tensor:
        """x - mu ~ N(0, Sigma) with ``like``'s shape; normals drawn in the order z_factor, z, z_core."""
        n = like.shape[0]
        kw = {"generator": generator, "device": like.device, "dtype": like.dtype}
        z_factor = randn_tensor((n, self.factor.shape[-1]), **kw)
        z = randn_tensor((n, self.diagonal.shape[-1]), **kw)
        z_core = randn_tensor((n, self.basis.shape[-1]), **kw) if self.basis is not None else None
        return self.scale(z_factor.to(self.factor.dtype), z.to(self.factor.dtype), z_core).reshape(like.shape)

    def dense(self) -> torch.Tensor:
        """Sigma as (N, d, d) (for tests and small d)."""
        cov = self.factor @ self.factor.transpose(-1, -2) + torch.diag_embed(self.diagonal)
        if self.basis is None:
            return cov
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        proj = eye - self.basis @ self.basis.transpose(-1, -2)
        core = self.core_root @ self.core_root.transpose(-1, -2)
        return proj @ cov @ proj + self.basis @ core @ self.basis.transpose(-1, -2)

    def mean_variance(self) -> torch.Tensor:
        """trace(Sigma) / d per sample, shape (N,)."""
        if self.basis is None:
            return (self.factor.pow(2).sum((-1, -2)) + self.diagonal.sum(-1)) / self.diagonal.shape[-1]
        return torch.diagonal(self.dense(), dim1=-2, dim2=-1).mean(-1)


@dataclass
class StationaryCovariance:
    """Per-sample stationary (translation-invariant, periodic) covariances of image-shaped samples (C, H, W),
    diagonal in the 2-D Fourier basis per channel pair:

        Sigma = F^H blockdiag_k(S(k)) F,   S(k) = L(k) L(k)^H (C x C, Hermitian PSD, one per frequency k),

    F the orthonormal 2-D DFT of every channel. ``root`` (N, H, W // 2 + 1, C, C) holds L(k), the Hermitian square
    root of the spectral density S(k), on the half spectrum of ``torch.fft.rfft2`` (real samples: S(-k) =
    conj(S(k))). A draw is one FFT of white noise, a C x C product per frequency and one inverse FFT:
    x = irfft2(L rfft2(z)); memory N H (W / 2 + 1) C^2, never d^2.
    """

    root: torch.Tensor
    shape: tuple[int, int, int]

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Sigma^(1/2)-distributed (N, C, H, W) from white normals z of that shape (the circulant square root)."""
        _, height, width = self.shape
        spectrum = torch.fft.rfft2(z.reshape(len(z), *self.shape), norm="ortho")
        spectrum = torch.einsum("nhwab,nbhw->nahw", self.root.to(spectrum.dtype), spectrum)
        return torch.fft.irfft2(spectrum, s=(height, width), norm="ortho")

    def sample(self, generator: Generator, like: torch.Tensor) -> torch.Tensor:
        """x - mu ~ N(0, Sigma) with ``like``'s shape and dtype."""
        z = randn_tensor((len(like), *self.shape), generator=generator, device=like.device, dtype=like.dtype)
        return self.scale(z).reshape(like.shape).to(like.dtype)

    def dense(self) -> torch.Tensor:
        """Sigma as (N, d, d) (for tests and small d): A A^T, A the circulant square root applied to the basis."""
        d = math.prod(self.shape)
        real = torch.float64 if self.root.dtype == torch.complex128 else torch.float32
        eye = torch.eye(d, dtype=real, device=self.root.device)
        roots = [StationaryCovariance(r[None].expand(d, *r.shape), self.shape) for r in self.root]
        columns = torch.stack([root.scale(eye).reshape(d, d).T for root in roots])
        return columns @ columns.transpose(-1, -2)

    def mean_variance(self) -> torch.Tensor:
        """trace(Sigma) / d per sample, shape (N,): the spectral densities' traces over the full spectrum."""
        _, _, width = self.shape
        weight = torch.full((self.root.shape[2],), 2.0, dtype=torch.float64, device=self.root.device)
        weight[0] = 1.0
        if width % 2 == 0:
            weight[-1] = 1.0  # the Nyquist column is its own mirror image
        power = self.root.abs().pow(2).sum((-1, -2)).to(torch.float64)  # tr(L L^H) per frequency
        return (power * weight).sum((-1, -2)) / math.prod(self.shape)


#: the covariance structures that draw themselves (``DenoisingMoments.variance``)
STRUCTURED = (LowRankCovariance, StationaryCovariance)


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample (N,) tensor against a batch-first tensor."""
    return value.reshape(value.shape + (1,) * (like.ndim - value.ndim)) if value.ndim < like.ndim else value


def _clamp_variance(variance: torch.Tensor, bound: float | None) -> torch.Tensor:
    return variance.clamp(min=0.0, max=bound) if bound is not None else variance.clamp(min=0.0)


# ---------------------------------------------------------------------------------------------- estimators
def isotropic_variance(
    y: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    variance_bound: float | None = None,
    pooled: bool = False,
) -> torch.Tensor:
    """Analytic-DPM's variance per sample, from v_i = sigma^2 (1 - ||eps_hat_i||^2 / d), eps_hat = (y - mu) / sigma.

    By the law of total covariance E_y[v] = tr E_y[Cov[x | y]] / d (Bao et al. 2022), so v_i is a one-sample
    estimate of the expected posterior variance; it is computed from sample i alone, so no sample's variance depends
    on the rest of the batch (a NaN stays in its sample; batch size 1 works). ``pooled=True`` (``isotropic_batch``)
    averages ||eps_hat||^2 over the batch instead, as Analytic-DPM does, at the price of coupling the samples; it is
    returned clamped to [0, min(sigma^2, bound)] (the MMSE is at most sigma^2, the error of x_hat = y, and at most the
    data variance ``variance_bound``, module docstring).

    The per-sample form is shrunk towards a per-level value that depends on no sample. Its noise is that of
    ||eps_hat||^2 / d, about sigma^2 sqrt(2 / d): negligible for images (d ~ 1e4) but, for d = 64 at sigma = 4, ten
    times the posterior variance itself, so that clamped to [0, bound] it was 0 (a mean-only step) for 44-48% of the
    samples at sigma >= 4 and 9-27% below 1 on the digits DDPM, and the bound for the other half. With a bound b the
    estimate is the posterior mean under a prior centred on v_0 = b sigma^2 / (b + sigma^2), the MMSE of Gaussian data
    of variance b (the largest MMSE of any data of that variance), with spread v_0:

        v_i = w max(v_i_raw, 0) + (1 - w) v_0,    w = v_0^2 / (v_0^2 + 2 sigma^4 / d),

    then clamped to [0, min(sigma^2, b)]. It is never 0, it is the sample's own estimate wherever that is precise
    (w -> 1 as d grows or sigma falls) and v_0 where it is noise (high sigma, small d). Without a bound there is no
    data scale to shrink towards: the per-sample estimate is used as it is, clamped to [0, sigma^2]. Shape (N,).
    """
    eps_sq = ((y - mu) / _per_sample(sigma, y)).flatten(1).pow(2).mean(-1)  # ||eps_hat||^2 / d per sample
    v = sigma**2 * (1.0 - (eps_sq.mean() if pooled else eps_sq))
    if not pooled and variance_bound is not None:
        d = y[0].numel()
        prior = variance_bound * sigma**2 / (variance_bound + sigma**2)
        weight = prior**2 / (prior**2 + 2.0 * sigma**4 / d)
        v = weight * v.clamp(min=0.0) + (1.0 - weight) * prior
    return _clamp_variance(torch.minimum(v, sigma**2), variance_bound)


def rademacher(shape: torch.Size, generator: Generator, like: torch.Tensor) -> torch.Tensor:
    """Rademacher probes (+-1 with probability 1/2), drawn from ``generator`` as the sign of a normal draw."""
    return randn_tensor(shape, generator=generator, device=like.device, dtype=like.dtype).sign()


def hutchinson_diagonal(
    product: Callable[[torch.Tensor], torch.Tensor],
    like: torch.Tensor,
    num_probes: int,
    generator: Generator,
    products: Callable[[torch.Tensor], torch.Tensor] | None = None,
    product_batch: int = 1,
) -> torch.Tensor:
    """diag(J) ~ (1/P) sum_k v_k * (J v_k) for Rademacher v_k; ``product`` is v -> J v or v -> J^T v
    (both have the diagonal of J, so both estimators are unbiased).

    With ``products`` (a stack (k, ...) of vectors -> their k products in one batched pass) the probes go
    ``product_batch`` at a time. They are drawn from ``generator`` one by one in the same order either way, so the
    batched and the sequential estimates are the same up to float rounding (summation order).
    """
    total = torch.zeros_like(like)
    if products is None or product_batch == 1:
        for _ in range(num_probes):
            v = rademacher(like.shape, generator, like)
            total += v * product(v)
        return total / num_probes
    for start in range(0, num_probes, product_batch):
        v = torch.stack(
            [rademacher(like.shape, generator, like) for _ in range(min(product_batch, num_probes - start))]
        )
        total += (v * products(v)).sum(0)
    return total / num_probes


def jacobian_matrix(
    product: Callable[[torch.Tensor], torch.Tensor],
    like: torch.Tensor,
    transpose: bool,
    products: Callable[[torch.Tensor], torch.Tensor] | None = None,
    product_batch: int = 1,
) -> torch.Tensor:
    """The per-sample Jacobian (N, d, d) from d products with basis vectors; ``transpose``: product is J^T v.

    With ``products`` (see :func:`hutchinson_diagonal`) the basis vectors go ``product_batch`` at a time.
    """
    n, d = like.shape[0], like[0].numel()
    cols = []
    if products is None or product_batch == 1:
        for i in range(d):
            e = torch.zeros(n, d, dtype=like.dtype, device=like.device)
            e[:, i] = 1.0
            cols.append(product(e.reshape(like.shape)).reshape(n, d))
    else:
        for start in range(0, d, product_batch):
            k = min(product_batch, d - start)
            e = torch.zeros(k, n, d, dtype=like.dtype, device=like.device)
            e[torch.arange(k), :, torch.arange(start, start + k)] = 1.0  # e[j, :, start + j] = 1
            cols.extend(products(e.reshape(k, *like.shape)).reshape(k, n, d).unbind(0))
    stacked = torch.stack(cols, dim=-1)  # column i = J e_i (or row i of J for J^T e_i)
    return stacked.transpose(-1, -2) if transpose else stacked


def full_covariance(jacobian: torch.Tensor, sigma: torch.Tensor, variance_bound: float | None) -> torch.Tensor:
    """Sigma = sigma^2 (J + J^T) / 2 projected to the PSD cone (eigenvalues clamped at 0), then, with a bound,
    Sigma <- D Sigma D, D = diag(min(1, sqrt(bound / Sigma_jj))): every per-dimension variance at most the bound,
    the correlations kept (clamping the spectrum instead would cut legitimate directions whose variance exceeds the
    per-dimension bound, e.g. a stroke of correlated pixels)."""
    sym = 0.5 * (jacobian + jacobian.transpose(-1, -2)) * (sigma**2).reshape(-1, 1, 1)
    evals, evecs = torch.linalg.eigh(sym)
    cov = (evecs * evals.clamp(min=0.0).unsqueeze(-2)) @ evecs.transpose(-1, -2)
    if variance_bound is None:
        return cov
    scale = (variance_bound / torch.diagonal(cov, dim1=-2, dim2=-1).clamp(min=1e-300)).sqrt().clamp(max=1.0)
    return cov * scale.unsqueeze(-1) * scale.unsqueeze(-2)


def expected_posterior_covariance(y: torch.Tensor, mu: torch.Tensor, sigma: float) -> torch.Tensor:
    """E_y[Cov[x | y]] = sigma^2 (I - E[eps_hat eps_hat^T]), eps_hat = (y - mu(y)) / sigma, from noisy points y ~ p~
    and the denoiser's predictions mu(y) alone (law of total covariance: E[eps eps_hat^T] = E[eps_hat eps_hat^T]).

    Returns the (d, d) matrix, spectrum clamped to [0, sigma^2]. Unbiased, but with N points its error in a
    direction is ~ sigma^2 sqrt(2 / N), far above the small posterior variances (~ lambda << sigma^2) at high
    noise: :func:`low_rank_plus_diagonal` of clean-sample residuals is the estimator the calibration uses.
    """
    eps = ((y - mu) / sigma).flatten(1)
    eye = torch.eye(eps.shape[1], dtype=eps.dtype, device=eps.device)
    evals, evecs = torch.linalg.eigh(eye - eps.T @ eps / len(eps))
    return sigma**2 * (evecs * evals.clamp(0.0, 1.0).unsqueeze(-2)) @ evecs.T


def low_rank_plus_diagonal(
    residuals: torch.Tensor, rank: int, iterations: int = 1, exact_max_dim: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """F F^T + diag(D) ~ M = E[r r^T] from residual rows r = x - mu(x + sigma * eps) (n, d); E[r r^T] is
    E_y[Cov[x | y]] (module docstring).

    F (d, rank) = the top eigenpairs of M - diag(D), then D = diag(M) - diag(F F^T) >= 0, starting from D = 0 and
    repeated ``iterations`` times. The diagonal, i.e. every per-pixel variance, is matched exactly. One iteration
    (the default) is PCA plus the diagonal remainder; more are principal-factor iterations, of which a true low
    rank + diagonal M is a fixed point. On the exact digits mixture (rank 16, 16 clusters, 10 levels) the sampler
    was better with one (excess per-mode KL 3.0 against 3.7 with 8): PCA keeps the leading directions' variance
    whole, which the draw needs more than the off-diagonal fit. Eigenpairs by ``eigh`` of M - diag(D) for
    d <= ``exact_max_dim``, else by subspace iteration on v -> R^T (R v) / n - D v, which never forms a d x d
    matrix. Columns of F come in decreasing variance.
    """
    r = residuals.flatten(1)
    n, d = r.shape
    second = r.pow(2).mean(0)
    rank = min(rank, d, n)
    if rank == 0:
        return r.new_zeros(d, 0), second
    moment = r.T @ r / n if d <= exact_max_dim else None
    diag = torch.zeros_like(second)
    for _ in range(max(iterations, 1)):
        if moment is not None:
            evals, evecs = torch.linalg.eigh(moment - torch.diag(diag))
            evals, evecs = evals[-rank:].flip(-1), evecs[:, -rank:].flip(-1)
        else:
            evals, evecs = _top_eigenpairs(lambda v, dg=diag: r.T @ (r @ v) / n - dg[:, None] * v, d, rank, r)
        factor = evecs * evals.clamp(min=0.0).sqrt()
        diag = (second - factor.pow(2).sum(-1)).clamp(min=0.0)
    return factor, diag


def _top_eigenpairs(
    apply: Callable[[torch.Tensor], torch.Tensor], d: int, rank: int, like: torch.Tensor, power: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``rank`` largest eigenpairs of a symmetric operator on R^d by subspace iteration (Rayleigh-Ritz on
    rank + 8 columns, ``power`` iterations, a fixed start), in decreasing order."""
    q = min(rank + 8, d)
    start = torch.randn(d, q, generator=torch.Generator().manual_seed(0), dtype=like.dtype).to(like.device)
    basis, _ = torch.linalg.qr(apply(start))
    for _ in range(power):
        basis, _ = torch.linalg.qr(apply(basis))
    small = basis.T @ apply(basis)
    evals, evecs = torch.linalg.eigh(0.5 * (small + small.T))
    return evals[-rank:].flip(-1), (basis @ evecs)[:, -rank:].flip(-1)


def compress_low_rank(factor: torch.Tensor, diagonal: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """F F^T + diag(D) with F of more than ``rank`` columns -> the same form with ``rank`` columns: the top singular
    directions of F are kept and the rest moves to the diagonal, so diag(F F^T) + D is unchanged."""
    if factor.shape[-1] <= rank:
        return factor, diagonal
    u, s, _ = torch.linalg.svd(factor, full_matrices=False)
    kept = u[..., :rank] * s[..., None, :rank]
    dropped = (u[..., rank:] * s[..., None, rank:]).pow(2).sum(-1)
    return kept, diagonal + dropped


def jacobian_correction(
    prior: LowRankCovariance,
    product: Callable[[torch.Tensor], torch.Tensor],
    directions: torch.Tensor,
    sigma: torch.Tensor,
    variance_bound: float | None = None,
) -> LowRankCovariance:
    """Correct a prior covariance per sample on a k-dimensional span, from k Jacobian products:

        Q = orth(directions) (N, d, k),   A = sigma^2 sym(Q^T J Q) clamped to [0, bound],
        Sigma = Q A Q^T + (I - Q Q^T) Sigma_prior (I - Q Q^T).

    On span(Q) Sigma is the sample's own posterior covariance sigma^2 J (exact for an exact denoiser); elsewhere the
    prior's. ``product`` is v -> J v or J^T v (J is symmetric for an exact denoiser, so either serves).
    """
    n, d, k = directions.shape
    q, _ = torch.linalg.qr(directions)
    jq = torch.stack([product(q[..., j]) for j in range(k)], dim=-1).reshape(n, d, k)
    core = q.transpose(-1, -2) @ jq
    core = 0.5 * (core + core.transpose(-1, -2)) * (sigma**2).reshape(-1, 1, 1)
    evals, evecs = torch.linalg.eigh(core)
    evals = _clamp_variance(evals, variance_bound)
    root = evecs * evals.sqrt().unsqueeze(-2)
    return LowRankCovariance(prior.factor, prior.diagonal, q, root)


# ---------------------------------------------------------------------------------------------- Jacobian products
class NotDifferentiableError(RuntimeError):
    """The network output does not carry the derivative the chosen Jacobian mode needs."""


#: the Jacobian mode of the denoiser call in progress (read by :func:`check_network_output`)
_DERIVATIVE: contextvars.ContextVar[str | None] = contextvars.ContextVar("mmgibbs_derivative", default=None)


@contextlib.contextmanager
def _derivative(mode: str) -> Iterator[None]:
    token = _DERIVATIVE.set(mode)
    try:
        yield
    finally:
        _DERIVATIVE.reset(token)


def check_network_output(model_input: torch.Tensor, output: torch.Tensor, mode: str | None = None) -> None:
    """Refuse a network output that silently lacks the derivative a Jacobian mode needs.

    Frame-change closures (``MMGibbsScheduler.denoiser``, ``NoiseSchedule.denoiser``) call this with the network's
    input and output. mu = c_skip x_t + c_out F(c_in x_t) still depends on y through the skip term when F does not
    (a network run under ``torch.no_grad``, a detached output, a round trip through numpy), which would give J = c_skip
    alpha I, i.e. Sigma = sigma^2 I, without an error. Finite differences of a half-precision output measure rounding.
    """
    mode = mode or _DERIVATIVE.get()
    if mode == "reverse" and model_input.requires_grad and not output.requires_grad:
        raise NotDifferentiableError(
            "reverse mode: the network output does not depend differentiably on its input (run under torch.no_grad, "
            "detached, or computed outside torch)"
        )
    if mode == "forward" and fwAD.unpack_dual(model_input).tangent is not None:
        if fwAD.unpack_dual(output).tangent is None:
            raise NotDifferentiableError(
                "forward mode: the network output carries no tangent (detached, or computed outside torch)"
            )
    if mode == "finite_difference" and output.dtype in (torch.float16, torch.bfloat16):
        raise NotDifferentiableError(
            f"finite differences: the network outputs {output.dtype}, whose rounding (relative 1e-3 / 8e-3) swamps "
            "the difference of a small step; use jacobian='reverse' or 'forward', or run the model in float32"
        )


class _ContiguousGroupNorm(TorchFunctionMode):
    """GroupNorm's forward-mode rule views its tangent, which fails for non-contiguous inputs (diffusers' attention
    blocks transpose before normalising): hand it a contiguous input, within this mode only."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.nn.functional.group_norm:
            args = (args[0].contiguous(), *args[1:])
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _forward_mode_safe() -> Iterator[None]:
    """Forward-mode AD through diffusers models: the math attention backend (the fused SDPA kernels have no JVP rule
    on CPU) and contiguous GroupNorm inputs; both scoped to this block, nothing patched process-wide."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]), _ContiguousGroupNorm():
        yield


class _Linearisation:
    """mu = f(y) and products with J = d f / d y, by reverse mode (one forward kept, one backward per product),
    forward mode (one JVP per product; the first JVP also gives mu) or finite differences (one forward per
    product, J v ~ (f(y + h v) - f(y)) / h with h = ``FINITE_DIFFERENCE_STEP`` * sigma).

    ``batched=True`` also allows :meth:`products`: k products in one pass vectorised over the k vectors
    (``torch.func.vmap``; reverse mode then keeps its forward through ``torch.func.vjp``, as ``torch.autograd.grad``'s
    ``is_grads_batched`` fails on diffusers' convolutions). The counters count what is computed: k products are k
    backward passes / JVPs / forwards whether batched or not; ``num_product_passes`` counts the passes that made them
    (one per product one at a time, one per batch otherwise).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        y: torch.Tensor,
        mode: str,
        sigma: torch.Tensor | None = None,
        batched: bool = False,
    ):
        self.denoiser, self.mode, self.batched = denoiser, mode, batched
        self.num_forward = self.num_backward = self.num_jvp = self.num_product_passes = 0
        self.y = y.detach()
        self.mu: torch.Tensor | None = None
        if mode == "reverse" and batched:

            def differentiable(v: torch.Tensor) -> torch.Tensor:
                out = denoiser(v)
                if not out.requires_grad:
                    raise NotDifferentiableError("the denoiser output does not depend differentiably on its input")
                return out

            with torch.enable_grad(), _derivative("reverse"):
                self.mu, self._vjp = torch.func.vjp(differentiable, self.y)
            self.num_forward = 1
        elif mode == "reverse":
            with torch.enable_grad(), _derivative("reverse"):
                self.y = y.detach().requires_grad_(True)
                self.mu_graph = denoiser(self.y)
            if not self.mu_graph.requires_grad:
                raise NotDifferentiableError("the denoiser output does not depend differentiably on its input")
            self.mu = self.mu_graph.detach()
            self.num_forward = 1
        elif mode == "finite_difference":
            self.step = FINITE_DIFFERENCE_STEP * _per_sample(sigma, y)

    @property
    def transpose(self) -> bool:
        return self.mode == "reverse"

    def product(self, v: torch.Tensor) -> torch.Tensor:
        """J^T v (reverse mode) or J v (forward mode, finite differences)."""
        self.num_product_passes += 1
        if self.mode == "reverse":
            self.num_backward += 1
            if self.batched:
                with torch.enable_grad():
                    return self._vjp(v)[0]
            with torch.enable_grad():
                (g,) = torch.autograd.grad(self.mu_graph, self.y, v, retain_graph=True)
            return g
        if self.mode == "finite_difference":
            mu = self.mean()
            self.num_forward += 1
            with torch.no_grad(), _derivative("finite_difference"):
                return (self.denoiser(self.y + self.step * v) - mu) / self.step
        self.num_jvp += 1
        with torch.no_grad(), _forward_mode_safe(), _derivative("forward"), fwAD.dual_level():
            primal, tangent = fwAD.unpack_dual(self.denoiser(fwAD.make_dual(self.y, v.to(self.y.dtype))))
        if tangent is None:
            raise NotDifferentiableError("forward mode: the denoiser output carries no tangent")
        if self.mu is None:
            self.mu = primal
        return tangent

    def products(self, vs: torch.Tensor) -> torch.Tensor:
        """The products of a stack of k vectors ``vs`` (k, *y.shape) in one vectorised pass: (k, *y.shape).

        Reverse mode: one batched backward through the kept forward; forward mode: k JVPs sharing one primal
        forward. Finite differences go one forward per product (``torch.func.vmap`` of diffusers' GroupNorm
        forward fails, and a k-fold batch would not fit a denoiser whose conditioning has the batch's size).
        Only with ``batched=True``.
        """
        if not self.batched:
            raise RuntimeError("products() needs a linearisation built with batched=True")
        if self.mode == "finite_difference":
            return torch.stack([self.product(v) for v in vs])
        k = vs.shape[0]
        self.num_product_passes += 1
        try:
            if self.mode == "reverse":
                self.num_backward += k
                with torch.enable_grad():
                    return torch.func.vmap(self._vjp)(vs)[0]
            self.num_jvp += k
            vs = vs.to(self.y.dtype)

            def jvp(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return torch.func.jvp(self.denoiser, (self.y,), (v,))

            with torch.no_grad(), _forward_mode_safe(), _derivative("forward"):
                primal, tangents = torch.func.vmap(jvp, out_dims=(None, 0))(vs)
        except NotDifferentiableError:
            raise
        except (RuntimeError, NotImplementedError, ValueError) as err:
            raise RuntimeError(
                f"batched Jacobian products ({self.mode} mode, torch.func.vmap) failed for this denoiser: "
                f"{type(err).__name__}: {str(err).splitlines()[0]}; use product_batch=1 (one product per pass)"
            ) from err
        if self.mu is None:
            self.mu = primal
        return tangents

    def mean(self) -> torch.Tensor:
        if self.mu is None:
            with torch.no_grad(), _derivative(self.mode):
                self.mu = self.denoiser(self.y)
            self.num_forward += 1
            if self.mode == "finite_difference":
                check_network_output(self.y, self.mu, self.mode)  # a denoiser returning half precision itself
        return self.mu


def _linearise(
    denoiser: Denoiser, y: torch.Tensor, mode: str, sigma: torch.Tensor, batched: bool = False
) -> _Linearisation:
    """Pick the Jacobian mode; ``auto`` tries reverse mode, then forward mode, then finite differences (with a
    warning naming why), and names every failure if none works. ``batched``: see :class:`_Linearisation`."""
    if mode != "auto":
        lin = _Linearisation(denoiser, y, mode, sigma, batched)
        lin.mean() if mode == "finite_difference" else None  # refuses a half-precision network here
        return lin
    failures = []
    for candidate in ("reverse", "forward", "finite_difference"):
        try:
            lin = _Linearisation(denoiser, y, candidate, sigma, batched)
            if candidate == "forward":
                lin.product(torch.zeros_like(y))  # fails here if forward mode cannot run (and gives mu)
            elif candidate == "finite_difference":
                lin.mean()
        except (RuntimeError, NotImplementedError) as err:
            if not failures and not isinstance(err, NotDifferentiableError):
                with torch.no_grad():
                    denoiser(y)  # a failing model (not a failing derivative) raises its own error here
            failures.append(f"{candidate}: {type(err).__name__}: {str(err).splitlines()[0]}")
            continue
        if failures:
            warnings.warn(
                f"jacobian='auto' uses {candidate} Jacobian products because " + "; ".join(failures), stacklevel=4
            )
        return lin
    raise RuntimeError(
        "Cannot differentiate the denoiser for a Jacobian covariance: " + "; ".join(failures) + ". Use covariance="
        "'none' or 'isotropic', which need no derivatives."
    )


def _flat_product(product: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor) -> Callable:
    """A Jacobian product over flattened (N, d) vectors for a model on ``like``'s shape."""
    return lambda v: product(v.reshape(like.shape).contiguous()).reshape(like.shape[0], -1)


# ---------------------------------------------------------------------------------------------- entry points
def moments_from_mean(
    y: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    covariance: str,
    variance_bound: float | None = None,
    calibration: CalibratedLevel | None = None,
) -> DenoisingMoments:
    """The moments that need no derivatives (``none``, ``isotropic``, ``isotropic_batch``, ``calibrated``) from one
    denoiser output mu(y); ``calibrated`` reads the level's covariance from ``calibration``
    (``LevelCovariance.covariance(mu)``). The estimator's own :meth:`~mmgibbs.covariances.DerivativeFree.from_mean`.
    """
    from .covariances import FixedLevel, estimator_class, make_estimator  # it builds on this module

    if estimator_class(covariance).needs_jacobian:
        raise ValueError(f"covariance={covariance!r} needs the denoiser's Jacobian, not only mu(y).")
    table = None if calibration is None else FixedLevel(calibration)
    return make_estimator(covariance, variance_bound=variance_bound, covariance_table=table).from_mean(y, mu, sigma)


def denoising_moments(
    denoiser: Denoiser,
    y: torch.Tensor,
    sigma: torch.Tensor | float,
    covariance: str = "isotropic",
    num_probes: int = 1,
    generator: Generator = None,
    jacobian: str = "auto",
    variance_bound: float | None = None,
    max_full_dim: int = DEFAULT_MAX_FULL_DIM,
    calibration: CalibratedLevel | None = None,
    product_batch: int = 1,
) -> DenoisingMoments:
    """The Gaussian q(x | y) = N(mu(y), Sigma(y)) of a denoiser ``y -> mu(y)`` at noise level ``sigma``: the
    moments of the estimator ``covariance`` names (``mmgibbs.covariances``), built with these settings.

    Args:
        denoiser: maps a batch y (N, ...) to mu(y) = E[x | y] (e.g. :meth:`NoiseSchedule.denoiser`).
        y: the noisy points, y = x + sigma * eps, batch first; computed in float64 if ``y`` is float64, else
            float32, whatever dtype the model runs in.
        sigma: the noise level, a float or a per-sample tensor (N,).
        covariance: one of ``"none"``, ``"isotropic"``, ``"isotropic_batch"``, ``"diagonal"``, ``"exact_diagonal"``,
            ``"full"``, ``"projection"``, ``"calibrated"``, ``"calibrated_jacobian"``.
        num_probes: Rademacher probes of the Hutchinson estimate (``diagonal``); Jacobian products of the
            per-sample correction (``calibrated_jacobian``).
        generator: the torch generator(s) the probes (and the ``projection`` draw) are drawn from.
        jacobian: ``"reverse"`` (one forward kept, one backward per probe), ``"forward"`` (one JVP per probe),
            ``"finite_difference"`` (one more forward per probe, step 1e-2 sigma), or ``"auto"`` (reverse, else
            forward).
        variance_bound: optional upper bound on every per-dimension variance (see the module docstring).
        max_full_dim: ``full`` and ``exact_diagonal`` refuse dimensions above this (d products, (N, d, d)).
        calibration: this level's calibrated covariance (``mmgibbs.calibration.LevelCovariance``) for the
            ``calibrated`` covariances.
        product_batch: Jacobian products per model pass. 1 (default): one backward pass / JVP / forward per product.
            k > 1: ``diagonal``'s probes and the basis vectors of ``full`` / ``exact_diagonal`` go k at a time
            through one pass vectorised with ``torch.func.vmap`` (see :class:`mmgibbs.covariances.JacobianEstimator`
            for when that pays).

    Equivalent to ``make_estimator(covariance, ...).moments(denoiser, y, sigma, generator)``; the settings are
    checked before the model is called. Gradients are enabled locally, so this works inside ``torch.no_grad()``.
    """
    from .covariances import FixedLevel, make_estimator  # it builds on this module

    estimator = make_estimator(
        covariance,
        num_probes=num_probes,
        jacobian=jacobian,
        product_batch=product_batch,
        variance_bound=variance_bound,
        max_full_dim=max_full_dim,
        covariance_table=None if calibration is None else FixedLevel(calibration),
    )
    return estimator.moments(denoiser, y, sigma, generator)


def __getattr__(name: str) -> tuple[str, ...]:
    """The covariance names, which live with their estimators (``mmgibbs.covariances``), also under this module."""
    if name in ("COVARIANCES", "JACOBIAN_COVARIANCES", "CALIBRATED_COVARIANCES"):
        from . import covariances

        return getattr(covariances, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
