"""What the flow-matching families (SD3, Flux) share: the noise frame, the resolution-dependent shift, the default
image size and the decoding (z / scaling_factor + shift_factor, the VAE, the image processor).

Rectified-flow models see x_t = (1 - u) x + u eps at timestep t = u * T (T = ``num_train_timesteps``, 1000) and
predict the velocity v = eps - x, so mu = E[x | x_t] = x_t - u v (the ``flow`` row of ``mmgibbs.noise``); the
variance-exploding frame of the Gibbs kernel is y = x_t / (1 - u) = x + sigma eps with sigma = u / (1 - u).

Which levels u a host lays out depends on the image size when the scheduler config has
``use_dynamic_shifting``: u -> e^mu / (e^mu + 1 / u - 1) with mu = :func:`calculate_shift` (diffusers' own),
linear in the image's token count between (``base_image_seq_len``, ``base_shift``) and (``max_image_seq_len``,
``max_shift``). :meth:`FlowMatching.set_timesteps` computes mu as the host pipeline does, before the latents exist
(the token count follows from ``height``/``width`` or from the ``latents`` passed).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from .base import DEFAULT_STEPS, Family


class FlowMatching(Family):
    """A flow-matching transformer family: the levels' shift ``mu`` follows the image size (see the module).

    Subclasses give :meth:`image_seq_len` (tokens per image, as the host counts them) and say whether the host
    passes its own default ``sigmas`` (Flux: linspace(1, 1/n, n)) and ``mu`` always (Flux) or only with
    ``use_dynamic_shifting`` (SD3).
    """

    model = "transformer"
    embeddings: ClassVar[dict[str, tuple[int, str, str]]] = {
        **dict.fromkeys(("prompt_embeds", "negative_prompt_embeds"), (3, "transformer", "joint_attention_dim")),
        **dict.fromkeys(
            ("pooled_prompt_embeds", "negative_pooled_prompt_embeds"), (2, "transformer", "pooled_projection_dim")
        ),
    }
    #: the host's default for a config without ``max_shift`` (FluxPipeline 1.15, StableDiffusion3Pipeline 1.16)
    default_max_shift: ClassVar[float] = 1.15
    #: whether the host passes ``sigmas = linspace(1, 1/n, n)`` when the caller gives none (FluxPipeline does)
    host_sigmas: ClassVar[bool] = False
    #: whether the host computes ``mu`` without ``use_dynamic_shifting`` too (FluxPipeline does; ignored there)
    always_mu: ClassVar[bool] = False

    def size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """``height``/``width`` in pixels, or the host's defaults (``default_sample_size`` x VAE factor)."""
        default = self.host.default_sample_size * self.host.vae_scale_factor
        return height or default, width or default

    def image_seq_len(self, arguments: dict[str, Any]) -> int:
        """Image tokens the transformer sees for these call arguments."""
        raise NotImplementedError

    def set_timesteps(
        self, scheduler: Any, num_inference_steps: int | None, device: Any, arguments: dict[str, Any]
    ) -> None:
        """The host's levels: ``mu`` = calculate_shift(image tokens, the config's base/max shift and sequence
        lengths) when the config shifts dynamically (or a ``mu`` the caller passes), and the host's ``sigmas``.

        What the host would ignore is refused: ``num_inference_steps`` beside ``sigmas`` (the host lays out the
        ``sigmas`` and drops the count) and ``mu`` for a scheduler without ``use_dynamic_shifting`` (FlowMatchEuler
        shifts statically then)."""
        config = scheduler.config
        mu = arguments.get("mu")
        if arguments.get("sigmas") is not None and num_inference_steps is not None:
            raise ValueError(
                f"Pass `num_inference_steps` or `sigmas`, not both: the {len(arguments['sigmas'])} `sigmas` are the "
                "levels (the host would ignore `num_inference_steps`)."
            )
        if mu is not None and not config.get("use_dynamic_shifting", False):
            raise ValueError(
                "`mu` shifts the levels of a scheduler with `use_dynamic_shifting`; this one has a static shift "
                f"(shift={config.get('shift', 1.0)}), so the host would ignore `mu`: leave it out, or build the "
                "scheduler with use_dynamic_shifting=True."
            )
        num_inference_steps = DEFAULT_STEPS if num_inference_steps is None else num_inference_steps
        if mu is None and (self.always_mu or config.get("use_dynamic_shifting", False)):
            mu = calculate_shift(
                self.image_seq_len(arguments),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", self.default_max_shift),
            )
        sigmas = arguments.get("sigmas")
        if sigmas is None and self.host_sigmas and not config.get("use_flow_sigmas", False):
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        kwargs: dict[str, Any] = {"device": device}
        if mu is not None:
            kwargs["mu"] = mu
        if sigmas is not None:
            scheduler.set_timesteps(sigmas=sigmas, **kwargs)
        else:
            scheduler.set_timesteps(num_inference_steps, **kwargs)

    def decode(self, latents: torch.Tensor, output_type: str) -> Any:
        """The host's decoding of image latents: z / scaling_factor + shift_factor, the VAE, its image processor."""
        if output_type == "latent":
            return latents
        host, vae = self.host, self.host.vae
        latents = (latents.to(vae.dtype) / vae.config.scaling_factor) + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        return host.image_processor.postprocess(image, output_type=output_type)
