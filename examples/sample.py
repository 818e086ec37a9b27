"""The main job: sample a pretrained diffusers model with moment-matching Gibbs sampling and write a PNG grid.

Default: the shipped 8x8 digits DDPM (``examples/checkpoints/digits-ddpm``), no network needed.

    python examples/sample.py                                      # digits, MomentMatchingGibbsPipeline
    python examples/sample.py --covariance full --steps 20         # Jacobian (full) covariance, 20 levels
    python examples/sample.py --model examples/checkpoints/digits-dsm-sigma0.5 --steps 50   # one noise level
    python examples/sample.py --mode drop-in --covariance isotropic --gibbs-sweeps 2        # DDPMPipeline loop

With the network (Hub ids are real code paths; offline they fail with a message saying what to pass instead):

    python examples/sample.py --model google/ddpm-cifar10-32 --steps 50 --covariance diagonal --num-probes 2
    python examples/sample.py --model google/ddpm-celebahq-256 --steps 50 --batch-size 4
    python examples/sample.py --model google/ncsnpp-celebahq-256 --steps 100 --batch-size 1
    python examples/sample.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --covariance diagonal \\
        --prompt "a photograph of an astronaut riding a horse" --steps 25 --batch-size 1
    python examples/sample.py --model stabilityai/stable-diffusion-xl-base-1.0 --covariance diagonal \\
        --prompt "a photograph of an astronaut riding a horse" --steps 25 --batch-size 1 --dtype float16
    python examples/sample.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --mode drop-in \\
        --prompt "a photograph of an astronaut riding a horse" --steps 25 --batch-size 1

``--mode pipeline`` runs the full method on any supported model family (unconditional UNets, Stable Diffusion,
SDXL, ...; see ``mmgibbs.families``): ``MomentMatchingGibbsPipeline.from_pipe(pipe)`` over the loaded pipeline's
own components, every covariance structure, classifier-free guidance inside the denoiser. ``--mode drop-in``
swaps ``MMGibbsScheduler`` into the loaded pipeline and runs the pipeline's own loop (``none``/``isotropic``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from diffusers import DiffusionPipeline
from PIL import Image

from mmgibbs import COVARIANCES, MMGibbsScheduler, MomentMatchingGibbsPipeline

DEFAULT_MODEL = Path(__file__).resolve().parent / "checkpoints" / "digits-ddpm"


def load_pipeline(model: str, dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """A pipeline from a local folder or a Hub id; a Hub id that cannot be fetched explains what to pass."""
    path = Path(model)
    kwargs = {} if dtype == torch.float32 else {"torch_dtype": dtype}
    if path.exists():
        index = json.loads((path / "model_index.json").read_text())
        if index.get("_class_name") == MomentMatchingGibbsPipeline.__name__:
            return MomentMatchingGibbsPipeline.from_pretrained(path, **kwargs)
        return DiffusionPipeline.from_pretrained(path, **kwargs)
    try:
        return DiffusionPipeline.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as err:  # huggingface_hub's offline/connection errors are OSErrors
        raise SystemExit(
            f"Could not load {model!r}: it is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(err).__name__}: {str(err).splitlines()[0]}).\nOffline, pass a local folder saved with "
            "`pipe.save_pretrained(folder)` (or a Hub snapshot) as --model, e.g. --model "
            f"{DEFAULT_MODEL}"
        ) from err


def scheduler_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The MMGibbsScheduler settings the command line asks for."""
    settings: dict[str, Any] = {
        "covariance": args.covariance,
        "gibbs_sweeps": args.gibbs_sweeps,
        "transition": args.transition,
        "eta": args.eta,
        "num_probes": args.num_probes,
        "final_output": args.final_output,
    }
    if args.sigma is not None:
        settings.update(schedule="single_level", sigma=args.sigma)
    return settings


def build_sampler(pipe: DiffusionPipeline, mode: str, settings: dict[str, Any]) -> DiffusionPipeline:
    """``MomentMatchingGibbsPipeline.from_pipe(pipe)`` over the pipeline's own components (``pipeline``), or the
    pipeline's own loop with ``MMGibbsScheduler`` swapped in (``drop-in``)."""
    if mode == "drop-in" and not isinstance(pipe, MomentMatchingGibbsPipeline):
        pipe.scheduler = MMGibbsScheduler.from_config(pipe.scheduler.config, **settings)
        return pipe
    try:
        return MomentMatchingGibbsPipeline.from_pipe(pipe, **settings)
    except ValueError as err:  # an unsupported family: the message names the supported ones
        raise SystemExit(f"--mode pipeline: {err}\nUse --mode drop-in (covariance 'none' or 'isotropic').") from err


def denoiser_of(sampler: DiffusionPipeline) -> torch.nn.Module:
    """The sampler's denoising network (``unet`` or ``transformer``)."""
    unet = getattr(sampler, "unet", None)
    return unet if unet is not None else sampler.transformer


