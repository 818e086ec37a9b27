"""The covariance estimators as objects (``mmgibbs.covariances``): chosen by name, settings checked when built, any
estimator class usable by the kernel, and the kernel through an estimator identical to the string path, float64."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch

from mmgibbs import COVARIANCES, GaussianMixtureDenoiser, MMGibbsScheduler, make_estimator
from mmgibbs import gibbs as kernel
from mmgibbs.calibration import calibrate_covariance
from mmgibbs.covariances import (
    CALIBRATED_COVARIANCES,
    ESTIMATORS,
    JACOBIAN_COVARIANCES,
    Calibrated,
    CalibratedJacobian,
    CalibratedStationary,
    CovarianceEstimator,
    Diagonal,
    ExactDiagonal,
    Full,
    Isotropic,
    IsotropicBatch,
    Mean,
    Projection,
    estimator_class,
)
from mmgibbs.moments import DenoisingMoments, denoising_moments

F64 = torch.float64
SIGMAS = [2.0, 2.0, 1.0, 0.4, 0.1]  # a level repeated: a second Gibbs sweep


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def mixture() -> GaussianMixtureDenoiser:
    return GaussianMixtureDenoiser.random_anisotropic(4, 3, seed=5)


def _level_denoiser(model: GaussianMixtureDenoiser, calls: list | None = None):
    """The exact posterior mean at step i of ``SIGMAS`` (VE frame, float64), recording the steps it is called at."""

    def mu(y: torch.Tensor, i: int) -> torch.Tensor:
        if calls is not None:
            calls.append(i)
        return model.posterior_mean(y, SIGMAS[i])

    return mu


@pytest.fixture(scope="module")
def table(mixture):
    samples = mixture.sample(64, _gen(1))
    return calibrate_covariance(_level_denoiser(mixture), SIGMAS, samples, num_clusters=2, rank=2, generator=_gen(2))


# ---------------------------------------------------------------------------------------------- chosen by name
def test_every_covariance_name_is_one_class() -> None:
    expected = {
        "none": Mean,
        "isotropic": Isotropic,
        "isotropic_batch": IsotropicBatch,
        "diagonal": Diagonal,
        "exact_diagonal": ExactDiagonal,
        "full": Full,
        "projection": Projection,
        "calibrated": Calibrated,
        "calibrated_stationary": CalibratedStationary,
        "calibrated_jacobian": CalibratedJacobian,
    }
    assert ESTIMATORS == expected and COVARIANCES == tuple(expected)
    assert all(estimator_class(name).name == name for name in COVARIANCES)
    assert JACOBIAN_COVARIANCES == ("diagonal", "exact_diagonal", "full", "projection", "calibrated_jacobian")
    assert CALIBRATED_COVARIANCES == ("calibrated", "calibrated_stationary", "calibrated_jacobian")


def test_make_estimator_gives_each_class_the_settings_it_takes(table) -> None:
    settings = dict(num_probes=3, jacobian="forward", product_batch=2, variance_bound=0.5, covariance_table=table)
    assert make_estimator("none", **settings) == Mean()
    assert make_estimator("isotropic_batch", **settings) == IsotropicBatch(variance_bound=0.5)
    assert make_estimator("diagonal", **settings) == Diagonal(
        num_probes=3, jacobian="forward", product_batch=2, variance_bound=0.5
    )
    assert make_estimator("full", **settings) == Full(jacobian="forward", product_batch=2, variance_bound=0.5)
    assert make_estimator("calibrated", **settings) == Calibrated(covariance_table=table)
    assert make_estimator("calibrated_jacobian", **settings).covariance_table is table
    # the scheduler builds its estimator from its config and table
    scheduler = MMGibbsScheduler(covariance="diagonal", num_probes=3, jacobian="reverse", variance_bound=None)
    assert scheduler.estimator() == Diagonal(num_probes=3, jacobian="reverse")
    assert MMGibbsScheduler(covariance="isotropic").estimator() == Isotropic(variance_bound=1.0)


def test_an_unknown_name_or_setting_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"`covariance` must be one of 'none', 'isotropic'.*got 'low_rank'"):
        make_estimator("low_rank")
    with pytest.raises(ValueError, match=r"`covariance` must be one of .*'calibrated_jacobian'; got 'low_rank'"):
        MMGibbsScheduler(covariance="low_rank")
    with pytest.raises(TypeError, match="'num_probe'"):
        make_estimator("diagonal", num_probe=4)


# ---------------------------------------------------------------------------------------------- checked when built
@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: Diagonal(num_probes=0), ValueError, "`num_probes` must be a positive integer; got 0"),
        (lambda: Diagonal(num_probes=True), ValueError, "`num_probes` must be a positive integer"),
        (lambda: Diagonal(jacobian="symbolic"), ValueError, "`jacobian` must be one of 'auto'"),
        (lambda: Diagonal(variance_bound=0.0), ValueError, "`variance_bound` must be positive"),
        (lambda: Diagonal(jacobian="finite_difference", product_batch=2), ValueError, "finite differences take one"),
        (lambda: Full(product_batch=1.5), ValueError, "`product_batch` must be a positive integer"),
        (lambda: ExactDiagonal(max_full_dim=0), ValueError, "`max_full_dim` must be a positive integer"),
        (lambda: Projection(jacobian=None), ValueError, "`jacobian` must be one of"),
        (lambda: Isotropic(variance_bound=-1.0), ValueError, "`variance_bound` must be positive"),
        (lambda: IsotropicBatch(variance_bound="1"), ValueError, "`variance_bound` must be positive"),
        (lambda: Calibrated(), ValueError, r"covariance='calibrated' reads a calibrated .*calibrate one first"),
        (lambda: Calibrated(covariance_table=[]), TypeError, "`covariance_table` must be a calibrated"),
        (lambda: CalibratedJacobian(), ValueError, "covariance='calibrated_jacobian' reads a calibrated"),
        (lambda: make_estimator("diagonal", num_probes=-2), ValueError, "`num_probes` must be a positive"),
        # a bad setting is refused even where this covariance does not use it
        (lambda: make_estimator("isotropic", num_probes=0), ValueError, "`num_probes` must be a positive"),
        (lambda: make_estimator("none", jacobian="symbolic"), ValueError, "`jacobian` must be one of"),
    ],
)
def test_each_estimator_checks_its_settings_when_built(build, error, match) -> None:
    with pytest.raises(error, match=match):
        build()


def test_settings_cannot_change_after_the_check() -> None:
    estimator = Diagonal(num_probes=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        estimator.num_probes = 0


def test_a_missing_calibrated_level_is_refused_before_the_first_model_call(mixture, table) -> None:
    calls = []
    y = mixture.sample_noisy(2, SIGMAS[0], _gen(3))
    with pytest.raises(ValueError, match=r"No calibrated covariance for sigma=0\.05"):
        kernel.sample(_level_denoiser(mixture, calls), [*SIGMAS, 0.05], y, Calibrated(covariance_table=table))
    assert calls == []
    with pytest.raises(TypeError, match="`estimator` must be a covariance estimator"):
        kernel.sample(_level_denoiser(mixture, calls), SIGMAS, y, "isotropic")
    assert calls == []


# ---------------------------------------------------------------------------------------------- one class each
@dataclass(frozen=True)
class Inflated(CovarianceEstimator):
    """A new estimator, defined here: the isotropic moments with the variance times ``factor``, recording what it
    was asked (and refusing levels below ``lowest``)."""

    name: ClassVar[str] = "inflated"
    factor: float = 1.0
    lowest: float = 0.0
    seen: list = field(default_factory=list)

    def check_levels(self, sigmas) -> None:
        if min(sigmas) < self.lowest:
            raise ValueError(f"inflated serves levels from {self.lowest}")

    def moments(self, denoiser, y, sigma, generator=None) -> DenoisingMoments:
        self.seen.append(sigma)
        base = Isotropic().moments(denoiser, y, sigma, generator)
        return dataclasses.replace(base, variance=self.factor * base.variance, covariance=self.name, num_jvp=2)


def test_a_new_estimator_class_is_used_by_the_kernel(mixture) -> None:
    y = mixture.sample_noisy(3, SIGMAS[0], _gen(4))
    calls = []
    denoiser = _level_denoiser(mixture, calls)
    reference = kernel.sample(denoiser, SIGMAS, y, Isotropic(), generator=_gen(5))
    same = Inflated()
    out = kernel.sample(denoiser, SIGMAS, y, same, generator=_gen(5))
    assert same.seen == SIGMAS and calls == [0, 1, 2, 3, 4] * 2
    assert torch.equal(out.sample, reference.sample) and torch.equal(out.mean, reference.mean)
    assert (out.num_forward, out.num_jvp) == (len(SIGMAS), 2 * len(SIGMAS))  # its cost counts travel
    wider = kernel.sample(denoiser, SIGMAS, y, Inflated(factor=4.0), generator=_gen(5))
    assert not torch.allclose(wider.sample, reference.sample)
    calls.clear()
    with pytest.raises(ValueError, match=r"inflated serves levels from 0\.2"):
        kernel.sample(denoiser, SIGMAS, y, Inflated(lowest=0.2))
    assert calls == []


# ---------------------------------------------------------------------------------------------- bit-identical
def _string_path(denoiser, sigmas, y, covariance, generator, **settings):
    """The kernel as it was: per step ``denoising_moments`` with the covariance's name and loose settings (a table
    level looked up per step), then :func:`mmgibbs.gibbs.gibbs_step`."""
    table = settings.pop("covariance_table", None)
    counts = dict.fromkeys(kernel.COUNTS, 0)
    mu = y
    for i, sigma in enumerate(sigmas):
        calibration = table.level(sigma) if table is not None else None
        moments = denoising_moments(
            lambda v, i=i: denoiser(v, i),
            y,
            sigma,
            covariance,
            generator=generator,
            calibration=calibration,
            **settings,
        )
        for key in counts:
            counts[key] += getattr(moments, key)
        y, mu = kernel.gibbs_step(
            moments, y, sigma, sigmas[i + 1] if i + 1 < len(sigmas) else None, generator=generator
        )
    return y, mu, counts


@pytest.mark.parametrize(
    ("covariance", "settings"),
    [
        ("none", {}),
        ("isotropic", {"variance_bound": 0.8}),
        ("isotropic_batch", {}),
        ("diagonal", {"num_probes": 3, "jacobian": "reverse"}),
        ("diagonal", {"num_probes": 4, "jacobian": "forward", "product_batch": 2}),
        ("full", {"variance_bound": 0.8}),
        ("projection", {"jacobian": "forward"}),
        ("calibrated", {}),
        ("calibrated_jacobian", {"num_probes": 2}),
    ],
)
def test_the_kernel_through_an_estimator_is_the_string_path_bit_for_bit(mixture, table, covariance, settings) -> None:
    y = mixture.sample_noisy(3, SIGMAS[0], _gen(6))
    denoiser = _level_denoiser(mixture)
    if covariance in CALIBRATED_COVARIANCES:
        settings = {**settings, "covariance_table": table}
    estimator = make_estimator(covariance, **settings)
    out = kernel.sample(denoiser, SIGMAS, y, estimator, generator=_gen(7))
    sample, mean, counts = _string_path(denoiser, SIGMAS, y, covariance, _gen(7), **settings)
    assert out.sample.dtype == F64
    assert torch.equal(out.sample, sample) and torch.equal(out.mean, mean)
    assert {key: getattr(out, key) for key in kernel.COUNTS} == counts
