"""Energy-parametrised denoisers: a model of the noisy density itself, p_t(x_t) ∝ exp(-E(x_t, t)).

The paper's route to a symmetric full covariance (Zhang et al. 2023, and its official code): the network outputs a
scalar energy per sample and the score is its negative gradient. In the variance-exploding frame y = x_t / alpha_t,
sigma = s_t / alpha_t, with E~(y) = E(alpha_t y, t):

    score    grad log p~(y) = -grad E~(y)
    mean     mu(y)    = y + sigma^2 grad log p~(y) = y - sigma^2 grad E~(y)          (Tweedie)
    Jacobian J(y)     = d mu / d y = I - sigma^2 Hess E~(y)                          symmetric by construction
    cov.     Sigma(y) = sigma^2 J = sigma^2 I - sigma^4 Hess E~(y)

so every Jacobian product of the kernel (``mmgibbs.moments``) is a Hessian-vector product, computed here by double
backward: the score is a backward pass through E kept as a graph (``create_graph``), and the kernel's reverse-mode
product v -> J^T v = J v differentiates it once more. In the model's own frame the network output the scheduler
expects is the epsilon prediction eps_hat = s_t grad_{x_t} E(x_t, t) (converted to the scheduler's prediction type
by :meth:`mmgibbs.noise.NoiseSchedule.prediction`), which :func:`energy_predict` returns.

What a covariance gets from an energy model:

* ``full`` is sigma^2 J of a symmetric J: ``full_covariance``'s symmetrisation (J + J^T) / 2 is the identity here (to
  round-off), and Hutchinson's ``diagonal`` estimate is that of a symmetric matrix. Two repairs still apply and are
  kept: the spectrum clamp at 0, because a learned energy's Hessian can have eigenvalues above 1 / sigma^2 (an energy
  more curved than the Gaussian smoothing allows), i.e. negative variances; and ``variance_bound``, because an
  indefinite Hessian (negative curvature between modes) gives variances above sigma^2, beyond any distribution on the
  data range. For the exact energy of a Gaussian mixture neither clamp acts (``tests/test_energy.py``).
* Derivatives: ``jacobian="reverse"`` (double backward; what ``"auto"`` picks) and ``"finite_difference"`` (score
  differences) work. Forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``, the score and one product in
  one pass) took 1.4x (batch 256) to 2.1x (batch 16) the time of the score's kept graph plus a double backward on
  the digits UNet (CPU, one thread; the ``energy`` section of ``examples/benchmark.py`` measures both), and
  ``torch.autograd.forward_ad`` carries no tangent through ``torch.autograd.grad``, so ``"forward"`` is refused, as
  is ``product_batch`` > 1 (``torch.func.vmap`` cannot differentiate through the ``torch.autograd.grad`` inside the
  score).
* Cost: one counted forward (``num_forward``) of an energy model is a network forward plus its backward (the score);
  one counted backward (``num_backward``, a Jacobian product) is a double backward (a Hessian-vector product).

The drop-in :class:`mmgibbs.MMGibbsScheduler` cannot sample an energy model: a standard diffusers loop hands the
scheduler the network's output, an energy, never its gradient. Use :class:`mmgibbs.MomentMatchingGibbsPipeline`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
import torch.autograd.forward_ad as fwAD
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from .checks import check_choice, is_real
from .moments import NotDifferentiableError
from .noise import NoiseSchedule

#: the two forms of :class:`NetworkEnergy` (the official code's): E = scale sum f(y), E = scale 0.5 ||y - f(y)||^2
ENERGY_FORMS = ("sum", "quadratic")
#: why the drop-in scheduler (or any loop that reads the model output as a prediction) cannot sample an energy model
DROP_IN_ERROR = (
    "an energy model's output is an energy per sample, not a prediction: the drop-in MMGibbsScheduler (or any "
    "standard diffusers loop) cannot sample it, since the score is the energy's gradient, which needs the model "
    "itself. Sample it with MomentMatchingGibbsPipeline(unet=energy_model, scheduler=...)"
)
Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class EnergyModelOutput(BaseOutput):
    """The output of an :class:`EnergyModel`: ``energy`` E(x_t, t), one scalar per sample (N,)."""

    energy: torch.Tensor

    @property
    def sample(self) -> torch.Tensor:
        """An energy model has no prediction to read: the error a standard loop (``model(x, t).sample``) gets."""
        raise TypeError(DROP_IN_ERROR + ".")


class EnergyModel(ModelMixin, ConfigMixin):
    """A diffusers model of the noisy density p_t(x_t) ∝ exp(-E(x_t, t)) (module docstring): ``forward(sample,
    timestep)`` returns E, one scalar per sample, for the model-frame sample x_t (what a UNet of the same schedule
    would be fed, before EDM's c_in scaling).

    Subclasses implement :meth:`energy` and :attr:`sample_shape` (one sample's shape, for the pipeline's
    unconditional family). :class:`NetworkEnergy` turns any diffusers network f into E;
    :class:`mmgibbs.reference.GaussianMixtureEnergy` is the exact energy of a Gaussian mixture.
    """

    @property
    def sample_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def energy(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """E(x_t, t) for a batch ``sample`` (N, ...) at ``timestep`` (N,): shape (N,)."""
        raise NotImplementedError

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | float, return_dict: bool = True
    ) -> EnergyModelOutput | tuple[torch.Tensor]:
        """The energy per sample, checked to be one finite-shaped scalar per sample."""
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(sample.shape[0]) if t.ndim == 0 else t
        energy = self.energy(sample, t)
        if not isinstance(energy, torch.Tensor) or energy.shape != (sample.shape[0],):
            shape = tuple(energy.shape) if isinstance(energy, torch.Tensor) else type(energy).__name__
            raise ValueError(
                f"{type(self).__name__}.energy must return one scalar per sample, shape ({sample.shape[0]},); "
                f"got {shape}."
            )
        return EnergyModelOutput(energy=energy) if return_dict else (energy,)


def _check_network(network_class: Any, network_config: Any) -> type[ModelMixin]:
    if not isinstance(network_class, str) or not isinstance(getattr(diffusers, network_class, None), type):
        raise ValueError(
            f"`network_class` must name a diffusers model class (e.g. 'UNet2DModel'); got {network_class!r}."
        )
    cls = getattr(diffusers, network_class)
    if not issubclass(cls, ModelMixin):
        raise ValueError(f"`network_class` {network_class!r} is not a diffusers model (ModelMixin).")
    if not isinstance(network_config, dict):
        raise ValueError(
            f"`network_config` must be the network's config (a dict); got {type(network_config).__name__}."
        )
    return cls


class NetworkEnergy(EnergyModel):
    """E from a diffusers network f (the official code's two forms), ``scale`` s > 0:

        form="sum":        E(y) = s sum_i f(y)_i
        form="quadratic":  E(y) = s 0.5 ||y - f(y)||^2      (f of the sample's shape)

    With s = 1 / sigma^2 the quadratic form's score at a network that ignores its own Jacobian is (f(y) - y) / sigma^2,
    Tweedie's score of a denoiser f: a trained f is then close to a denoiser (how the shipped energy model is
    trained, ``examples/train_digits.py --energy``). The score is -s (J_f^T 1) (sum) and -s ((y - f) - J_f^T (y - f))
    (quadratic).

    Args:
        network_class: a diffusers model class name (``"UNet2DModel"``), called as ``network(sample, timestep)``.
        network_config: its config (``dict(unet.config)``).
        form: ``"sum"`` or ``"quadratic"``.
        scale: s, a positive finite number.
        sample_shape: one sample's shape; default the network's (in_channels, sample_size, sample_size).

    Build it from a live network with :meth:`from_network` (weights copied).
    """

    @register_to_config
    def __init__(
        self,
        network_class: str = "UNet2DModel",
        network_config: dict[str, Any] | None = None,
        form: str = "quadratic",
        scale: float = 1.0,
        sample_shape: list[int] | None = None,
    ):
        super().__init__()
        check_choice("form", form, ENERGY_FORMS)
        if not (is_real(scale) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"`scale` must be a positive finite number; got {scale!r}.")
        network_config = {} if network_config is None else network_config
        cls = _check_network(network_class, network_config)
        config = {k: v for k, v in network_config.items() if not k.startswith("_")}
        if form == "quadratic" and config.get("out_channels", config.get("in_channels")) != config.get("in_channels"):
            raise ValueError(
                f"form='quadratic' needs f(y) of y's shape: the network has in_channels={config.get('in_channels')} "
                f"and out_channels={config.get('out_channels')}."
            )
        self.network = cls.from_config(config)

    @classmethod
    def from_network(cls, network: ModelMixin, form: str = "quadratic", scale: float = 1.0) -> NetworkEnergy:
        """E from a live diffusers network (its config and a copy of its weights, in its dtype)."""
        if not isinstance(network, ModelMixin):
            raise ValueError(f"`network` must be a diffusers model (ModelMixin); got {type(network).__name__}.")
        config = {k: v for k, v in network.config.items() if not k.startswith("_")}
        model = cls(type(network).__name__, config, form, float(scale))
        model.network.load_state_dict(network.state_dict())
        model.to(network.device)
        return model if network.dtype == torch.float32 else model.to(network.dtype)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        if self.config.sample_shape is not None:
            return tuple(self.config.sample_shape)
        config = self.network.config
        size = config.sample_size
        return (config.in_channels, *((size, size) if isinstance(size, int) else tuple(size)))

    def energy(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        out = self.network(sample, timestep)
        out = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
        if self.config.form == "sum":
            return self.config.scale * out.flatten(1).sum(-1)
        return self.config.scale * 0.5 * (sample - out).flatten(1).pow(2).sum(-1)


def is_energy_model(model: Any) -> bool:
    """Whether ``model`` is an :class:`EnergyModel` (its forward returns an energy, not a prediction)."""
    return isinstance(model, EnergyModel)


def _double_backward_safe(on: bool) -> contextlib.AbstractContextManager:
    """The math attention backend where a graph of the score is kept: CPU's fused SDPA kernels have no double
    backward (scoped to the call, nothing patched process-wide)."""
    if not on:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def energy_score(
    model: torch.nn.Module, x_t: torch.Tensor, timestep: torch.Tensor, create_graph: bool = False
) -> torch.Tensor:
    """grad_{x_t} E(x_t, t) of an energy model (the negative model-frame score), in ``x_t``'s dtype; gradients
    enabled inside, so this works under ``torch.no_grad``. ``create_graph`` keeps it differentiable in ``x_t`` (and
    in the parameters): what Hessian-vector products and training by denoising score matching need."""
    with torch.enable_grad(), _double_backward_safe(create_graph):
        x = x_t if create_graph and x_t.requires_grad else x_t.detach().requires_grad_(True)
        energy = model(x.to(model.dtype), timestep, return_dict=False)[0]
        if not energy.requires_grad:
            raise NotDifferentiableError("the energy does not depend differentiably on the sample")
        (grad,) = torch.autograd.grad(energy.sum(), x, create_graph=create_graph)
    return grad.to(x_t.dtype)


def energy_predict(model: torch.nn.Module, schedule: NoiseSchedule) -> Predict:
    """``(model_input, timestep) -> F``: an energy model as the prediction the scheduler's ``schedule`` expects (its
    prediction type), through eps_hat = s_t grad_{x_t} E(x_t, t) and mu = (x_t - s_t eps_hat) / alpha_t (module
    docstring). The score's graph is kept when the caller differentiates (gradients on and a model input that
    requires them: the kernel's reverse-mode products, which are then Hessian-vector products); otherwise the
    output is detached. A forward-mode input (a dual tensor) is refused (module docstring)."""

    def predict(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if fwAD.unpack_dual(model_input).tangent is not None:
            raise NotDifferentiableError(
                "forward mode: an energy model's Jacobian products are Hessian-vector products by double backward "
                "(jacobian='reverse' or 'auto') or finite differences"
            )
        outer = torch.is_grad_enabled() and model_input.requires_grad
        t = torch.as_tensor(timestep, device=model_input.device)
        t = t.expand(model_input.shape[0]) if t.ndim == 0 else t
        with torch.enable_grad() if outer else contextlib.nullcontext():
            x_t = schedule.unscale_model_input(model_input, t)
            grad = energy_score(model, x_t, t, create_graph=outer)
            alpha, s = schedule.coefficients(t, x_t)
            mu = (x_t - s**2 * grad) / alpha
            return schedule.prediction(mu, x_t, t)

    return predict


__all__ = [
    "DROP_IN_ERROR",
    "ENERGY_FORMS",
    "EnergyModel",
    "EnergyModelOutput",
    "NetworkEnergy",
    "energy_predict",
    "energy_score",
    "is_energy_model",
]
