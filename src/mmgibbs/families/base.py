"""What every model family gives the Gibbs kernel, and the pieces families share.

A family adapts one kind of host pipeline (Stable Diffusion, SD3, Flux, ...). From the host's usual call arguments
it prepares a :class:`Job`:

* ``latents``: the first model-frame sample x_t (from the host's own ``prepare_latents``);
* ``predict(model_input, timestep) -> F``: the network output in the scheduler's prediction type, with the
  conditioning and classifier-free guidance (CFG) inside. Both CFG branches run in one batched call and are
  combined as F_cfg = F_u + g (F_c - F_u). Every prediction type is affine in F with the branches' common
  coefficients (mu = c_skip x_t + c_out F), so mu_cfg = mu_u + g (mu_c - mu_u): the guided denoiser is a denoiser
  like any other, and its Jacobian products (diagonal, projection, full covariances) go through both branches;
* ``finish(latents, output_type)``: decoding and post-processing with the host's VAE and image processor;
* ``extra["condition"]``: one row per image identifying what the denoiser is conditioned on (the class id, or the
  prompt embeddings of both guidance branches, flattened: :func:`condition_key`, formed on demand by
  :func:`condition_of`), and ``extra["guidance"]``: the guidance settings in effect (``guidance_scale`` None
  without CFG). A calibrated covariance table is fitted to one guided denoiser, and keeps a group of clusters per
  condition (``mmgibbs.calibration``): these tell it which.

The kernel never sees a prompt, a VAE or a packed latent: it sees ``(y, step) -> mu``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import diffusers
import torch
from diffusers.image_processor import VaeImageProcessor

from ..checks import check_embeddings, check_shape

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: the pipeline's number of levels when the call names none (diffusers' pipelines' default)
DEFAULT_STEPS = 50


@dataclass
class Job:
    """One sampling run, prepared by a family for :func:`mmgibbs.gibbs.sample`.

    Args:
        latents: the model-frame sample x_t at step ``start``.
        predict: ``(model_input, timestep) -> prediction`` (conditioning and guidance inside).
        finish: ``(clean latents, output_type) -> images`` (decoding inside).
        start: the first step of the schedule (img2img / inpainting start below pure noise).
        known: ``(x_known, keep)`` for inpainting: clean latents and a mask, 1 where x_known is kept.
        callback_name: the name under which callbacks receive the sample (``"latents"`` or ``"sample"``).
        extra: ``"condition"`` (a float64 CPU tensor, one row per image) and ``"guidance"`` (a dict), see the
            module docstring.
    """

    latents: torch.Tensor
    predict: Predict
    finish: Callable[[torch.Tensor, str], Any]
    start: int = 0
    known: tuple[torch.Tensor, torch.Tensor] | None = None
    callback_name: str = "latents"
    extra: dict[str, Any] = field(default_factory=dict)


class Family:
    """One model family. Subclasses set the class attributes and implement :meth:`prepare`.

    Attributes:
        name: a human-readable family name, listed in errors.
        hosts: the diffusers pipeline classes the family serves (``from_pipe`` accepts them).
        model: the component that is the denoiser (``"unet"`` or ``"transformer"``).
        model_classes: the class names that component may have.
    """

    name: ClassVar[str]
    hosts: ClassVar[tuple[str, ...]]
    model: ClassVar[str] = "unet"
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: prompt embeddings the family takes: argument -> (ndim, host component, its config key giving the width)
    embeddings: ClassVar[dict[str, tuple[int, str, str]]] = {}
    #: the call arguments that hold one row per image (a prompt, its embeddings, a class label): calibration takes
    #: one row per clean sample (or one for all) of these; every other argument applies to all images
    conditioning: ClassVar[tuple[str, ...]] = ()

    def __init__(self, host: Any):
        self.host = host

    @classmethod
    def matches(cls, host_class: str | None, model: torch.nn.Module | None) -> bool:
        if host_class is not None:
            return host_class in cls.hosts
        return model is not None and any(c.__name__ in cls.model_classes for c in type(model).__mro__)

    @classmethod
    def host_values(cls, pipeline: Any) -> dict[str, Any]:
        """Host ``__init__`` values the host pipeline keeps outside its config (``from_pipe`` adds them to
        ``host_config``; e.g. DiT's ``id2label``). Default: none."""
        return {}

    def set_timesteps(
        self, scheduler: Any, num_inference_steps: int | None, device: Any, arguments: dict[str, Any]
    ) -> None:
        """Lay out the schedule before :meth:`prepare` (``num_inference_steps`` None: :data:`DEFAULT_STEPS`; the
        flow families override it: their shift depends on the image size). Custom ``timesteps`` or ``sigmas`` in
        ``arguments`` (where the host's call takes them) are the levels instead, as the host's
        ``retrieve_timesteps`` passes them (the scheduler refuses them beside ``num_inference_steps``)."""
        custom = {k: arguments[k] for k in ("timesteps", "sigmas") if arguments.get(k) is not None}
        if custom:
            scheduler.set_timesteps(num_inference_steps, device=device, **custom)
            return
        steps = DEFAULT_STEPS if num_inference_steps is None else num_inference_steps
        scheduler.set_timesteps(steps, device=device)

    def prepare(self, scheduler: Any, **kwargs: Any) -> Job:
        """The :class:`Job` for these call arguments (the host pipeline's own names and defaults)."""
        raise NotImplementedError

    def check_embeddings(self, arguments: dict[str, Any]) -> None:
        """The prompt embeddings among ``arguments`` against :attr:`embeddings` (torch tensors of the host's
        width, one batch for all of them), before the host sees them; a width the host's components do not state
        is not checked. (SDXL's host reshaped a pooled batch of another size into its width.)"""
        rows = {}
        for name, (ndim, component, key) in self.embeddings.items():
            if arguments.get(name) is None:
                continue
            width = getattr(getattr(getattr(self.host, component, None), "config", None), key, None)
            width = width if isinstance(width, int) else None
            check_embeddings(arguments[name], name, ndim, width, f"the {component}'s {key}")
            rows[name] = len(arguments[name])
        if len(set(rows.values())) > 1:
            raise ValueError(
                "The prompt embeddings must have one row per prompt each; got "
                + ", ".join(f"`{k}` {n}" for k, n in rows.items())
                + "."
            )

    # ------------------------------------------------------------------ shared helpers
    def default(self, name: str, value: Any) -> Any:
        """``value``, or the host pipeline's own default for its call argument ``name``."""
        return host_default(self.host, name, value)


def sibling_host(host: Any, class_name: str, values: dict[str, Any] | None = None) -> Any:
    """A ``class_name`` diffusers pipeline over ``host``'s own components, scheduler and config (``host`` itself
    when it is one), e.g. the inpainting host of a text-to-image pipeline; ``values``: what the host keeps
    outside its config (:meth:`Family.host_values`)."""
    if type(host).__name__ == class_name:
        return host
    cls = getattr(diffusers, class_name)
    takes = inspect.signature(cls.__init__).parameters
    parts = {k: v for k, v in host.components.items() if k in takes}
    parts.update({k: v for k, v in host.config.items() if k in takes and k not in parts and not k.startswith("_")})
    parts.update({k: v for k, v in (values or {}).items() if k in takes})
    sibling = cls(**parts)
    sibling.set_progress_bar_config(disable=True)
    return sibling


def host_default(host: Any, name: str, value: Any) -> Any:
    """``value``, or ``host``'s own default for its call argument ``name``."""
    if value is not None:
        return value
    parameter = inspect.signature(type(host).__call__).parameters.get(name)
    return None if parameter is None else parameter.default


def check_latents(
    latents: torch.Tensor | None, batch: int, channels: int, height: Any, width: Any, factor: int, packed: bool = False
) -> None:
    """``latents`` passed to a host's ``prepare_latents`` have the shape it would draw: (batch, C, height / f,
    width / f), or Flux's packed (batch, (height / 2f) (width / 2f), 4 C'), C = ``channels`` (the model's input
    channels). Hosts take any shape there: a smaller one runs silently at another size, others fail inside the
    network; this names ``latents`` and the shape instead."""
    if latents is None:
        return
    h, w = int(height) // factor, int(width) // factor
    shape = (batch, (h // 2) * (w // 2), channels) if packed else (batch, channels, h, w)
    what = f"{batch} images of {height}x{width} pixels; pass `height`/`width` for another size"
    check_shape(latents, shape, "latents", what)


def refuse_unused(family: str, **arguments: Any) -> None:
    """A clear error for call arguments a family does not take (passed as anything but None)."""
    passed = sorted(k for k, v in arguments.items() if v is not None)
    if passed:
        raise ValueError(f"{family} takes no {', '.join(f'`{k}`' for k in passed)}.")


def guided(
    call: Predict, guidance_scale: float | None, guidance_rescale: float = 0.0, cond_first: bool = False
) -> Predict:
    """Classifier-free guidance as part of the prediction: ``call`` sees the doubled batch [uncond, cond] (or
    [cond, uncond] with ``cond_first``) and returns both branches; F = F_u + g (F_c - F_u), optionally rescaled
    towards the conditional branch's std (Lin et al. 2023, diffusers' ``rescale_noise_cfg``). ``None``: no CFG."""
    if guidance_scale is None:
        return call

    def predict(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        first, second = call(torch.cat([model_input, model_input]), timestep).chunk(2)
        cond, uncond = (first, second) if cond_first else (second, first)
        out = uncond + guidance_scale * (cond - uncond)
        if guidance_rescale > 0:
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

            out = rescale_noise_cfg(out, cond, guidance_rescale=guidance_rescale)
        return out

    return predict


def learned_variance(model: torch.nn.Module) -> int | None:
    """C when ``model`` predicts a learned variance next to its prediction (``out_channels == 2 * in_channels``,
    e.g. improved-DDPM, DiT, PixArt), else ``None``."""
    config = getattr(model, "config", None)
    channels = getattr(config, "in_channels", None)
    out = getattr(config, "out_channels", None)
    return channels if channels is not None and out == 2 * channels else None


def drop_learned_variance(output: torch.Tensor, channels: int | None) -> torch.Tensor:
    """The first ``channels`` output channels: the prediction (epsilon, x0 or v) without the learned variance.

    The learned variance is not used: the Gibbs draw's covariance (isotropic, or the model's own Jacobian,
    Sigma = sigma^2 d mu / d y) takes its place. ``channels=None`` returns ``output`` unchanged."""
    return output if channels is None else output[:, :channels]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The chain's dtype for a model or latents of ``dtype``: float64 stays float64, anything else (half precision
    included) is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chain_dtype(latents: torch.Tensor) -> torch.Tensor:
    """``latents`` in the chain's dtype (:func:`work_dtype`): float64 for float64 models, else float32."""
    return latents.to(work_dtype(latents.dtype))


def learned_sigma_call(model: torch.nn.Module, **conditioning: Any) -> Predict:
    """``(model_input, t) -> model(model_input, timestep=t, **conditioning)`` in the model's dtype, ``t`` repeated
    per row, without the learned variance (:func:`drop_learned_variance`): how DiT and PixArt call their
    transformers, on the batch of ``conditioning`` (both guidance branches with CFG)."""
    keep = learned_variance(model)

    def call(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        out = model(
            model_input.to(model.dtype),
            timestep=timestep.expand(len(model_input)),
            return_dict=False,
            **conditioning,
        )[0]
        return drop_learned_variance(out, keep)

    return call


def condition_key(*parts: torch.Tensor | None) -> Callable[[], torch.Tensor]:
    """What a guided denoiser is conditioned on, one row per image, as a function that forms it: every conditioning
    tensor (N, ...) given (None left out) flattened and concatenated, float64 on the CPU. Two images have the same
    key exactly when their denoisers are the same (same class, same prompt embeddings in both guidance branches).
    Formed only where a conditional table is read or calibrated (:func:`condition_of`): the copy to the CPU reads
    the device, which a call without such a table must not do."""
    return lambda: torch.cat([p.detach().flatten(1).to("cpu", torch.float64) for p in parts if p is not None], dim=1)


def condition_of(job: Any) -> torch.Tensor | None:
    """The job's condition keys (:func:`condition_key`), formed now; None for an unconditional job."""
    key = job.extra.get("condition")
    return key() if callable(key) else key


def guidance_settings(cfg: bool, guidance_scale: float, **more: float) -> dict[str, float | None]:
    """The guidance in effect (``Job.extra["guidance"]``): ``guidance_scale`` and any further CFG settings (e.g.
    ``guidance_rescale``), each None without classifier-free guidance (then the denoiser is the conditional one,
    whatever the scale)."""
    values = {"guidance_scale": guidance_scale, **more}
    return {k: float(v) if cfg and v is not None else None for k, v in values.items()}


def postprocess(images: torch.Tensor, output_type: str, processor: VaeImageProcessor | None = None) -> Any:
    """Images in [-1, 1] (N, C, H, W) to ``output_type`` with diffusers' ``VaeImageProcessor``, in float32 (float64
    kept: :func:`work_dtype`)."""
    images = images.to(work_dtype(images.dtype))
    return (processor or VaeImageProcessor()).postprocess(images, output_type=output_type)
