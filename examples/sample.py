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
    python examples/sample.py --model facebook/DiT-XL-2-256 --class-labels 207 360 --steps 25 --batch-size 2

``--mode pipeline`` runs the full method on any supported model family (unconditional UNets, Stable Diffusion,
SDXL, ...; see ``mmgibbs.families``): ``MomentMatchingGibbsPipeline.from_pipe(pipe)`` over the loaded pipeline's
own components, every covariance structure, classifier-free guidance inside the denoiser. ``--mode drop-in``
swaps ``MMGibbsScheduler`` into the loaded pipeline and runs the pipeline's own loop (``none``/``isotropic``).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from diffusers import DiffusionPipeline
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from PIL import Image

from mmgibbs import COVARIANCES, MMGibbsScheduler, MomentMatchingGibbsPipeline
from mmgibbs.calibration import TABLE_FILE
from mmgibbs.moments import CALIBRATED_COVARIANCES, JACOBIAN_COVARIANCES

DEFAULT_MODEL = Path(__file__).resolve().parent / "checkpoints" / "digits-ddpm"
#: the covariances whose cost --num-probes sets (Hutchinson probes; Jacobian products of the calibrated correction)
PROBE_COVARIANCES = ("diagonal", "calibrated_jacobian")


def pipeline_class(index: dict[str, Any]) -> str | None:
    """The pipeline class a ``model_index.json`` names (a [module, class] pair when saved diffusers' custom-class
    way)."""
    name = index.get("_class_name")
    return name[-1] if isinstance(name, list) else name


def load_pipeline(model: str, dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """A pipeline from a local folder or a Hub id; a Hub id that cannot be fetched explains what to pass."""
    path = Path(model)
    kwargs = {} if dtype == torch.float32 else {"torch_dtype": dtype}
    if path.exists():
        index = json.loads((path / "model_index.json").read_text())
        if pipeline_class(index) == MomentMatchingGibbsPipeline.__name__:
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
    """The MMGibbsScheduler settings the command line asks for (flags left out keep the scheduler's defaults)."""
    settings: dict[str, Any] = {
        "covariance": args.covariance,
        "gibbs_sweeps": args.gibbs_sweeps,
        "transition": args.transition,
        "final_output": args.final_output,
    }
    settings.update({k: v for k, v in (("eta", args.eta), ("num_probes", args.num_probes)) if v is not None})
    if args.sigma is not None:
        settings.update(schedule="single_level", sigma=args.sigma)
    return settings


def check_loaded(pipe: DiffusionPipeline, args: argparse.Namespace) -> None:
    """The model checks of :func:`check_model` for a pipeline loaded from the Hub (a local folder was checked
    before loading), before any sampling."""
    if Path(args.model).expanduser().exists():
        return
    parser = build_parser()
    components = {k: [None, None] if v is None else ["", type(v).__name__] for k, v in pipe.components.items()}
    host = getattr(pipe.config, "host_pipeline", None)
    check_model(parser, args, {"_class_name": type(pipe).__name__, "host_pipeline": host, **components})
    if args.covariance in CALIBRATED_COVARIANCES and getattr(pipe.scheduler, "covariance_table", None) is None:
        parser.error(_NO_TABLE.format(covariance=args.covariance, model=args.model))


def check_table_guidance(sampler: DiffusionPipeline, args: argparse.Namespace) -> None:
    """A table calibrated for a guided text-to-image model is read at the guidance scale it was fitted with (the
    pipeline would refuse the call; here it is an argparse error naming --guidance-scale, before any sampling)."""
    table = getattr(sampler.scheduler, "covariance_table", None)
    if (
        args.covariance not in CALIBRATED_COVARIANCES
        or table is None
        or not isinstance(sampler, MomentMatchingGibbsPipeline)
    ):
        return
    fitted = (table.settings.get("guidance") or {}).get("guidance_scale")
    used = sampler.family(sampler.scheduler).default("guidance_scale", args.guidance_scale)
    if fitted is not None and used is not None and float(used) != float(fitted):
        given = f"--guidance-scale {args.guidance_scale!r}" if args.guidance_scale is not None else "the default"
        build_parser().error(
            f"--guidance-scale: the table in {args.model} was calibrated with guidance_scale {fitted!r}, and "
            f"{given} samples at {float(used)!r}: pass --guidance-scale {fitted!r} (or calibrate for this scale)"
        )


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
        kwargs["prompt"] = [args.prompt] * batch_size
    elif args.class_labels is not None:  # DiT: the labels in turn, one image each
        kwargs["class_labels"] = [args.class_labels[i % len(args.class_labels)] for i in range(batch_size)]
    else:
        kwargs["batch_size"] = batch_size
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale
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


def _number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False) -> Any:
    """An argparse type: a finite ``kind`` in [low, high] (``low_open``: (low, high]), with argparse's own error."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
        ok = math.isfinite(value) and (low is None or (value > low if low_open else value >= low))
        if not ok or (high is not None and value > high):
            bounds = f"{'>' if low_open else '>='} {low:g}" if high is None else f"in [{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number {bounds}")
        return value

    return parse


def class_label(text: str) -> int | str:
    """A --class-labels entry: a class id (digits) or a word of the pipeline's id2label."""
    return int(text) if text.isdigit() else text


