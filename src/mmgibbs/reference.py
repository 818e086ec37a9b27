"""An exact reference model: a mixture of Gaussians wrapped as a diffusers model.

For p(x) = sum_k w_k N(x; m_k, C_k) and y = x + sigma * eps everything is closed form:

    p~(y)            = sum_k w_k N(y; m_k, S_k),               S_k = C_k + sigma^2 I
    p(x | y)         = sum_k pi_k(y) N(x; m'_k, C'_k),          pi_k(y) ∝ w_k N(y; m_k, S_k)
    m'_k             = m_k + C_k S_k^{-1} (y - m_k),            C'_k = C_k - C_k S_k^{-1} C_k
    E[x | y]         = sum_k pi_k m'_k
    Cov[x | y]       = sum_k pi_k (C'_k + m'_k m'_k^T) - E[x | y] E[x | y]^T
    grad log p~(y)   = sum_k pi_k S_k^{-1} (m_k - y)

``GaussianMixtureDenoiser.forward(sample, timestep)`` returns the exact prediction of a diffusion model under
any supported noise schedule and prediction type, so samplers can be checked against ground truth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.utils.torch_utils import randn_tensor

from .energy import EnergyModel
from .noise import NoiseSchedule

#: numbers of the per-sample Cholesky factors ``sample`` gathers at once (N x d x d in one go was 10 GB for 20000
#: draws at d = 256); the chunks give the same draws bit for bit
SAMPLE_GATHER_NUMBERS = 2**25

Generator = torch.Generator | list[torch.Generator] | None


class GaussianMixtureDenoiser(ModelMixin, ConfigMixin):
    """Exact denoiser of a Gaussian mixture with full covariances, in any dimension.

    Args:
        num_components: K, the number of mixture components.
        dim: d, the data dimension.
        sample_shape: the shape of one sample, e.g. ``[d]`` (default) or ``[C, H, W]`` with C*H*W = d.
        scheduler_config: the config of the noise schedule the model answers to (any supported diffusers
            scheduler config, e.g. ``DDPMScheduler().config``; default: DDPM with linear betas, epsilon).

    The parameters ``means`` (K, d), ``covariances`` (K, d, d) and ``weights`` (K,) are float64 and frozen;
    build a model with :meth:`from_components`, :meth:`paper_toy` or :meth:`random_anisotropic`.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        num_components: int = 1,
        dim: int = 2,
        sample_shape: Sequence[int] | None = None,
        scheduler_config: dict[str, Any] | None = None,
    ):
        super().__init__()
        if sample_shape is not None and math.prod(sample_shape) != dim:
            raise ValueError(f"`sample_shape` {list(sample_shape)} must have `dim` = {dim} elements.")
        k, d = num_components, dim
        self.means = torch.nn.Parameter(torch.zeros(k, d, dtype=torch.float64), requires_grad=False)
        self.covariances = torch.nn.Parameter(torch.eye(d, dtype=torch.float64).repeat(k, 1, 1), requires_grad=False)
        self.weights = torch.nn.Parameter(torch.full((k,), 1.0 / k, dtype=torch.float64), requires_grad=False)
        self.noise_schedule = NoiseSchedule.from_config(scheduler_config or {"_class_name": "DDPMScheduler"})

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_components(
        cls,
        means: torch.Tensor | Sequence[Sequence[float]],
        covariances: torch.Tensor | Sequence[Any],
        weights: torch.Tensor | Sequence[float] | None = None,
        sample_shape: Sequence[int] | None = None,
        scheduler_config: dict[str, Any] | None = None,
    ) -> GaussianMixtureDenoiser:
        """A mixture with the given means (K, d), covariances (K, d, d) and weights (K,; normalised)."""
        means = torch.as_tensor(means, dtype=torch.float64)
        covariances = torch.as_tensor(covariances, dtype=torch.float64)
        k, d = means.shape
        if covariances.shape != (k, d, d):
            raise ValueError(f"`covariances` must have shape {(k, d, d)}; got {tuple(covariances.shape)}.")
        torch.linalg.cholesky(covariances)  # raises unless every covariance is positive definite
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights)
        if weights.shape != (k,) or torch.any(weights <= 0):
            raise ValueError(f"`weights` must be {k} positive numbers; got {weights}.")
        model = cls(
            num_components=k,
            dim=d,
            sample_shape=list(sample_shape) if sample_shape is not None else None,
            scheduler_config=dict(scheduler_config) if scheduler_config is not None else None,
        )
        with torch.no_grad():
            model.means.copy_(means)
            model.covariances.copy_(0.5 * (covariances + covariances.transpose(-1, -2)))
            model.weights.copy_(weights.double() / weights.sum())
        return model

    @classmethod
    def paper_toy(cls, std: float = 0.2, scheduler_config: dict[str, Any] | None = None) -> GaussianMixtureDenoiser:
        """The 2-D toy of Zhang et al. (2023): four equal modes at (+-1, +-1) with isotropic std 0.2."""
        means = [[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]]
        covs = torch.eye(2, dtype=torch.float64).repeat(4, 1, 1) * std**2
        return cls.from_components(means, covs, scheduler_config=scheduler_config)

    @classmethod
    def random_anisotropic(
        cls,
        dim: int,
        num_components: int,
        seed: int = 0,
        spread: float = 2.0,
        std_range: tuple[float, float] = (0.1, 1.0),
        sample_shape: Sequence[int] | None = None,
        scheduler_config: dict[str, Any] | None = None,
    ) -> GaussianMixtureDenoiser:
        """Random rotated, anisotropic components (per-direction std log-uniform in ``std_range``) with unequal
        weights in U(0.5, 1.5), means ~ N(0, spread^2 I)."""
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(num_components, dim, generator=g, dtype=torch.float64) * spread
        q, _ = torch.linalg.qr(torch.randn(num_components, dim, dim, generator=g, dtype=torch.float64))
        lo, hi = math.log(std_range[0]), math.log(std_range[1])
        stds = torch.exp(lo + (hi - lo) * torch.rand(num_components, dim, generator=g, dtype=torch.float64))
        covs = q @ torch.diag_embed(stds**2) @ q.transpose(-1, -2)
        weights = 0.5 + torch.rand(num_components, generator=g, dtype=torch.float64)
        return cls.from_components(means, covs, weights, sample_shape, scheduler_config)

    # ------------------------------------------------------------------ shapes
    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample."""
        shape = self.config.sample_shape
        return tuple(shape) if shape is not None else (self.config.dim,)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1).to(torch.float64)

    def _per_sample_sigma(self, sigma: torch.Tensor | float, n: int) -> torch.Tensor:
        return torch.as_tensor(sigma, dtype=torch.float64, device=self.means.device).expand(n).reshape(n)

    # ------------------------------------------------------------------ closed forms
    def _posterior_terms(
        self, y: torch.Tensor, sigma: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For flat float64 y (N, d): log p~(y) (N,), responsibilities pi (N, K), component posterior means m'
        (N, K, d) and per-component scores (N, K, d). Everything the posterior mean needs and nothing more: the
        component posterior covariances C'_k do not depend on y and come from
        :meth:`component_posterior_covariances` only where a covariance or a draw is asked for."""
        n, d = y.shape
        sig = self._per_sample_sigma(sigma, n)
        eye = torch.eye(d, dtype=torch.float64, device=y.device)
        log_p = torch.empty(n, dtype=torch.float64, device=y.device)
        resp = torch.empty(n, self.config.num_components, dtype=torch.float64, device=y.device)
        post_mean = torch.empty(n, self.config.num_components, d, dtype=torch.float64, device=y.device)
        scores = torch.empty_like(post_mean)
        for s in torch.unique(sig):  # the moments depend on sigma only through S_k = C_k + sigma^2 I
            idx = (sig == s).nonzero().squeeze(-1)
            chol = torch.linalg.cholesky(self.covariances + s**2 * eye)  # (K, d, d)
            diff = y[idx, None, :] - self.means[None]  # (n, K, d)
            sol = torch.einsum("kij,nkj->nki", torch.cholesky_inverse(chol), diff)  # S_k^{-1} (y - m_k)
            maha = (diff * sol).sum(-1)
            logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
            log_comp = torch.log(self.weights) - 0.5 * (maha + logdet + d * math.log(2 * math.pi))
            log_p[idx] = torch.logsumexp(log_comp, dim=-1)
            resp[idx] = torch.softmax(log_comp, dim=-1)
            post_mean[idx] = self.means[None] + torch.einsum("kij,nkj->nki", self.covariances, sol)
            scores[idx] = -sol
        return log_p, resp, post_mean, scores

    def component_posterior_covariances(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """C'_k = C_k - C_k (C_k + sigma^2 I)^{-1} C_k for one noise level, shape (K, d, d), float64."""
        eye = torch.eye(self.config.dim, dtype=torch.float64, device=self.means.device)
        s = torch.as_tensor(sigma, dtype=torch.float64, device=self.means.device)
        chol = torch.linalg.cholesky(self.covariances + s**2 * eye)
        cov = self.covariances - self.covariances @ torch.cholesky_solve(self.covariances, chol)
        return 0.5 * (cov + cov.transpose(-1, -2))

    def noisy_log_prob(self, y: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """log p~(y) of y = x + sigma * eps, shape (N,)."""
        return self._posterior_terms(self._flat(y), sigma)[0]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) of the clean mixture, shape (N,)."""
        return self.noisy_log_prob(x, 0.0)

    def score(self, y: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """grad log p~(y), with ``y``'s shape, float64."""
        _, resp, _, scores = self._posterior_terms(self._flat(y), sigma)
        return (resp.unsqueeze(-1) * scores).sum(1).reshape(y.shape)

    def posterior_mean(self, y: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """E[x | y], with ``y``'s shape, float64."""
        _, resp, post_mean, _ = self._posterior_terms(self._flat(y), sigma)
        return (resp.unsqueeze(-1) * post_mean).sum(1).reshape(y.shape)

    def posterior_covariance(self, y: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """Cov[x | y] = sum_k pi_k C'_k + sum_k pi_k (m'_k - mu)(m'_k - mu)^T, shape (N, d, d), float64 (no
        (N, K, d, d) intermediate)."""
        flat = self._flat(y)
        _, resp, post_mean, _ = self._posterior_terms(flat, sigma)
        sig = self._per_sample_sigma(sigma, flat.shape[0])
        centred = post_mean - (resp.unsqueeze(-1) * post_mean).sum(1, keepdim=True)  # m'_k - mu, (N, K, d)
        cov = torch.einsum("nk,nki,nkj->nij", resp, centred, centred)
        for s in torch.unique(sig):
            idx = (sig == s).nonzero().squeeze(-1)
            cov[idx] += torch.einsum("nk,kij->nij", resp[idx], self.component_posterior_covariances(s))
        return cov

    def posterior_sample(
        self, y: torch.Tensor, sigma: torch.Tensor | float, generator: Generator = None
    ) -> torch.Tensor:
        """An exact draw x ~ p(x | y) (the exact-posterior Gibbs step), with ``y``'s shape, float64."""
        flat = self._flat(y)
        _, resp, post_mean, _ = self._posterior_terms(flat, sigma)
        sig = self._per_sample_sigma(sigma, flat.shape[0])
        k = self._categorical(resp, generator)
        rows = torch.arange(len(k), device=k.device)
        z = randn_tensor(post_mean[:, 0].shape, generator=generator, device=y.device, dtype=torch.float64)
        chol = torch.empty(len(k), flat.shape[1], flat.shape[1], dtype=torch.float64, device=flat.device)
        for s in torch.unique(sig):
            idx = (sig == s).nonzero().squeeze(-1)
            chol[idx] = torch.linalg.cholesky(self.component_posterior_covariances(s))[k[idx]]
        return (post_mean[rows, k] + (chol @ z.unsqueeze(-1)).squeeze(-1)).reshape(y.shape)

    def component(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the most probable clean component of each x, shape (N,)."""
        return self._posterior_terms(self._flat(x), 0.0)[1].argmax(-1)

    def component_variance(self, x: torch.Tensor) -> float:
        """Per-dimension variance of samples around their own component, averaged over components with at least
        two samples: the paper's "variance per mode" (equal to the mean of diag(C_k) / d for exact samples)."""
        flat = self._flat(x).to(torch.float64)
        comp = self.component(x)
        per_component = [flat[comp == k].var(0).mean() for k in range(len(self.means)) if (comp == k).sum() > 1]
        return float(torch.stack(per_component).mean())

    def _categorical(self, probs: torch.Tensor, generator: Generator) -> torch.Tensor:
        u = torch.rand(probs.shape[0], 1, generator=_first(generator), dtype=torch.float64).to(probs.device)
        return (probs.cumsum(-1) < u).sum(-1).clamp(max=probs.shape[-1] - 1)

    # ------------------------------------------------------------------ sampling the data
    def sample(self, num_samples: int, generator: Generator = None) -> torch.Tensor:
        """Clean samples x ~ p(x), shape (N, *sample_shape), float64."""
        probs = self.weights.expand(num_samples, -1)
        k = self._categorical(probs, generator)
        z = randn_tensor((num_samples, self.config.dim), generator=generator, dtype=torch.float64)
        z = z.to(self.means.device).unsqueeze(-1)
        chol = torch.linalg.cholesky(self.covariances)
        rows = max(1, SAMPLE_GATHER_NUMBERS // self.config.dim**2)
        x = self.means[k] + torch.cat(
            [(chol[k[i : i + rows]] @ z[i : i + rows])[..., 0] for i in range(0, num_samples, rows)]
            or [z[..., 0]]  # no samples
        )
        return x.reshape(num_samples, *self.sample_shape)

    def sample_noisy(self, num_samples: int, sigma: float, generator: Generator = None) -> torch.Tensor:
        """Noisy samples y = x + sigma * eps ~ p~(y), float64."""
        x = self.sample(num_samples, generator)
        return x + sigma * randn_tensor(x.shape, generator=generator, dtype=torch.float64).to(x.device)

    # ------------------------------------------------------------------ the diffusers model interface
    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | float, return_dict: bool = True
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        """The exact prediction (the schedule's prediction type) for the model input ``sample`` at ``timestep``."""
        schedule = self.noise_schedule
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(sample.shape[0]) if t.ndim == 0 else t
        x_t = schedule.unscale_model_input(sample.to(torch.float64), t)
        sigma = schedule.sigma(t).to(sample.device)
        alpha, _ = schedule.coefficients(t, x_t)
        mu = self.posterior_mean(x_t / alpha, sigma)
        out = schedule.prediction(mu, x_t, t).to(sample.dtype)
        return UNet2DOutput(sample=out) if return_dict else (out,)


def _first(generator: Generator) -> torch.Generator | None:
    return generator[0] if isinstance(generator, list) else generator


class GaussianMixtureEnergy(EnergyModel):
    """The exact energy of a Gaussian mixture's noisy density, E(x_t, t) = -log p~(x_t / alpha_t; sigma_t) (up to a
    constant), float64, as an :class:`mmgibbs.energy.EnergyModel`: its score, Hessian-vector products and the
    moments they give are those of :class:`GaussianMixtureDenoiser` in closed form (the energy family's reference).

    Build it with :meth:`from_mixture`; ``mixture_config`` is the mixture's config (its components are weights).
    """

    @register_to_config
    def __init__(self, mixture_config: dict[str, Any] | None = None):
        super().__init__()
        self.mixture = GaussianMixtureDenoiser.from_config(mixture_config or {})

    @classmethod
    def from_mixture(cls, mixture: GaussianMixtureDenoiser) -> GaussianMixtureEnergy:
        """The energy of ``mixture`` (its components and noise schedule, copied)."""
        model = cls({k: v for k, v in mixture.config.items() if not k.startswith("_")})
        model.mixture.load_state_dict(mixture.state_dict())
        return model

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.mixture.sample_shape

    def energy(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        schedule = self.mixture.noise_schedule
        x_t = sample.to(torch.float64)
        alpha, _ = schedule.coefficients(timestep, x_t)
        return -self.mixture.noisy_log_prob(x_t / alpha, schedule.sigma(timestep).to(sample.device))
