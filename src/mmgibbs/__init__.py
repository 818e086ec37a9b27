"""diffusers-mmgibbs: Moment Matching Denoising Gibbs Sampling (Zhang et al., NeurIPS 2023) for diffusers.

Public API:

* :class:`MMGibbsScheduler`: drop-in scheduler (``MMGibbsScheduler.from_config(pipe.scheduler.config)``).
* :class:`MomentMatchingGibbsPipeline`: the sampler with Jacobian-based covariances around any denoiser.
* :class:`NoiseSchedule`: every diffusers noise family in the frame y = x + sigma * eps.
* :func:`denoising_moments`, :class:`DenoisingMoments`: the Gaussian N(mu, Sigma) of a denoiser.
* :func:`make_estimator`, :class:`CovarianceEstimator`: the covariance estimators (``mmgibbs.covariances``), one
  class per ``covariance`` name, for the Gibbs kernel :func:`mmgibbs.gibbs.sample`.
* :class:`GaussianMixtureDenoiser`: an exact reference model (a mixture of Gaussians as a diffusers model).
* :class:`EnergyModel`, :class:`NetworkEnergy`: energy-parametrised denoisers (``mmgibbs.energy``), the score
  -grad E and Hessian-vector products; :class:`GaussianMixtureEnergy`, the exact energy of a mixture.
"""

from .covariances import COVARIANCES, CovarianceEstimator, make_estimator
from .energy import EnergyModel, NetworkEnergy
from .moments import DenoisingMoments, denoising_moments
from .noise import NOISE_FAMILIES, PREDICTION_TYPES, NoiseSchedule
from .pipeline import MomentMatchingGibbsPipeline, MomentMatchingGibbsPipelineOutput
from .reference import GaussianMixtureDenoiser, GaussianMixtureEnergy
from .scheduler import MMGibbsScheduler, MMGibbsSchedulerOutput

__version__ = "0.1.0"

__all__ = [
    "COVARIANCES",
    "NOISE_FAMILIES",
    "PREDICTION_TYPES",
    "CovarianceEstimator",
    "DenoisingMoments",
    "EnergyModel",
    "GaussianMixtureDenoiser",
    "GaussianMixtureEnergy",
    "MMGibbsScheduler",
    "MMGibbsSchedulerOutput",
    "MomentMatchingGibbsPipeline",
    "MomentMatchingGibbsPipelineOutput",
    "NetworkEnergy",
    "NoiseSchedule",
    "denoising_moments",
    "make_estimator",
]