#: the pipelines that take --class-labels (class-conditional)
CLASS_PIPELINES = ("DiTPipeline",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    positive_int = _number(int, 1)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="local pipeline folder or Hub id")
    parser.add_argument("--mode", choices=["pipeline", "drop-in"], default="pipeline")
    parser.add_argument("--covariance", choices=COVARIANCES, default="isotropic")
    parser.add_argument(
        "--num-probes",
        type=positive_int,
        default=None,
        help="Hutchinson probes (diagonal) or Jacobian products (calibrated_jacobian); default 1",
    )
    parser.add_argument("--gibbs-sweeps", type=positive_int, default=1, help="Gibbs sweeps per noise level")
    parser.add_argument("--transition", choices=["ancestral", "gibbs"], default="ancestral")
    parser.add_argument(
        "--eta",
        type=_number(float, 0.0, 1.0),
        default=None,
        help="ancestral noise share: 1 DDPM-like (default), 0 DDIM",
    )
    parser.add_argument("--final-output", choices=["sample", "mean"], default="sample")
    parser.add_argument(
        "--sigma", type=_number(float, 0.0, low_open=True), default=None, help="run the single-level chain at sigma"
    )
    parser.add_argument("--steps", type=positive_int, default=20, help="noise levels (annealed) or sweeps (1 level)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default=None, help="text prompt (text-to-image pipelines)")
    parser.add_argument(
        "--class-labels", nargs="+", type=class_label, default=None, help="DiT: class ids or id2label words, in turn"
    )
    parser.add_argument(
        "--guidance-scale",
        type=_number(float),
        default=None,
        help="with --prompt or --class-labels (default: the pipeline's own)",
    )
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--out", type=Path, default=Path("samples.png"), help="image file to write (.png, .jpg, ...)")
    return parser


def _check_out(parser: argparse.ArgumentParser, out: Path) -> None:
    """--out is a new or existing image file in a folder this process can write to."""
    if out.is_dir():
        parser.error(f"--out {out} is a folder; pass an image file name, e.g. {out / 'samples.png'}")
    Image.init()
    image_format = Image.registered_extensions().get(out.suffix.lower())
    if image_format is None or image_format not in Image.SAVE:
        parser.error(
            f"--out {out}: {out.suffix or 'no extension'} is not an image format PIL writes (.png, .jpg, ...)"
        )
    check_writable(parser, "--out", out)


def check_writable(parser: argparse.ArgumentParser, flag: str, path: Path, folder: Path | None = None) -> None:
    """``flag``'s ``path`` can be created: ``folder`` (default: its parent) exists and this process can write there
    (permissions, read-only mounts and pseudo file systems alike: a file is created and removed)."""
    folder = path.parent if folder is None else folder
    if not folder.is_dir():
        parser.error(f"{flag} {path}: the folder {folder} does not exist")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        parser.error(f"{flag} {path}: cannot write to {folder} ({err.strerror or err})")


def _model_index(parser: argparse.ArgumentParser, model: str) -> dict[str, Any] | None:
    """The model_index.json of a local --model folder (None for a Hub id, checked for its form only)."""
    path = Path(model).expanduser()
    if model.strip() and path.exists():
        if not path.is_dir():
            parser.error(f"--model {model} is a file; pass a pipeline folder (with model_index.json) or a Hub id")
        if not (path / "model_index.json").is_file():
            parser.error(
                f"--model {model} has no model_index.json: pass a folder saved with `pipe.save_pretrained(folder)` "
                "(or a Hub snapshot)"
            )
        return json.loads((path / "model_index.json").read_text())
    try:
        validate_repo_id(model)
    except HFValidationError:
        parser.error(f"--model {model!r} is neither an existing folder nor a Hub id ('name' or 'organisation/name')")
    return None


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Everything that can be checked before a model is loaded: --out, --model, flags that contradict each other
    or the model (for a local folder: its model_index.json and scheduler config)."""
    _check_out(parser, args.out)
    if args.mode == "drop-in" and args.covariance in JACOBIAN_COVARIANCES:
        parser.error(
            f"--covariance {args.covariance} needs the model's Jacobian, which a pipeline's own loop (--mode drop-in) "
            "does not give the scheduler: use --mode pipeline (MomentMatchingGibbsPipeline), or --covariance none "
            "or isotropic"
        )
    if args.num_probes is not None and args.covariance not in PROBE_COVARIANCES:
        parser.error(
            "--num-probes sets the Hutchinson probes of --covariance diagonal or the Jacobian products of "
            f"calibrated_jacobian, not {args.covariance}"
        )
    if args.eta is not None and args.transition == "gibbs":
        parser.error("--eta sets the ancestral transition's noise; --transition gibbs re-noises afresh (no eta)")
    check_conditioning(parser, args, None)
    index = _model_index(parser, args.model)
    if index is not None:
        check_model(parser, args, index, Path(args.model).expanduser())


def check_conditioning(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    index: dict[str, Any] | None,
    hints: tuple[str, str] = ("", " (class ids or id2label words)"),
) -> None:
    """--prompt, --class-labels and --guidance-scale against each other, and (given the model's
    ``model_index.json``) against the model: --prompt iff it has a text encoder, --class-labels iff it is
    class-conditional (:data:`CLASS_PIPELINES`, or a Gibbs folder over one). ``hints`` follow "pass --prompt" and
    "pass --class-labels" in the messages. Shared by sample.py and calibrate.py."""
    if args.prompt is not None and args.class_labels is not None:
        parser.error("--class-labels are a class-conditional model's (DiT); with --prompt pass one of them")
    if args.guidance_scale is not None and args.prompt is None and args.class_labels is None:
        parser.error(
            "--guidance-scale needs --prompt or --class-labels (classifier-free guidance of a conditional model)"
        )
    if index is None:
        return
    name = pipeline_class(index)
    text = index.get("text_encoder") not in (None, [None, None])
    classes = name in CLASS_PIPELINES or index.get("host_pipeline") in CLASS_PIPELINES
    if args.prompt is not None and not text:
        parser.error(f"--prompt: {args.model} ({name}) has no text encoder; it takes no prompt")
    if args.prompt is None and text:
        parser.error(f"{args.model} ({name}) is a text-to-image pipeline: pass --prompt{hints[0]}")
    if args.class_labels is not None and not classes:
        parser.error(f"--class-labels: {args.model} ({name}) is not class-conditional; it takes no class labels")
    if args.class_labels is None and classes:
        parser.error(f"{args.model} ({name}) is class-conditional: pass --class-labels{hints[1]}")


_NO_TABLE = (
    "--covariance {covariance} needs a calibrated covariance table, and {model} was saved without one: calibrate it "
    "once (MomentMatchingGibbsPipeline.calibrate_covariance, then save_pretrained) and pass that folder"
)


def check_model(
    parser: argparse.ArgumentParser, args: argparse.Namespace, index: dict[str, Any], folder: Path | None = None
) -> None:
    """Flags against the model: --prompt iff it has a text encoder, --mode drop-in only over a diffusers pipeline
    with its own loop, and (for a local folder) the sampler settings against its scheduler config."""
    name = pipeline_class(index)
    check_conditioning(parser, args, index)
    if args.mode == "drop-in" and name == MomentMatchingGibbsPipeline.__name__:
        parser.error(
            f"--mode drop-in swaps a diffusers pipeline's scheduler; {args.model} is a {name}: use --mode pipeline"
        )
    if (
        folder is not None
        and args.covariance in CALIBRATED_COVARIANCES
        and not (folder / "scheduler" / TABLE_FILE).is_file()
    ):
        parser.error(_NO_TABLE.format(covariance=args.covariance, model=args.model))
    if folder is not None and (folder / "scheduler").is_dir():
        try:
            MMGibbsScheduler.from_config(
                MMGibbsScheduler.load_config(folder, subfolder="scheduler"), **scheduler_settings(args)
            )
        except (ValueError, TypeError) as err:
            parser.error(f"the sampler settings do not fit {args.model}: {err}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked as far as it can be before any model is loaded (argparse errors, exit code 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    state = PartialState()  # accelerate picks the device (CUDA, MPS or CPU)
    dtype = getattr(torch, args.dtype)
    if dtype != torch.float32 and state.device.type == "cpu":
        print(f"note: {args.dtype} on CPU is slow; the moments are computed in float32 either way")
    pipe = load_pipeline(args.model, dtype)
    check_loaded(pipe, args)
    sampler = build_sampler(pipe, args.mode, scheduler_settings(args)).to(state.device)
    sampler.set_progress_bar_config(disable=True)
    check_table_guidance(sampler, args)
    try:
        images, cost = sample(sampler, args, args.batch_size, args.seed)
    except ValueError as err:  # the pipeline checks its settings and table before its first model call
        build_parser().error(f"the sampler refused this run: {err}")
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
