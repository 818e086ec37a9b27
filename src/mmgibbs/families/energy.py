"""Energy models (:class:`mmgibbs.energy.EnergyModel`): the unconditional family with the prediction computed from
the energy's gradient, eps_hat = s_t grad_{x_t} E(x_t, t) (``mmgibbs.energy``), so that the kernel's Jacobian
products are Hessian-vector products (double backward)."""

from __future__ import annotations

from typing import Any

from ..energy import energy_predict
from .unconditional import Unconditional


class Energy(Unconditional):
    """An :class:`mmgibbs.energy.EnergyModel` (forward: one energy per sample), sampled unconditionally."""

    name = "energy model (EnergyModel: forward returns E(x_t, t) per sample)"
    hosts = ()
    model_classes = ("EnergyModel",)

    @staticmethod
    def check_settings(scheduler: Any) -> None:
        """The derivative settings an energy model cannot serve, refused before the first model call."""
        cfg = scheduler.config
        if cfg.jacobian == "forward":
            raise ValueError(
                "jacobian='forward' cannot differentiate an energy model: its Jacobian products are Hessian-vector "
                "products by double backward (jacobian='reverse', what 'auto' picks) or finite differences "
                "('finite_difference'); forward-over-reverse took 1.4-2.1x as long as double backward on CPU."
            )
        if cfg.product_batch > 1:
            raise ValueError(
                f"product_batch={cfg.product_batch}: batched Jacobian products (torch.func.vmap) cannot differentiate "
                "through the torch.autograd.grad inside an energy model's score; use product_batch=1."
            )

    def predict(self, scheduler: Any) -> Any:
        """The energy's prediction (``mmgibbs.energy.energy_predict``), once the derivative settings are checked."""
        self.check_settings(scheduler)
        return energy_predict(self.unet, scheduler.noise_schedule)
