"""The A/B command: your pipeline's own scheduler against moment-matching Gibbs sampling, at equal model calls.

    python examples/compare.py --model examples/checkpoints/digits-ddpm --steps 10 20     # FD against held-out digits
    python examples/compare.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompt "a photo of a cat" \\
        --steps 10 20 --seeds 0 1 --num-samples 1 --clip-model openai/clip-vit-base-patch32

For every budget of ``--steps`` (model calls per sample) it runs the loaded pipeline with its own scheduler and the
Gibbs sampler (``MomentMatchingGibbsPipeline.from_pipe``) on the same prompts and seeds, and writes into
``--out-dir``: ``grid.png`` (rows: sampler x budget, columns: prompt / seed), ``results.md`` and ``results.json`` (one
record per sampler and budget: model calls forward / backward / JVP, wall time, peak memory, quality where it can be
measured, "not measured" with the reason otherwise). ``mmgibbs.compare.compare`` is the same as a Python function;
docs/compare.md says how budgets are matched and what is measured.

Gibbs settings: name any of --covariance, --eta, --gibbs-sweeps, --num-probes, --transition, --jacobian and those
are used at every budget (the rest at the scheduler's defaults); name none and every budget gets
``mmgibbs.recommend.recommended_settings`` for the model's family and that budget.

Quality: ``fd`` (Frechet distance) against the images of ``--reference-dir`` in the feature space of ``--features``
(``inception``: torchmetrics' FID Inception-v3, when it and its weights are available locally; ``digits``: the
shipped digits classifier, for 1 x 8 x 8 models); without ``--reference-dir`` a 1 x 8 x 8 model is compared against
the 397 held-out digits with the digits classifier. ``clip_score`` for text-to-image models with ``--clip-model`` (a
local CLIP folder or a cached Hub id).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from sample import DEFAULT_MODEL, _model_index, _number, load_pipeline, pipeline_class

from mmgibbs import COVARIANCES, MMGibbsScheduler, MomentMatchingGibbsPipeline
from mmgibbs.compare import (
    IMAGE_SUFFIXES,
    ClipScore,
    FrechetDistance,
    NotMeasured,
    compare,
    inception_features,
    levels_for_budget,
    load_images,
    plan,
)
from mmgibbs.families import Unconditional, family_of, sample_shape
from mmgibbs.moments import JACOBIAN_MODES

#: the shape of one sample the shipped digits classifier takes
DIGITS_SHAPE = (1, 8, 8)
#: command-line flag -> MMGibbsScheduler setting
SETTINGS = {
    "covariance": "covariance",
    "eta": "eta",
    "gibbs_sweeps": "gibbs_sweeps",
    "num_probes": "num_probes",
    "transition": "transition",
    "jacobian": "jacobian",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    positive_int = _number(int, 1)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="local pipeline folder or Hub id")
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
    prompts.add_argument("--prompts", type=Path, default=None, help="a text file, one prompt per line")
    parser.add_argument("--steps", type=positive_int, nargs="+", default=[10, 20], help="budgets: model calls")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--num-samples", type=positive_int, default=4, help="images per prompt and seed")
    parser.add_argument("--out-dir", type=Path, default=Path("compare_out"))
    gibbs = parser.add_argument_group("Gibbs settings (default: the recommendation per budget)")
    gibbs.add_argument("--covariance", choices=COVARIANCES, default=None)
    gibbs.add_argument("--eta", type=_number(float, 0.0, 1.0), default=None)
    gibbs.add_argument("--gibbs-sweeps", type=positive_int, default=None)
    gibbs.add_argument("--num-probes", type=positive_int, default=None)
    gibbs.add_argument("--transition", choices=["ancestral", "gibbs"], default=None)
    gibbs.add_argument("--jacobian", choices=JACOBIAN_MODES, default=None)
    parser.add_argument("--reference-dir", type=Path, default=None, help="reference images for the FD")
    parser.add_argument("--features", choices=["auto", "inception", "digits"], default="auto", help="FD features")
    parser.add_argument("--clip-model", default=None, help="local CLIP folder or cached Hub id (CLIP score)")
    parser.add_argument("--guidance-scale", type=_number(float), default=None, help="text-to-image guidance")
    parser.add_argument("--grid-images", type=positive_int, default=16, help="images per grid cell (tiled)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    return parser


def gibbs_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    """The Gibbs settings the command line names (None: none named, the recommendation applies)."""
    named = {setting: getattr(args, flag) for flag, setting in SETTINGS.items() if getattr(args, flag) is not None}
    return named or None


def read_prompts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str] | None:
    if args.prompts is None:
        if args.prompt is not None and not all(p.strip() for p in args.prompt):
            parser.error("--prompt: a prompt is empty")
        return args.prompt
    if not args.prompts.is_file():
        parser.error(f"--prompts {args.prompts}: not a file (one prompt per line)")
    try:
        lines = [line.strip() for line in args.prompts.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        parser.error(f"--prompts {args.prompts}: cannot be read as text ({err})")
    prompts = [line for line in lines if line]
    if not prompts:
        parser.error(f"--prompts {args.prompts}: holds no prompt")
    return prompts


def _check_out_dir(parser: argparse.ArgumentParser, out: Path) -> None:
    if out.exists() and not out.is_dir():
        parser.error(f"--out-dir {out} is a file; pass a folder (it is created if missing)")
    folder = out if out.is_dir() else out.parent
    if not folder.is_dir():
        parser.error(f"--out-dir {out}: the folder {folder} does not exist")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        parser.error(f"--out-dir {out}: cannot write to {folder} ({err.strerror or err})")


def _local_shape(folder: Path, index: dict[str, Any]) -> tuple[int, ...] | None:
    """One sample's shape of a local unconditional folder, from its UNet config (None if it has none)."""
    config = folder / "unet" / "config.json"
    if index.get("text_encoder") not in (None, [None, None]) or not config.is_file():
        return None
    unet = json.loads(config.read_text())
    size = unet.get("sample_size")
    if not isinstance(size, int) or not isinstance(unet.get("in_channels"), int):
        return None
    return (unet["in_channels"], size, size)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """Every path and flag, before the model is loaded; returns what was read (prompts, shape, reference)."""
    _check_out_dir(parser, args.out_dir)
    prompts = read_prompts(parser, args)
    if len(set(args.steps)) != len(args.steps):
        parser.error(f"--steps: the budgets must be distinct; got {args.steps}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: the seeds must be distinct; got {args.seeds}")
    if args.num_probes is not None and args.covariance not in ("diagonal", "calibrated_jacobian"):
        parser.error("--num-probes sets the Jacobian products of --covariance diagonal or calibrated_jacobian")
    if args.eta is not None and args.transition == "gibbs":
        parser.error("--eta sets the ancestral transition's noise; --transition gibbs re-noises afresh (no eta)")
    if args.guidance_scale is not None and prompts is None:
        parser.error("--guidance-scale needs --prompt or --prompts (a text-to-image model)")
    if args.reference_dir is not None:
        if not args.reference_dir.is_dir():
            parser.error(f"--reference-dir {args.reference_dir}: not a folder")
        count = sum(1 for p in args.reference_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if count < 2:
            parser.error(
                f"--reference-dir {args.reference_dir}: holds {count} image file(s) ({', '.join(IMAGE_SUFFIXES)}); "
                "a Frechet distance needs at least 2"
            )
    if args.clip_model is not None and prompts is None:
        parser.error("--clip-model scores images against their prompts: pass --prompt or --prompts")
    index = _model_index(parser, args.model)
    shape = None
    if index is not None:
        folder = Path(args.model).expanduser()
        text = index.get("text_encoder") not in (None, [None, None])
        if prompts is not None and not text:
            parser.error(f"--prompt: {args.model} ({pipeline_class(index)}) has no text encoder; it takes no prompt")
        if prompts is None and text:
            parser.error(f"{args.model} ({pipeline_class(index)}) is a text-to-image pipeline: pass --prompt")
        shape = _local_shape(folder, index)
        if (folder / "scheduler").is_dir():
            try:
                scheduler = MMGibbsScheduler.from_config(
                    MMGibbsScheduler.load_config(folder, subfolder="scheduler"), **(gibbs_settings(args) or {})
                )
                if gibbs_settings(args) is not None:
                    dim = None if shape is None else int(torch.Size(shape).numel())
                    for budget in args.steps:
                        levels_for_budget(scheduler, budget, dim)
            except (ValueError, TypeError) as err:
                parser.error(f"the Gibbs settings do not fit {args.model}: {err}")
    if args.features == "digits" and shape is not None and shape != DIGITS_SHAPE:
        parser.error(f"--features digits: the digits classifier takes 1 x 8 x 8 samples; {args.model} makes {shape}")
    reference = None
    if args.reference_dir is not None:
        try:
            reference = load_images(args.reference_dir)
        except OSError as err:
            parser.error(f"--reference-dir {args.reference_dir}: an image cannot be read ({err})")
    return {"prompts": prompts, "shape": shape, "reference": reference}


def fd_measure(args: argparse.Namespace, shape: tuple[int, ...] | None, reference: Any, device: Any) -> Any:
    """The FD measure the flags ask for, or the reason it is not measured."""
    digits_model = shape == DIGITS_SHAPE
    features = args.features if args.features != "auto" else ("digits" if digits_model else "inception")
    if reference is None and not digits_model:
        return "no reference images given (--reference-dir)"
    if features == "digits":
        if not digits_model:
            return f"--features digits: the digits classifier takes 1 x 8 x 8 samples, the model makes {shape}"
        from digits import CLASSIFIER_DIR, DigitsClassifier, classifier_features, load_digits_split

        classifier = DigitsClassifier.from_pretrained(CLASSIFIER_DIR).eval()
        if reference is None:
            reference, what = (load_digits_split()[2] + 1) / 2, "the 397 held-out digits"
        else:
            what = f"the {len(reference)} images of {args.reference_dir}"
        return FrechetDistance(
            lambda x: classifier_features(classifier, x * 2 - 1),
            reference,
            f"Frechet distance in the shipped digits classifier's 64-d features against {what}",
        )
    try:
        network = inception_features(device)
    except NotMeasured as err:
        return str(err)
    return FrechetDistance(
        network, reference, f"Frechet distance in Inception-v3 pool features against {args.reference_dir}"
    )


def clip_measure(args: argparse.Namespace, prompts: list[str] | None) -> Any:
    if prompts is None:
        return "the model takes no prompt"
    if args.clip_model is None:
        return "no CLIP model given (--clip-model)"
    try:
        return ClipScore.from_pretrained(args.clip_model)
    except NotMeasured as err:
        return str(err)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = build_parser()
    args = parser.parse_args(argv)
    read = check_arguments(parser, args)
    from accelerate import PartialState

    device = PartialState().device
    clip = clip_measure(args, read["prompts"])
    pipe = load_pipeline(args.model, getattr(torch, args.dtype))
    # a Hub model is checked now, after the download and before any sampling
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    host = pipe.config.host_pipeline if isinstance(pipe, MomentMatchingGibbsPipeline) else type(pipe).__name__
    try:
        family = family_of(host, denoiser)
    except ValueError as err:
        parser.error(f"--model {args.model}: {err}")
    if family is Unconditional and read["prompts"] is not None:
        parser.error(f"--prompt: {args.model} is unconditional; it takes no prompt")
    if family is not Unconditional and read["prompts"] is None:
        parser.error(f"{args.model} is a text-to-image pipeline: pass --prompt")
    shape = tuple(sample_shape(denoiser)) if family is Unconditional else None
    if args.features == "digits" and shape != DIGITS_SHAPE:
        parser.error(f"--features digits: the digits classifier takes 1 x 8 x 8 samples; {args.model} makes {shape}")
    quality = {"fd": fd_measure(args, shape, read["reference"], device), "clip_score": clip}
    extra = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
    try:  # a budget below one level of the named settings, a family compare does not run: before sampling
        plan(
            pipe,
            read["prompts"],
            args.steps,
            gibbs_settings(args),
            args.seeds,
            args.num_samples,
            args.grid_images,
            extra,
        )
    except (ValueError, TypeError) as err:
        parser.error(f"--model {args.model}: {err}")
    records = compare(
        pipe.to(device),
        prompts=read["prompts"],
        steps=args.steps,
        gibbs_settings=gibbs_settings(args),
        seeds=args.seeds,
        num_samples=args.num_samples,
        quality=quality,
        out_dir=args.out_dir,
        call_arguments=extra,
        model_name=args.model,
        grid_images=args.grid_images,
    )
    print((args.out_dir / "results.md").read_text())
    print(f"wrote:    {args.out_dir / 'grid.png'}, results.md, results.json")
    return records


if __name__ == "__main__":
    main()
