"""DiT (Peebles & Xie 2023): a class-conditional latent transformer, ``DiTTransformer2DModel`` (published as
``Transformer2DModel``) called as ``transformer(latents, timestep, class_labels)``, in ``DiTPipeline``.

* Conditioning: ``class_labels``, ImageNet ids or words (the host's ``get_label_ids``, from the ``id2label`` the
  host was built with).
* Guidance: the unconditional branch is the null class, index ``num_classes`` (``num_embeds_ada_norm``: the label
  embedding's extra row, trained by label dropout). Both branches run in one batched call on [cond, uncond] (the
  host's order) and F = F_u + g (F_c - F_u) for g > 1.
* Learned sigma: the network predicts 2C channels [epsilon, variance]; the chain uses the first C (the host applies
  guidance to those only). The learned variance is not used: the moment-matched covariance replaces it.
* Decoding: ``vae.decode(latents / scaling_factor)`` and ``VaeImageProcessor().postprocess`` (the host has no
  image processor), as the host does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from numbers import Integral, Number
from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from .base import Family, Job, condition_key, guidance_settings, guided, learned_sigma_call, postprocess, work_dtype


class DiT(Family):
    name = "DiT (DiTTransformer2DModel, class-conditional)"
    hosts = ("DiTPipeline",)
    model = "transformer"
    model_classes = ("DiTTransformer2DModel",)
    conditioning = ("class_labels",)

    @classmethod
    def host_values(cls, pipeline: Any) -> dict[str, Any]:
        """DiTPipeline keeps ``id2label`` only as its inverted ``labels`` (word -> id), not in its config."""
        labels = getattr(pipeline, "labels", None) or {}
        words: dict[str, list[str]] = {}
        for word, index in labels.items():
            words.setdefault(str(index), []).append(word)
        return {"id2label": {k: ", ".join(v) for k, v in words.items()}} if words else {}

    def label_ids(self, class_labels: int | str | Sequence[int | str] | torch.Tensor) -> list[int]:
        """Class ids from ints (numpy integers included), words (the host's ``get_label_ids``), a sequence of them
        or a tensor / numpy array of ids, checked against the model: a float such as 1.0 is refused, not rounded."""
        if isinstance(class_labels, (torch.Tensor, np.ndarray)):
            class_labels = class_labels.reshape(-1).tolist()
        elif isinstance(class_labels, (Number, str, np.generic)) or not isinstance(class_labels, Iterable):
            class_labels = [class_labels]  # one label (numpy integers count as ids); a float is refused below
        labels = list(class_labels)
        if not labels:
            raise ValueError("`class_labels` must name at least one class.")
        words = [label for label in labels if isinstance(label, str)]
        if words:
            if not getattr(self.host, "labels", None):
                raise ValueError(
                    f"`class_labels` {words} are words, but the DiT pipeline has no `id2label`: pass class ids."
                )
            known = self.host.labels
            unknown = [word for word in words if word not in known]
            if unknown:  # before the host's get_label_ids, whose message lists every word (1000 for ImageNet)
                shown = ", ".join(repr(word) for word in sorted(known)[:3])
                raise ValueError(
                    f"`class_labels`: {unknown[0]!r} is not a word of the pipeline's `id2label` (its {len(known)} "
                    f"words: {shown}, ...); pass one of them or a class id."
                )
            ids = dict(zip(words, self.host.get_label_ids(words), strict=True))
            labels = [ids[label] if isinstance(label, str) else label for label in labels]
        num_classes = self.host.transformer.config.num_embeds_ada_norm
        bad = [
            label
            for label in labels
            if isinstance(label, bool) or not isinstance(label, Integral) or not 0 <= label < num_classes
        ]
        if bad:
            raise ValueError(
                f"`class_labels` must be class ids in [0, {num_classes}) or words of the pipeline's `id2label`; "
                f"got {bad}."
            )
        return [int(label) for label in labels]

    def prepare(
        self,
        scheduler: Any,
        *,
        class_labels: int | str | Sequence[int | str] | torch.Tensor | None = None,
        guidance_scale: float | None = None,
        generator: Any = None,
        latents: torch.Tensor | None = None,
        device: torch.device | None = None,
    ) -> Job:
        """The chain for ``class_labels`` (one image each), DiT's call arguments and defaults.

        Args:
            class_labels: class ids, words of the host's ``id2label`` (``get_label_ids``), or a tensor of ids.
            guidance_scale: g; above 1 the null class is the unconditional branch, F = F_u + g (F_c - F_u) on the
                first C output channels (the host's default, 4).
            generator, latents: the starting latents N(0, I) (shape (N, C, sample_size, sample_size)).
        """
        model = self.host.transformer
        if class_labels is None:
            raise ValueError("DiT needs `class_labels`: class ids or words of the pipeline's `id2label`.")
        labels = self.label_ids(class_labels)
        guidance_scale = self.default("guidance_scale", guidance_scale)
        cfg = guidance_scale > 1
        config = model.config
        channels, size = config.in_channels, config.sample_size
        shape = (len(labels), channels, size, size)
        if isinstance(generator, list) and len(generator) != len(labels):
            raise ValueError(f"{len(generator)} generators were passed for {len(labels)} `class_labels`.")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=model.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(
                f"`latents` must have shape {shape} for these `class_labels`; got {tuple(latents.shape)}."
            )
        start = latents.to(device) * scheduler.init_noise_sigma
        null = [config.num_embeds_ada_norm] * len(labels) if cfg else []
        class_input = torch.tensor(labels + null, device=device)
        call = learned_sigma_call(model, class_labels=class_input)
        return Job(
            latents=start.to(work_dtype(model.dtype)),
            predict=guided(call, guidance_scale if cfg else None, cond_first=True),
            finish=self.decode,
            extra={
                "condition": condition_key(torch.tensor(labels).reshape(-1, 1)),
                "guidance": guidance_settings(cfg, guidance_scale),
            },
        )

    def decode(self, latents: torch.Tensor, output_type: str) -> Any:
        """The host's decoding: ``vae.decode(latents / scaling_factor)``, then images in [0, 1]."""
        if output_type == "latent":
            return latents
        vae = self.host.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return postprocess(images, output_type)
