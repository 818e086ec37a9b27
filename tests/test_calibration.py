"""Calibrated covariances: float64 exactness of each estimator on exact mixtures, and the product constraints
(no coupling between the samples of a batch, batch size 1, NaN isolation, few levels, save/load, drop-in)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from mmgibbs import GaussianMixtureDenoiser, MMGibbsScheduler, MomentMatchingGibbsPipeline
from mmgibbs.calibration import CovarianceTable, calibrate_covariance, calibrate_level, kmeans
from mmgibbs.moments import (
    LowRankCovariance,
    compress_low_rank,
    expected_posterior_covariance,
    jacobian_correction,
    low_rank_plus_diagonal,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _low_rank_diag(d: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    return torch.randn(d, r, generator=g, dtype=F64), 0.1 + torch.rand(d, generator=g, dtype=F64)


# ---------------------------------------------------------------------------------------------- estimators
@pytest.mark.parametrize("exact_max_dim", [2048, 0])  # eigh of the second moment, and the randomized SVD
def test_low_rank_plus_diagonal_recovers_a_known_low_rank_plus_diagonal(exact_max_dim: int) -> None:
    factor, diag = _low_rank_diag(12, 3, seed=0)
    cov = factor @ factor.T + torch.diag(diag)
    r = torch.randn(40000, 12, generator=_gen(1), dtype=F64) @ torch.linalg.cholesky(cov).T
    f_hat, d_hat = low_rank_plus_diagonal(r, 3, iterations=8, exact_max_dim=exact_max_dim)
    assert f_hat.shape == (12, 3) and d_hat.shape == (12,)
    # the diagonal (every per-pixel variance) is matched exactly, the rest within Monte-Carlo error
    torch.testing.assert_close(f_hat.pow(2).sum(-1) + d_hat, r.pow(2).mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f_hat @ f_hat.T + torch.diag(d_hat), cov, atol=0.15, rtol=0.0)
    assert torch.all(f_hat.pow(2).sum(0)[:-1] >= f_hat.pow(2).sum(0)[1:])  # columns by decreasing variance
    pca, pca_diag = low_rank_plus_diagonal(r, 3, iterations=1, exact_max_dim=exact_max_dim)  # the default
    torch.testing.assert_close(pca.pow(2).sum(-1) + pca_diag, r.pow(2).mean(0), rtol=1e-10, atol=1e-12)
    top = torch.linalg.eigvalsh(r.T @ r / len(r))[-3:]
    torch.testing.assert_close(
        torch.linalg.eigvalsh(pca @ pca.T)[-3:], top, rtol=1e-3 if exact_max_dim == 0 else 1e-8, atol=0.0
    )


def test_compress_low_rank_keeps_the_diagonal_and_the_leading_directions() -> None:
    factor, diag = _low_rank_diag(10, 6, seed=2)
    kept, new_diag = compress_low_rank(factor, diag, 2)
    assert kept.shape == (10, 2)
    torch.testing.assert_close(kept.pow(2).sum(-1) + new_diag, factor.pow(2).sum(-1) + diag)
    top = torch.linalg.eigvalsh(factor @ factor.T)[-2:]
    torch.testing.assert_close(torch.linalg.eigvalsh(kept @ kept.T)[-2:], top)


@pytest.mark.parametrize("sigma", [0.3, 1.5])
def test_expected_covariance_from_exact_predictions_is_the_mean_posterior_covariance(sigma: float) -> None:
    """E_y[Cov[x|y]] three ways on an exact mixture (float64): the mean of the analytic Cov[x|y] over y ~ p~,
    sigma^2 (I - E[eps_hat eps_hat^T]) from predictions only, and the clean-sample residual second moment."""
    model = GaussianMixtureDenoiser.random_anisotropic(6, 3, seed=3)
    n = 40000
    x = model.sample(n, _gen(4))
    y = x + sigma * torch.randn(x.shape, generator=_gen(5), dtype=F64)
    mu = model.posterior_mean(y, sigma)
    analytic = model.posterior_covariance(y, sigma).mean(0)
    from_predictions = expected_posterior_covariance(y, mu, sigma)
    factor, diag = low_rank_plus_diagonal(x - mu, rank=6)
    from_residuals = factor @ factor.T + torch.diag(diag)
    # Monte-Carlo error: ~ sigma^2 sqrt(2 / n) for the eps_hat form, ~ Sigma sqrt(2 / n) for the residual form
    torch.testing.assert_close(from_predictions, analytic, atol=8 * sigma**2 * (2 / n) ** 0.5, rtol=0.0)
    scale = float(torch.linalg.eigvalsh(analytic)[-1])
    torch.testing.assert_close(from_residuals, analytic, atol=8 * scale * (2 / n) ** 0.5, rtol=0.0)


def test_clustered_calibration_recovers_each_components_posterior_covariance() -> None:
    """Well-separated components at low noise: Cov[x|y] is the component's C'_k, which one global matrix cannot
    give and the per-cluster table does (clusters of mu(y) are the components)."""
    model = GaussianMixtureDenoiser.random_anisotropic(5, 3, seed=6, spread=8.0)
    sigma, n = 0.3, 30000
    x = model.sample(n, _gen(7))
    y = x + sigma * torch.randn(x.shape, generator=_gen(8), dtype=F64)
    level = calibrate_level(x, model.posterior_mean(y, sigma), sigma, num_clusters=3, rank=5, shrinkage=0.0)
    test_y = model.sample_noisy(300, sigma, _gen(9))
    per_sample = level.covariance(model.posterior_mean(test_y, sigma)).dense()
    exact = model.posterior_covariance(test_y, sigma)
    torch.testing.assert_close(per_sample, exact, atol=0.006, rtol=0.0)
    pooled = calibrate_level(x, model.posterior_mean(y, sigma), sigma, num_clusters=1, rank=5).dense()[0]
    assert float((pooled - exact).abs().amax()) > 0.02  # the pooled matrix is far off for some component


def test_jacobian_correction_recovers_a_known_low_rank_plus_isotropic_jacobian() -> None:
    """J = F F^T + delta I (symmetric), corrected on span(F) from k = rank(F) products, with the isotropic prior
    delta sigma^2 I: exactly sigma^2 J."""
    d, k, sigma, delta = 9, 3, 0.7, 0.05
    factor, _ = _low_rank_diag(d, k, seed=10)
    jac = factor @ factor.T + delta * torch.eye(d, dtype=F64)
    n = 2
    prior = LowRankCovariance(torch.zeros(n, d, 1, dtype=F64), torch.full((n, d), delta * sigma**2, dtype=F64))
    directions = factor.expand(n, d, k)
    corrected = jacobian_correction(prior, lambda v: v @ jac.T, directions, torch.full((n,), sigma, dtype=F64))
    torch.testing.assert_close(corrected.dense(), (sigma**2 * jac).expand(n, d, d))


def test_jacobian_correction_is_the_exact_posterior_covariance_on_its_span() -> None:
    model = GaussianMixtureDenoiser.random_anisotropic(6, 3, seed=11)
    sigma = 0.5
    y = model.sample_noisy(4, sigma, _gen(12))

    def product(v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(lambda u: model.posterior_mean(u, sigma), (y,), (v,))[1]

    factor, diag = _low_rank_diag(6, 2, seed=13)
    prior = LowRankCovariance(factor.expand(4, 6, 2), diag.expand(4, 6))
    directions = torch.randn(4, 6, 3, generator=_gen(14), dtype=F64)
    sig = torch.full((4,), sigma, dtype=F64)
    corrected = jacobian_correction(prior, product, directions, sig).dense()
    exact = model.posterior_covariance(y, sigma)
    q, _ = torch.linalg.qr(directions)
    proj = torch.eye(6, dtype=F64) - q @ q.transpose(-1, -2)
    torch.testing.assert_close(q.transpose(-1, -2) @ corrected @ q, q.transpose(-1, -2) @ exact @ q)
    torch.testing.assert_close(proj @ corrected @ proj, proj @ prior.dense() @ proj)
    full = jacobian_correction(prior, product, torch.randn(4, 6, 6, generator=_gen(15), dtype=F64), sig)
    torch.testing.assert_close(full.dense(), exact)  # k = d products: the full covariance


@pytest.mark.parametrize("with_basis", [False, True])
def test_low_rank_covariance_draws_have_its_covariance(with_basis: bool) -> None:
    factor, diag = _low_rank_diag(5, 2, seed=16)
    basis = root = None
    if with_basis:
        basis, _ = torch.linalg.qr(torch.randn(1, 5, 2, generator=_gen(17), dtype=F64))
        root = torch.randn(1, 2, 2, generator=_gen(18), dtype=F64)
    cov = LowRankCovariance(factor[None], diag[None], basis, root)
    n = 100000
    wide = LowRankCovariance(
        *(t.expand(n, *t.shape[1:]) if t is not None else None for t in (cov.factor, cov.diagonal, basis, root))
    )
    draws = wide.sample(_gen(19), torch.zeros(n, 5, dtype=F64))
    torch.testing.assert_close(torch.cov(draws.T), cov.dense()[0], atol=0.05, rtol=0.0)
    torch.testing.assert_close(cov.mean_variance(), torch.diagonal(cov.dense(), dim1=-2, dim2=-1).mean(-1))


def test_kmeans_finds_separated_clusters_reproducibly() -> None:
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=F64)
    points = centres.repeat_interleave(50, 0) + 0.1 * torch.randn(150, 2, generator=_gen(20), dtype=F64)
    c1, a1 = kmeans(points, 3, _gen(21))
    c2, a2 = kmeans(points, 3, _gen(21))
    assert torch.equal(a1, a2) and torch.equal(c1, c2)
    assert len(set(a1.reshape(3, 50).mode(-1).values.tolist())) == 3
    assert all(len(set(row.tolist())) == 1 for row in a1.reshape(3, 50))


def test_table_round_trip_merge_and_missing_level(tmp_path) -> None:
    model = GaussianMixtureDenoiser.random_anisotropic(4, 2, seed=22)
    sigmas = [2.0, 2.0, 0.5]  # a repeated level (Gibbs sweeps) is calibrated once
    table = calibrate_covariance(
        lambda y, i: model.posterior_mean(y, sigmas[i]), sigmas, model.sample(200, _gen(23)), num_clusters=2, rank=2
    )
    assert table.sigmas == [2.0, 0.5] and table.sample_forwards == 400 and table.levels[0].factor.dtype == F64
    table.save(tmp_path / "t.safetensors")
    loaded = CovarianceTable.load(tmp_path / "t.safetensors")
    assert loaded.sigmas == table.sigmas and loaded.settings == table.settings
    for a, b in zip(loaded.levels, table.levels, strict=True):
        assert torch.equal(a.factor, b.factor) and torch.equal(a.diagonal, b.diagonal)
    with pytest.raises(ValueError, match="sigma=1"):
        table.level(1.0)
    other = calibrate_covariance(
        lambda y, i: model.posterior_mean(y, 1.0), [1.0], model.sample(100, _gen(24)), num_clusters=1, rank=1
    )
    merged = table.merge(other)
    assert merged.sigmas == [2.0, 1.0, 0.5] and merged.sample_forwards == 500
    # a table whose every level is replaced adds none of its cost (a recalibration reported twice the forwards)
    again = calibrate_covariance(
        lambda y, i: model.posterior_mean(y, sigmas[i]), sigmas, model.sample(200, _gen(25)), num_clusters=2, rank=1
    )
    replaced = again.merge(table)
    assert replaced.sigmas == [2.0, 0.5] and replaced.sample_forwards == 400 and replaced.num_forward == 2
    assert replaced.levels[0].factor.shape[-1] == 1  # the new levels won
    # ... and the settings are the new fit's: none of the old fit's (here a streamed one's) carry over
    table.settings["streaming"] = {"processes": 1, "cluster_samples": 4, "sketch": 200}
    assert again.merge(table).settings == again.settings and "streaming" not in again.settings


# ---------------------------------------------------------------------------------------------- the sampler
@pytest.fixture(scope="module")
def calibrated() -> MomentMatchingGibbsPipeline:
    config = dict(DDPMScheduler(clip_sample=False).config)
    model = GaussianMixtureDenoiser.random_anisotropic(6, 3, seed=25, scheduler_config=config)
    pipe = MomentMatchingGibbsPipeline(model, MMGibbsScheduler.from_config(config, covariance="calibrated", eta=0.0))
    pipe.set_progress_bar_config(disable=True)
    pipe.calibrate_covariance([1, 3, 5, 8], samples=model.sample(512, _gen(26)), generator=_gen(27), num_clusters=3)
    return pipe


def _draw(pipe: MomentMatchingGibbsPipeline, seeds: list[int], steps: int = 8, **kwargs) -> torch.Tensor:
    gens = [_gen(s) for s in seeds]
    return pipe(batch_size=len(seeds), generator=gens, num_inference_steps=steps, output_type="pt", **kwargs).images


def test_calibrated_samples_do_not_depend_on_the_rest_of_the_batch(calibrated) -> None:
    alone = torch.cat([_draw(calibrated, [s]) for s in (31, 32, 33)])  # batch size 1 works
    together = _draw(calibrated, [31, 32, 33])
    other_company = _draw(calibrated, [40, 32, 41])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-12)
    torch.testing.assert_close(other_company[1], alone[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 3, 5])
def test_calibrated_is_safe_at_few_levels(calibrated, steps: int) -> None:
    x = _draw(calibrated, list(range(64)), steps=steps)
    model = calibrated.unet
    assert torch.isfinite(x).all()
    spread = float(model.means.abs().amax() + 6 * model.covariances.diagonal(dim1=-2, dim2=-1).amax().sqrt())
    assert float(x.abs().amax()) < spread


def test_drop_in_scheduler_matches_the_pipeline_and_keeps_a_nan_in_its_sample(calibrated) -> None:
    scheduler = MMGibbsScheduler.from_config(calibrated.scheduler.config)
    scheduler.set_covariance_table(calibrated.scheduler.covariance_table)
    model = calibrated.unet

    def loop(poison: bool) -> torch.Tensor:
        scheduler.set_timesteps(5)
        gens = [_gen(50), _gen(51)]
        sample = randn_tensor((2, 6), generator=gens, dtype=F64)
        for i, t in enumerate(scheduler.timesteps):
            out = model(sample, t).sample
            if poison and i == 2:
                out = out.clone()
                out[0] = float("nan")
            sample = scheduler.step(out, t, sample, generator=gens).prev_sample
        return sample

    clean = loop(False)
    torch.testing.assert_close(clean, _draw(calibrated, [50, 51], steps=5), rtol=0, atol=1e-12)
    poisoned = loop(True)
    assert torch.isnan(poisoned[0]).all()
    torch.testing.assert_close(poisoned[1], clean[1], rtol=0, atol=0)


def test_save_pretrained_keeps_the_table(calibrated, tmp_path) -> None:
    calibrated.save_pretrained(tmp_path)
    loaded = MomentMatchingGibbsPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler.covariance_table.sigmas == calibrated.scheduler.covariance_table.sigmas
    torch.testing.assert_close(_draw(loaded, [60, 61]), _draw(calibrated, [60, 61]), rtol=0, atol=0)


def test_from_pipe_and_from_scheduler_keep_the_table(calibrated) -> None:
    """New settings over a calibrated scheduler keep its table (it was dropped with the old scheduler)."""
    assert MMGibbsScheduler.from_scheduler(calibrated.scheduler, gibbs_sweeps=2).covariance_table is not None
    again = MomentMatchingGibbsPipeline.from_pipe(calibrated, eta=1.0)
    assert again.scheduler.covariance_table is calibrated.scheduler.covariance_table
    torch.testing.assert_close(_draw(again, [62, 63]), _draw(calibrated, [62, 63], eta=1.0), rtol=0, atol=0)


def test_uncalibrated_use_fails_with_a_clear_message(calibrated) -> None:
    with pytest.raises(ValueError, match="No calibrated covariance for sigma"):
        _draw(calibrated, [1], steps=13)
    bare = MomentMatchingGibbsPipeline(calibrated.unet, MMGibbsScheduler.from_config(calibrated.scheduler.config))
    bare.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="calibrate"):
        _draw(bare, [1], steps=5)


def test_calibrated_jacobian_counts_its_products(calibrated) -> None:
    out = calibrated(
        batch_size=3,
        generator=_gen(70),
        num_inference_steps=5,
        covariance="calibrated_jacobian",
        num_probes=2,
        jacobian="forward",
        output_type="pt",
    )
    # the directions depend on the cluster of mu: one forward, then the JVPs, per level
    assert out.num_forward == 5 and out.num_jvp == 10 and torch.isfinite(out.images).all()


def test_calibration_from_own_samples_records_its_cost() -> None:
    config = dict(DDPMScheduler(clip_sample=False).config)
    model = GaussianMixtureDenoiser.random_anisotropic(4, 2, seed=80, scheduler_config=config)
    pipe = MomentMatchingGibbsPipeline(model, MMGibbsScheduler.from_config(config, covariance="calibrated"))
    pipe.set_progress_bar_config(disable=True)
    table = pipe.calibrate_covariance(4, num_samples=32, generator=_gen(81), sampler_steps=10, num_clusters=2, rank=2)
    assert table.sample_forwards == 4 * 32 and table.settings["sampler_sample_forwards"] == 10 * 32
    assert "own samples" in table.settings["source"]
    assert torch.isfinite(_draw(pipe, [82, 83], steps=4)).all()
