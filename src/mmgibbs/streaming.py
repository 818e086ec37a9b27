"""Streaming and distributed calibration: a covariance table from sufficient statistics, never from all residuals.

``mmgibbs.calibration.calibrate_covariance`` holds every sample's prediction at a level (n x d numbers) to cluster
and fit them. :func:`stream_covariance` gives the same table from statistics whose size does not depend on n, in two
passes over chunks of clean samples (each chunk: its samples, the denoiser with its conditioning, its condition keys):

1. **Clusters, from a fixed subsample**: the first chunks, up to ``cluster_samples`` samples, at every level: their
   predictions mu are gathered (bounded by the subsample) and clustered per condition group (k-means, as the exact
   path clusters all samples); the subsample's condition keys fix the groups.
2. **Statistics, streamed**: every chunk, at every level, its residuals r = x - mu added to its clusters'
   statistics; the chunk is then dropped. Per level and cluster: the count n_c, the diagonal sums sum r^2 and

   * where d is small (``sketch=0``, or d <= :data:`EXACT_MAX_DIM` by default): the exact second moment sum r r^T;
   * else a Nystrom sketch Y = (sum r r^T) Omega with a fixed Gaussian test matrix Omega (d x l): linear in the
     data, so sums over chunks and processes add; the table's top directions come from the stabilised Nystrom
     approximation M ~ Y (Omega^T Y)^+ Y^T (Tropp, Yurtsever, Udell, Cevher 2017, "Fixed-rank approximation of a
     positive-semidefinite matrix from streaming data"), the diagonal from the exact sums.

   The stationary structure keeps sum R(k) R(k)^H per frequency (``mmgibbs.calibration.spectral_moment``), exact.

From the statistics each group and cluster is fitted as in the exact path: PCA + diagonal remainder, shrinkage
towards the group's pooled statistics (their sum), compression to ``rank`` columns.

Distributed: with ``shards`` (:class:`Shards`, e.g. from ``torch.distributed`` as ``accelerate launch`` sets it up),
chunk c is processed by process c mod P; the subsample's predictions are summed across processes (each fills its
own rows), and all statistics are packed into one buffer and summed in one reduction (the condition radii in a
second, a max). The calibration noise of chunk c at level i comes from a generator seeded by (seed, c, i), so
every sample gets the same noise whatever the number of processes: the table is the same up to the order of the
floating-point sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from .calibration import (
    DEFAULT_RANK,
    CovarianceTable,
    LevelCovariance,
    StationaryLevel,
    condition_groups,
    kmeans,
    shrink_clusters,
    spectral_moment,
    stationary_roots,
)
from .checks import check_number

#: ``chunk index -> (clean samples, denoiser (y, level index) -> mu, condition keys or None)``
ChunkSource = Callable[[int], tuple[torch.Tensor, Callable[[torch.Tensor, int], torch.Tensor], torch.Tensor | None]]
#: dimensions up to which the second moments are kept exactly (d x d per cluster and level) by default
EXACT_MAX_DIM = 512
#: the Nystrom sketch's width beyond the rank (l = rank + SKETCH_OVERSAMPLING, at least 2 rank)
SKETCH_OVERSAMPLING = 16


@dataclass(frozen=True)
class Shards:
    """This process's place among ``count`` processes that calibrate together (chunk c is process c mod count's),
    and their reductions (``torch.distributed``, set up by ``accelerate launch`` / ``PartialState``)."""

    index: int = 0
    count: int = 1

    @classmethod
    def from_environment(cls) -> Shards:
        """The processes of an initialised ``torch.distributed`` group (one process otherwise)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def owns(self, chunk: int) -> bool:
        return chunk % self.count == self.index

    def reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``tensor`` summed (or maxed) over the processes, in place (through the GPU where the group's backend is
        NCCL, which reduces CUDA tensors only; the statistics live on the CPU)."""
        if self.count > 1:
            import torch.distributed as dist

            how = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
            if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
                moved = tensor.cuda()
                dist.all_reduce(moved, op=how)
                tensor.copy_(moved)
            else:
                dist.all_reduce(tensor, op=how)
        return tensor

    def same(self, tensor: torch.Tensor) -> torch.Tensor:
        """Process 0's ``tensor`` on every process (the others' zeroed, then summed), e.g. random seeds: processes
        whose own generators differ must still share the noise seeds, the sketch's test matrix and the k-means."""
        if self.count > 1:
            tensor = self.reduce(tensor if self.index == 0 else torch.zeros_like(tensor))
        return tensor


def _seed(base: int, chunk: int, level: int) -> int:
    """The noise seed of one chunk at one level (a fixed mix of the three; the same on every process)."""
    return (base * 1_000_003 + chunk * 9_176_087 + level * 7_919) % (2**63 - 1)


