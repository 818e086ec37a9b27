"""Tiny, random-weight, offline DiT pipelines, and an exact class-conditional model with DiT's call convention.

* :func:`tiny_dit_pipeline`: a ``DiTPipeline`` with a 1-layer ``DiTTransformer2DModel`` (or the legacy
  ``Transformer2DModel`` the Hub checkpoints name) on 4 x 4 x 4 latents, 10 classes (null class 10), learned sigma
  (8 output channels), the tiny VAE of ``tiny_pipelines`` (8 x 8 images) and DiT's own scheduler settings.
* :class:`ExactClassConditional`: ``model(hidden_states, timestep, class_labels)`` returns the exact prediction of
  p(x | c) for each sample's class c, given as a :class:`mmgibbs.GaussianMixtureDenoiser` per class; the null class
  (index ``num_classes``) answers for p(x) = sum_c pi_c p(x | c) (or any other denoiser given as ``null``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import ConfigMixin, DDIMScheduler, DiTPipeline, DiTTransformer2DModel, ModelMixin, Transformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from tiny_pipelines import _seeded, tiny_autoencoder_kl

from mmgibbs import GaussianMixtureDenoiser

__all__ = [
    "DIT_SCHEDULER_CONFIG",
    "TINY_DIT_CLASSES",
    "TINY_DIT_ID2LABEL",
    "ExactClassConditional",
    "class_mixture",
    "tiny_dit_pipeline",
    "tiny_dit_transformer",
]

#: facebook/DiT-XL-2-256's scheduler_config.json (DDIM, linear betas, no clipping)
DIT_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
}
TINY_DIT_CLASSES = 10
#: ImageNet-style labels, several words per id as in DiT's model_index.json
TINY_DIT_ID2LABEL = {"0": "tench, Tinca tinca", "1": "goldfish", "3": "white shark, great white shark"}


def tiny_dit_transformer(
    seed: int = 0, learned_sigma: bool = True, legacy: bool = False
) -> DiTTransformer2DModel | Transformer2DModel:
    """A 1-layer, 2-head, 8-wide DiT on 4 x 4 x 4 latents (patch 2: 4 tokens), 10 classes; ``legacy``: as the
    ``Transformer2DModel`` class the Hub configs name."""
    config = dict(
        num_attention_heads=2,
        attention_head_dim=4,
        in_channels=4,
        out_channels=8 if learned_sigma else 4,
        num_layers=1,
        sample_size=4,
        patch_size=2,
        num_embeds_ada_norm=TINY_DIT_CLASSES,
        norm_type="ada_norm_zero",
        norm_num_groups=1,
    )
    with _seeded(seed):
        model = Transformer2DModel(**config) if legacy else DiTTransformer2DModel(**config)
    return model.eval()


def tiny_dit_pipeline(seed: int = 0, learned_sigma: bool = True, legacy: bool = False) -> DiTPipeline:
    """A tiny ``DiTPipeline`` (8 x 8 images) with :data:`TINY_DIT_ID2LABEL`, progress bar off."""
    pipe = DiTPipeline(
        transformer=tiny_dit_transformer(seed, learned_sigma, legacy),
        vae=tiny_autoencoder_kl(seed + 2),
        scheduler=DDIMScheduler(**DIT_SCHEDULER_CONFIG),
        id2label=TINY_DIT_ID2LABEL,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def class_mixture(
    conditionals: Sequence[GaussianMixtureDenoiser], weights: Sequence[float]
) -> GaussianMixtureDenoiser:
    """p(x) = sum_c pi_c p(x | c): one mixture of every class's components, weights pi_c w_ck."""
    pi = torch.as_tensor(weights, dtype=torch.float64)
    first = conditionals[0]
    return GaussianMixtureDenoiser.from_components(
        torch.cat([c.means for c in conditionals]),
        torch.cat([c.covariances for c in conditionals]),
        torch.cat([p * c.weights for p, c in zip(pi, conditionals, strict=True)]),
        sample_shape=first.sample_shape,
        scheduler_config=dict(first.config.scheduler_config or {}),
    )


class ExactClassConditional(ModelMixin, ConfigMixin):
    """An exact class-conditional denoiser with DiT's call convention and config fields.

    ``forward(hidden_states, timestep, class_labels)`` returns, for each sample, the exact prediction (the
    schedule's prediction type) of its class's denoiser; class ``num_embeds_ada_norm`` is the null class. With
    ``out_channels = 2 * in_channels`` the last C channels are a fake learned variance (a large multiple of the
    input), which an adapter must drop. Build it with :meth:`from_denoisers`.
    """

    @register_to_config
    def __init__(
        self, num_embeds_ada_norm: int = 2, in_channels: int = 1, out_channels: int = 2, sample_size: int = 2
    ):
        super().__init__()
        self.branches = torch.nn.ModuleList()

    @classmethod
    def from_denoisers(
        cls,
        conditionals: Sequence[GaussianMixtureDenoiser],
        null: GaussianMixtureDenoiser | None = None,
        weights: Sequence[float] | None = None,
        learned_sigma: bool = True,
    ) -> ExactClassConditional:
        """One denoiser per class; the null class answers with ``null`` (default: the class mixture with class
        weights ``weights``, uniform by default)."""
        channels, size, _ = conditionals[0].sample_shape
        weights = weights if weights is not None else [1.0 / len(conditionals)] * len(conditionals)
        null = null if null is not None else class_mixture(conditionals, weights)
        model = cls(len(conditionals), channels, 2 * channels if learned_sigma else channels, size)
        model.branches.extend([*conditionals, null])
        return model

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Any:
        t = torch.as_tensor(timestep, device=hidden_states.device).expand(len(hidden_states))
        out = torch.zeros_like(hidden_states)
        for label in torch.unique(class_labels).tolist():
            rows = (class_labels == label).nonzero().squeeze(-1)
            prediction = self.branches[label](hidden_states[rows], t[rows], return_dict=False)[0]
            out = out.index_put((rows,), prediction.to(out.dtype))
        if self.config.out_channels == 2 * self.config.in_channels:
            out = torch.cat([out, 100.0 * hidden_states], dim=1)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)