def count_forwards(module: torch.nn.Module) -> tuple[list[int], Any]:
    """Record the batch size of every forward call of ``module``; returns (sizes, hook handle)."""
    sizes: list[int] = []

    def hook(_module: torch.nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        first = inputs[0] if inputs else next(iter(kwargs.values()))
        sizes.append(int(first.shape[0]))

    return sizes, module.register_forward_pre_hook(hook, with_kwargs=True)


def to_uint8(images: Any) -> np.ndarray:
    """PIL images or arrays in [0, 1] (NHWC) to uint8 NHWC."""
    if isinstance(images, list):
        return np.stack([np.asarray(im) for im in images])
    return (np.clip(np.asarray(images), 0, 1) * 255).round().astype(np.uint8)


def save_grid(images: np.ndarray, path: Path, width: int = 512) -> None:
    """Tile uint8 NHWC images into one PNG, one pixel apart, upscaled with nearest pixels to about ``width``."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 128, dtype=np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = im
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid)
    scale = max(1, width // picture.width)
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(path)


def sample(sampler: DiffusionPipeline, args: argparse.Namespace, batch_size: int, seed: int) -> tuple[Any, dict]:
    """Run the sampler once; returns (uint8 images, cost record)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    sizes, handle = count_forwards(denoiser_of(sampler))
    kwargs: dict[str, Any] = {"num_inference_steps": args.steps, "generator": generator, "output_type": "np"}
    if args.prompt is not None:
        kwargs.update(prompt=[args.prompt] * batch_size, guidance_scale=args.guidance_scale)
    else:
        kwargs["batch_size"] = batch_size
    start = time.perf_counter()
    try:
        out = sampler(**kwargs)
    finally:
        handle.remove()
    seconds = time.perf_counter() - start
    cost = {
        "unet_forwards": len(sizes),
        "backward_passes": getattr(out, "num_backward", 0),
        "jvps": getattr(out, "num_jvp", 0),
        "seconds": seconds,
    }
    return to_uint8(out.images), cost


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="local pipeline folder or Hub id")
    parser.add_argument("--mode", choices=["pipeline", "drop-in"], default="pipeline")
    parser.add_argument("--covariance", choices=COVARIANCES, default="isotropic")
    parser.add_argument("--num-probes", type=int, default=1, help="Hutchinson probes (covariance diagonal)")
    parser.add_argument("--gibbs-sweeps", type=int, default=1, help="Gibbs sweeps per noise level")
    parser.add_argument("--transition", choices=["ancestral", "gibbs"], default="ancestral")
    parser.add_argument("--eta", type=float, default=1.0, help="ancestral noise share: 1 DDPM-like, 0 DDIM-like")
    parser.add_argument("--final-output", choices=["sample", "mean"], default="sample")
    parser.add_argument("--sigma", type=float, default=None, help="run the single-level chain at this sigma")
    parser.add_argument("--steps", type=int, default=20, help="noise levels (annealed) or sweeps (single level)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default=None, help="text prompt (text-to-image pipelines)")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--out", type=Path, default=Path("samples.png"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    state = PartialState()  # accelerate picks the device (CUDA, MPS or CPU)
    dtype = getattr(torch, args.dtype)
    if dtype != torch.float32 and state.device.type == "cpu":
        print(f"note: {args.dtype} on CPU is slow; the moments are computed in float32 either way")
    pipe = load_pipeline(args.model, dtype)
    sampler = build_sampler(pipe, args.mode, scheduler_settings(args)).to(state.device)
    sampler.set_progress_bar_config(disable=True)
    images, cost = sample(sampler, args, args.batch_size, args.seed)
    save_grid(images, args.out)
    cfg = sampler.scheduler.config
    per_sample = cost["unet_forwards"] + cost["backward_passes"] + cost["jvps"]
    network = type(denoiser_of(sampler)).__name__
    print(f"model:    {args.model} ({network}, {cfg.noise_family} noise, {cfg.prediction_type})")
    print(
        f"sampler:  {type(sampler).__name__} + MMGibbsScheduler, covariance={cfg.covariance}, "
        f"schedule={cfg.schedule}{f' sigma={cfg.sigma}' if cfg.schedule == 'single_level' else ''}, "
        f"{args.steps} {'sweeps' if cfg.schedule == 'single_level' else 'levels'} x {cfg.gibbs_sweeps} sweeps, "
        f"transition={cfg.transition} (eta={cfg.eta})"
    )
    print(
        f"cost:     {cost['unet_forwards']} UNet forward passes, {cost['backward_passes']} backward passes, "
        f"{cost['jvps']} JVPs (batched; {per_sample} passes per sample), {cost['seconds']:.1f} s on {state.device}"
    )
    print(f"wrote:    {args.out} ({len(images)} samples)")


if __name__ == "__main__":
    main()