class _Statistics:
    """One level's sufficient statistics over K clusters (see the module docstring), and the fit from them."""

    def __init__(self, structure: str, shape: tuple[int, ...], clusters: int, omega: torch.Tensor | None):
        d = math.prod(shape)
        self.structure, self.shape, self.omega = structure, shape, omega
        self.counts = torch.zeros(clusters, dtype=torch.float64)
        self.squares: torch.Tensor | None = None
        if structure == StationaryLevel.kind:
            channels, height, width = shape
            self.moment = torch.zeros(clusters, height, width // 2 + 1, channels, channels, dtype=torch.complex128)
        else:
            self.squares = torch.zeros(clusters, d, dtype=torch.float64)
            self.moment = torch.zeros(clusters, d, d if omega is None else omega.shape[1], dtype=torch.float64)

    def add(self, residuals: torch.Tensor, cluster: torch.Tensor) -> None:
        """Add the residuals r (n, ...) of samples in clusters ``cluster`` (n,)."""
        r = residuals.to("cpu", torch.float64)
        cluster = cluster.cpu()
        self.counts += torch.bincount(cluster, minlength=len(self.counts)).double()
        for c in torch.unique(cluster).tolist():
            rc = r[cluster == c]
            if self.squares is None:
                self.moment[c] += spectral_moment(rc)
                continue
            flat = rc.flatten(1)
            self.squares[c] += flat.pow(2).sum(0)
            self.moment[c] += flat.T @ (flat if self.omega is None else flat @ self.omega)

    def buffers(self) -> list[torch.Tensor]:
        """Every statistic as a real tensor (views: a reduction in place updates them)."""
        moment = torch.view_as_real(self.moment) if self.moment.is_complex() else self.moment
        return [self.counts, moment, *([] if self.squares is None else [self.squares])]

    def part(self, start: int, stop: int) -> _Statistics:
        """The statistics of clusters [start, stop) (one condition group's)."""
        part = _Statistics.__new__(_Statistics)
        part.structure, part.shape, part.omega = self.structure, self.shape, self.omega
        part.counts, part.moment = self.counts[start:stop], self.moment[start:stop]
        part.squares = None if self.squares is None else self.squares[start:stop]
        return part

    def fit(
        self, sigma: float, centroids: torch.Tensor, rank: int, shrinkage: float
    ) -> LevelCovariance | StationaryLevel:
        """The level of ONE condition group from its clusters' statistics, as the exact path fits it: shrinkage
        towards the group's pooled statistics (their sum)."""
        counts = [int(c) for c in self.counts.round().tolist()]
        if self.squares is None:
            return StationaryLevel(sigma, centroids, stationary_roots(self.moment, counts, shrinkage))
        pooled = self._low_rank(self.moment.sum(0), self.squares.sum(0), sum(counts), rank)
        fits = [
            (self._low_rank(m, q, n, rank) if n >= 2 else None, n)
            for m, q, n in zip(self.moment, self.squares, counts, strict=True)
        ]
        return LevelCovariance(sigma, centroids, *shrink_clusters(pooled, fits, shrinkage, rank))

    def _low_rank(self, moment: torch.Tensor, squares: torch.Tensor, n: int, rank: int) -> tuple[torch.Tensor, ...]:
        """F F^T + diag(D) from one cluster's statistics: F the top eigenpairs of M = sum r r^T / n (exact, or its
        Nystrom approximation from the sketch), D = sum r^2 / n - diag(F F^T) >= 0 (PCA + diagonal remainder)."""
        d = len(squares)
        rank = min(rank, d, n)
        second = squares / n
        if rank == 0:
            return second.new_zeros(d, 0), second
        if self.omega is None:
            evals, evecs = torch.linalg.eigh(moment / n)
            evals, evecs = evals[-rank:].flip(-1), evecs[:, -rank:].flip(-1)
        else:
            evals, evecs = nystrom_eigenpairs(moment / n, self.omega, rank)
        factor = evecs * evals.clamp(min=0.0).sqrt()
        return factor, (second - factor.pow(2).sum(-1)).clamp(min=0.0)


def nystrom_eigenpairs(sketch: torch.Tensor, omega: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``rank`` eigenpairs of the PSD matrix M with sketch Y = M Omega, by the stabilised Nystrom
    approximation (Tropp et al. 2017, Alg. 3): nu = eps sqrt(d) ||Y||, Y_nu = Y + nu Omega, C = chol(Omega^T Y_nu),
    E = Y_nu C^-T, U S = svd(E); eigenvalues max(S^2 - nu, 0), eigenvectors U (decreasing)."""
    nu = torch.finfo(sketch.dtype).eps * math.sqrt(len(sketch)) * float(torch.linalg.matrix_norm(sketch, ord=2))
    nu = max(nu, torch.finfo(sketch.dtype).tiny)
    shifted = sketch + nu * omega
    core = omega.T @ shifted
    chol = torch.linalg.cholesky(0.5 * (core + core.T))
    e = torch.linalg.solve_triangular(chol, shifted.T, upper=False).T
    u, s, _ = torch.linalg.svd(e, full_matrices=False)
    return (s[:rank] ** 2 - nu).clamp(min=0.0), u[:, :rank]


def stream_covariance(
    source: ChunkSource,
    chunk_sizes: Sequence[int],
    sigmas: Sequence[float],
    sample_shape: Sequence[int],
    *,
    key_dim: int | None = None,
    num_clusters: int = 16,
    rank: int | None = None,
    shrinkage: float = 64.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    structure: str = "low_rank",
    num_conditions: int = 16,
    cluster_samples: int = 4096,
    sketch: int | None = None,
    shards: Shards | None = None,
    progress: Callable[[Iterable[int]], Iterable[int]] = iter,
) -> CovarianceTable:
    """A covariance table for the distinct levels ``sigmas`` from chunks of clean samples, with memory independent
    of the number of samples (module docstring).

    Args:
        source: ``chunk index -> (x, denoiser, keys)``: the chunk's clean samples (n_c, *sample_shape), its
            denoiser ``(y, j) -> mu`` at level j of ``sigmas`` (VE frame) and its condition keys (n_c, key_dim) or
            None; called once per chunk and only for this process's chunks.
        chunk_sizes: the samples in each chunk, in order (every process passes the same).
        sigmas: the distinct levels to calibrate (VE sigmas).
        sample_shape: one sample's shape.
        key_dim: the condition keys' width (None: an unconditional model, one group).
        num_clusters, rank, shrinkage, structure, num_conditions: as
            :func:`mmgibbs.calibration.calibrate_covariance`'s (``num_clusters`` per condition group).
        generator: one draw from it (process 0's) seeds the calibration noise per chunk and level, the sketch's
            test matrix and the k-means.
        dtype: the chain's dtype (float32 or float64) the samples are noised and denoised in; the table's too.
        cluster_samples: the subsample the clusters are fitted to: the first chunks up to this many samples.
        sketch: the width l of the Nystrom sketch; 0 keeps the exact second moments; default exact for d <=
            :data:`EXACT_MAX_DIM`, else l = max(2 rank, rank + :data:`SKETCH_OVERSAMPLING`).
        shards: this process among several (default one; :meth:`Shards.from_environment` under accelerate).
        progress: wraps the subsample's levels and the remaining chunks (a pipeline's ``progress_bar``).
    """
    for name, value, low in (("cluster_samples", cluster_samples, 1), ("num_conditions", num_conditions, 1)):
        check_number(value, name, integer=True, low=low)
    if sketch is not None:
        check_number(sketch, "sketch", integer=True, low=0, hint=" (0: exact second moments)")
    shards = shards or Shards()
    rank = DEFAULT_RANK if rank is None else rank
    shape, d = tuple(sample_shape), math.prod(sample_shape)
    base = int(shards.same(torch.randint(2**62, (1,), generator=generator)))
    generator = torch.Generator().manual_seed(base % 2**63)  # the k-means', the same on every process
    offsets = [0, *torch.tensor(list(chunk_sizes)).cumsum(0).tolist()]
    first = next((c + 1 for c in range(len(chunk_sizes)) if offsets[c + 1] >= cluster_samples), len(chunk_sizes))
    m = offsets[first]  # the subsample: chunks [0, first)
    # ---- pass 1: the subsample's predictions, level by level, gathered; the clusters from them
    held = {c: source(c) for c in range(first) if shards.owns(c)}
    group_keys = radii = None
    groups_sub = torch.zeros(m, dtype=torch.long)
    if key_dim is not None:
        keys = torch.zeros(m, key_dim, dtype=torch.float64)
        for c, (_, _, chunk_keys) in held.items():
            keys[offsets[c] : offsets[c + 1]] = chunk_keys.to("cpu", torch.float64)
        groups_sub, group_keys, radii = condition_groups(shards.reduce(keys), num_conditions, generator)
    num_groups = int(groups_sub.max()) + 1
    if sketch is None:
        sketch = 0 if d <= EXACT_MAX_DIM else max(2 * rank, rank + SKETCH_OVERSAMPLING)
    if sketch >= d:  # a sketch as wide as the dimension is no cheaper than the exact moments (and is singular)
        sketch = 0
    omega = None
    if sketch and structure == LevelCovariance.kind:
        omega = torch.randn(d, sketch, generator=torch.Generator().manual_seed(base % 2**31), dtype=torch.float64)
    centroids: list[list[torch.Tensor]] = []  # per level, per condition group
    stats: list[_Statistics] = []
    for j in progress(range(len(sigmas))):
        mu_all = torch.zeros(m, d, dtype=torch.float64)
        residual = {}
        for c, (x, denoiser, _) in held.items():
            mu = _predict(x, denoiser, float(sigmas[j]), j, _seed(base, c, j), dtype)
            mu_all[offsets[c] : offsets[c + 1]] = mu.to("cpu", torch.float64).flatten(1)
            residual[c] = x.to(dtype) - mu
        shards.reduce(mu_all)  # every process fills its own rows: the sum is the whole subsample
        level_centroids = []
        for g in range(num_groups):
            rows = mu_all[groups_sub == g]
            clusters = num_clusters <= 1 or len(rows) <= 1
            level_centroids.append(
                rows.mean(0, keepdim=True) if clusters else kmeans(rows, num_clusters, generator)[0]
            )
        centroids.append(level_centroids)
        level = _Statistics(structure, shape, sum(len(c) for c in level_centroids), omega)
        for c in held:
            rows = slice(offsets[c], offsets[c + 1])
            level.add(residual[c], _assign(mu_all[rows], level_centroids, groups_sub[rows]))
        stats.append(level)
    held.clear()
    # ---- pass 2: every other chunk, streamed: its samples at every level, then dropped
    radius = None if radii is None else radii.clone()
    for c in progress(range(first, len(chunk_sizes))):
        if not shards.owns(c):
            continue
        x, denoiser, chunk_keys = source(c)
        groups = torch.zeros(len(x), dtype=torch.long)
        if group_keys is not None:
            distance = torch.cdist(chunk_keys.to("cpu", torch.float64), group_keys)
            nearest = distance.min(-1)
            groups = nearest.indices
            radius = radius.scatter_reduce(0, groups, nearest.values, "amax")
        for j in range(len(sigmas)):
            mu = _predict(x, denoiser, float(sigmas[j]), j, _seed(base, c, j), dtype)
            level_rows = mu.to("cpu", torch.float64).flatten(1)
            stats[j].add(x.to(dtype) - mu, _assign(level_rows, centroids[j], groups))
    # ---- one reduction of every statistic (the radii in a second, a max), then the fit
    buffers = [b for level in stats for b in level.buffers()]
    if buffers and shards.count > 1:
        flat = shards.reduce(torch.cat([b.reshape(-1) for b in buffers]))
        offset = 0
        for b in buffers:
            b.copy_(flat[offset : offset + b.numel()].reshape(b.shape))
            offset += b.numel()
    if radius is not None:
        radii = shards.reduce(radius, "max")
    n = offsets[-1]
    table = CovarianceTable(
        num_samples=n,
        num_forward=len(chunk_sizes) * len(sigmas),
        sample_forwards=n * len(sigmas),
        settings={
            "num_clusters": num_clusters,
            "rank": rank,
            "shrinkage": shrinkage,
            "factor_iterations": 1,
            "streaming": {"cluster_samples": m, "sketch": sketch, "processes": shards.count},
            **({} if structure == LevelCovariance.kind else {"structure": structure}),
        },
        conditions=group_keys,
        condition_radii=radii,
    )
    if group_keys is not None:
        table.settings["num_conditions"] = num_conditions
    for sigma, level_centroids, level in zip(sigmas, centroids, stats, strict=True):
        fits, start = [], 0
        for own in level_centroids:
            fits.append(level.part(start, start + len(own)).fit(float(sigma), own, rank, shrinkage))
            start += len(own)
        fitted = fits[0] if group_keys is None else type(fits[0]).concat(float(sigma), fits)
        table.levels.append(fitted.to(dtype=dtype))
    table.levels.sort(key=lambda lv: -lv.sigma)
    return table


def _predict(
    x: torch.Tensor, denoiser: Callable, sigma: float, level: int, seed: int, dtype: torch.dtype
) -> torch.Tensor:
    """mu at y = x + sigma eps, eps from the chunk's and level's own generator (shard-invariant noise)."""
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(x.device)
    with torch.no_grad():
        return denoiser(x.to(dtype) + sigma * eps, level).to(dtype)


def _assign(mu: torch.Tensor, centroids: list[torch.Tensor], groups: torch.Tensor) -> torch.Tensor:
    """Each row's cluster (numbered across the groups, in order): the nearest centroid of its own group."""
    offsets = [0, *torch.tensor([len(c) for c in centroids]).cumsum(0).tolist()]
    out = torch.zeros(len(mu), dtype=torch.long)
    for g, own in enumerate(centroids):
        rows = groups == g
        if rows.any() and len(own) > 1:
            out[rows] = torch.cdist(mu[rows], own).argmin(-1) + offsets[g]
        elif rows.any():
            out[rows] = offsets[g]
    return out
