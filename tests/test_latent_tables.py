"""Tables for large latents: the stationary covariance (one C x C spectral density per frequency, exact for
translation-invariant data), float16 storage, and what a table costs in bytes."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from mmgibbs import GaussianMixtureDenoiser, MMGibbsScheduler, MomentMatchingGibbsPipeline
from mmgibbs.calibration import CovarianceTable, calibrate_covariance, calibrate_stationary_level
from mmgibbs.moments import StationaryCovariance

F64 = torch.float64
SHAPE = (2, 4, 4)
D = 32


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def circulant_covariance(seed: int) -> torch.Tensor:
    """A stationary (periodic) covariance of (2, 4, 4) samples: x = circular convolutions of white noise by random
    kernels per channel pair, plus a white nugget; Sigma = A A^T + 0.01 I, (32, 32)."""
    kernels = torch.randn(2, 2, 4, 4, generator=_gen(seed), dtype=F64) / 3
    lag = (torch.arange(4)[:, None] - torch.arange(4)[None, :]) % 4  # (p - i) mod 4
    a = kernels[:, :, lag[:, None, :, None], lag[None, :, None, :]]  # [a, b, p, q, i, j] = k_ab[p - i, q - j]
    a = a.permute(0, 2, 3, 1, 4, 5).reshape(D, D)
    return a @ a.T + 0.01 * torch.eye(D, dtype=F64)


def _assert_covariance(estimate: torch.Tensor, exact: torch.Tensor, n: int) -> None:
    diagonal = exact.diagonal()
    error = ((diagonal[:, None] * diagonal[None, :] + exact**2) / n).sqrt()
    worst = float(((estimate - exact).abs() / error).max())
    assert worst < 5, f"an entry is {worst:.1f} standard errors off"


def test_a_circulant_covariance_is_stationary() -> None:
    """The test model is what it claims: Sigma commutes with every cyclic shift of the image."""
    cov = circulant_covariance(0).reshape(*SHAPE, *SHAPE)
    torch.testing.assert_close(cov, cov.roll((1, 1), dims=(1, 2)).roll((1, 1), dims=(4, 5)))
    torch.testing.assert_close(cov, cov.roll(2, dims=2).roll(2, dims=5))


def test_stationary_draws_have_their_covariance() -> None:
    """x = irfft2(L rfft2(z)) has covariance F^H L L^H F, which ``dense`` forms and ``mean_variance`` traces."""
    root = torch.randn(1, 4, 3, 2, 2, generator=_gen(1), dtype=torch.complex128)
    root = root @ root.mH  # Hermitian; a root of its square
    root[:, 0, 0] = root[:, 0, 0].real  # the self-conjugate frequencies hold real densities
    root[:, 2, 0] = root[:, 2, 0].real
    root[:, 0, 2], root[:, 2, 2] = root[:, 0, 2].real, root[:, 2, 2].real
    root[:, 3] = root[:, 1].conj()  # S(-k) = conj(S(k)) along the full axis, as real data has it
    cov = StationaryCovariance(root, SHAPE)
    dense = cov.dense()[0]
    torch.testing.assert_close(dense, dense.T)
    n = 40000
    wide = StationaryCovariance(root.expand(n, *root.shape[1:]), SHAPE)
    draws = wide.sample(_gen(2), torch.zeros(n, *SHAPE, dtype=F64)).reshape(n, D)
    _assert_covariance(draws.T @ draws / n, dense, n)
    torch.testing.assert_close(cov.mean_variance(), dense.diagonal().mean().reshape(1))


@pytest.mark.parametrize("sigma", [0.2, 1.5])
def test_stationary_level_is_the_posterior_covariance_of_stationary_gaussian_data(sigma: float) -> None:
    """For x ~ N(m, Sigma) with Sigma circulant, Cov[x | y] = sigma^2 Sigma (Sigma + sigma^2 I)^-1 is circulant too:
    the stationary level (one cluster) lands on it from 4000 exact samples and the exact denoiser."""
    cov = circulant_covariance(3)
    model = GaussianMixtureDenoiser.from_components(torch.randn(1, D, generator=_gen(4), dtype=F64), cov[None],
                                                    sample_shape=list(SHAPE))  # fmt: skip
    n = 4000
    x = model.sample(n, _gen(5))
    y = x + sigma * torch.randn(x.shape, generator=_gen(6), dtype=F64)
    level = calibrate_stationary_level(x, model.posterior_mean(y, sigma), sigma, num_clusters=1)
    exact = sigma**2 * cov @ torch.linalg.inv(cov + sigma**2 * torch.eye(D, dtype=F64))
    assert level.root.shape == (1, 4, 3, 2, 2) and level.shape == SHAPE
    _assert_covariance(level.dense()[0], exact, n)


@pytest.fixture(scope="module")
def pipe() -> MomentMatchingGibbsPipeline:
    config = dict(DDPMScheduler(clip_sample=False).config)
    model = GaussianMixtureDenoiser.from_components(
        torch.randn(2, D, generator=_gen(7), dtype=F64) * 2,
        torch.stack([circulant_covariance(8), circulant_covariance(9)]),
        sample_shape=list(SHAPE),
        scheduler_config=config,
    )
    scheduler = MMGibbsScheduler.from_config(config, covariance="calibrated_stationary", eta=0.0)
    pipe = MomentMatchingGibbsPipeline(model, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_calibrated_stationary_samples_saves_and_refuses_the_other_reader(pipe, tmp_path) -> None:
    """The pipeline calibrates the scheduler's structure (its covariance), samples with it, keeps it through
    save/load, and a stationary table read as low rank (or the reverse) is refused before any model call."""
    samples = pipe.unet.sample(512, _gen(10))
    table = pipe.calibrate_covariance(4, samples=samples, generator=_gen(11), num_clusters=2)
    assert table.structure == "stationary" and all(lv.kind == "stationary" for lv in table.levels)
    out = pipe(batch_size=64, num_inference_steps=4, generator=_gen(12), output_type="pt").images
    assert torch.isfinite(out).all() and out.shape == (64, *SHAPE)
    table.save(tmp_path / "t.safetensors")
    loaded = CovarianceTable.load(tmp_path / "t.safetensors")
    assert loaded.structure == "stationary" and torch.equal(loaded.levels[1].root, table.levels[1].root)
    with pytest.raises(ValueError, match="reads low rank levels; the covariance table holds stationary levels"):
        pipe(batch_size=2, num_inference_steps=4, covariance="calibrated")
    with pytest.raises(ValueError, match="Cannot merge"):
        table.merge(calibrate_covariance(lambda y, i: y, [1.0], samples, num_clusters=1, rank=2))


def test_float16_storage_halves_the_table_and_samples_alike(pipe) -> None:
    samples = pipe.unet.sample(512, _gen(13))
    settings = dict(samples=samples, num_clusters=2, rank=8, covariance="calibrated")
    full = pipe.calibrate_covariance(4, generator=_gen(14), dtype=torch.float32, **settings)
    half = pipe.calibrate_covariance(4, generator=_gen(14), dtype=torch.float16, **settings)
    assert half.levels[0].factor.dtype == torch.float16 and half.nbytes == full.nbytes // 2
    assert full.nbytes == sum(4 * (2 * D + 2 * D * 8 + 2 * D) for _ in full.levels)  # centroids, factor, diagonal
    a = pipe(batch_size=256, num_inference_steps=4, generator=_gen(15), covariance="calibrated", output_type="pt")
    pipe.scheduler.set_covariance_table(full)
    b = pipe(batch_size=256, num_inference_steps=4, generator=_gen(15), covariance="calibrated", output_type="pt")
    assert torch.isfinite(a.images).all()
    assert float((a.images - b.images).abs().max()) < 0.05  # float16 factors: the same draws to ~1e-3


def test_scaled_stationary_moments_scale_each_frequencys_directions() -> None:
    """The second-order chain (``mean_order=2``) scales each direction's variance v by f(v): for the stationary
    structure the directions are each frequency's eigenvectors, so the scaled covariance is the dense one's matrix
    function Sigma f(Sigma)."""
    from mmgibbs.moments import DenoisingMoments

    level = calibrate_stationary_level(
        torch.randn(64, *SHAPE, generator=_gen(20), dtype=F64), torch.zeros(64, *SHAPE, dtype=F64), 1.0, 1
    )
    cov = StationaryCovariance(level.root, SHAPE)
    moments = DenoisingMoments(mu=torch.zeros(1, *SHAPE, dtype=F64), sigma=torch.ones(1, dtype=F64),
                               covariance="calibrated_stationary", variance=cov)  # fmt: skip
    factor = lambda v: 1.0 / (1.0 + 3.0 * v)  # noqa: E731
    scaled = moments.scaled(factor).variance
    assert isinstance(scaled, StationaryCovariance)
    evals, evecs = torch.linalg.eigh(cov.dense()[0])
    torch.testing.assert_close(scaled.dense()[0], (evecs * (evals * factor(evals))) @ evecs.T)


def test_calibrated_stationary_runs_the_second_order_chain(pipe) -> None:
    table = pipe.calibrate_covariance(4, samples=pipe.unet.sample(256, _gen(21)), generator=_gen(22), num_clusters=1)
    assert table.structure == "stationary"
    out = pipe(batch_size=8, num_inference_steps=4, generator=_gen(23), mean_order=2, output_type="pt").images
    assert torch.isfinite(out).all()
