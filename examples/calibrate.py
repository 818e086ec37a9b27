"""Calibrate the ``calibrated`` covariance of a model once, and save a pipeline that samples with it.

    python examples/calibrate.py --out calibrated-digits --steps 10 20 50 --digits    # the shipped digits DDPM, data
    python examples/sample.py --model calibrated-digits --covariance calibrated --eta 0 --steps 20

A text-to-image model calibrates for its prompts and guidance scale (its own samples, drawn with its own scheduler
under that guidance, or ``--samples`` latents); several prompts split the samples into equal consecutive blocks,
one per prompt; sampling then uses the same guidance scale:

    python examples/calibrate.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --out calibrated-sd \
        --prompt "a photograph of an astronaut riding a horse" "a red car" --guidance-scale 7.5 --steps 20 \
        --num-samples 512 --batch-size 16 --covariance calibrated_stationary
    python examples/sample.py --model calibrated-sd --covariance calibrated_stationary --eta 0 --steps 20 \
        --prompt "a red car" --guidance-scale 7.5 --batch-size 4

With the network (Hub ids are real code paths; offline they fail with a message saying what to pass instead):

    python examples/calibrate.py --model google/ddpm-cifar10-32 --out calibrated-cifar10 --steps 20 \\
        --num-samples 2048 --sampler-steps 100 --batch-size 256

Split over processes with accelerate (each process calibrates every P-th batch; the statistics are summed in one
reduction, ``mmgibbs.streaming``; the main process saves):

    accelerate launch --multi_gpu --num_processes 2 examples/calibrate.py --out calibrated-digits --digits \
        --steps 10 20 --batch-size 100

For each step count, the table holds the expected posterior covariance of every level of that schedule, low rank
+ diagonal per k-means cluster of the prediction mu(y) (``mmgibbs.calibration``): one model pass per calibration
sample and level. Clean samples are the model's own by default (drawn here with ``--sampler-steps`` levels of its
ancestral sampler, counted apart), ``--samples`` a tensor file of data, ``--digits`` the shipped digits' train split.
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
from digits import NUM_TRAIN
from sample import (
    DEFAULT_MODEL,
    _model_index,
    _number,
    check_conditioning,
    check_writable,
    class_label,
    load_pipeline,
)

from mmgibbs import MomentMatchingGibbsPipeline
from mmgibbs.checks import check_calibration, check_samples
from mmgibbs.families import sample_shape
from mmgibbs.moments import CALIBRATED_COVARIANCES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    positive_int = _number(int, 1)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="local pipeline folder or Hub id")
    parser.add_argument("--out", type=Path, required=True, help="folder to save the calibrated pipeline to")
    parser.add_argument("--steps", type=positive_int, nargs="+", default=[20], help="step counts to calibrate for")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--samples", type=Path, default=None, help="clean samples: a .pt or .npy tensor (N, C, H, W)")
    source.add_argument("--digits", action="store_true", help="the shipped digits' 1400 train images")
    parser.add_argument("--num-samples", type=positive_int, default=None, help="own samples to draw (2048)")
    parser.add_argument("--sampler-steps", type=positive_int, default=None, help="levels of the own-sample run")
    parser.add_argument("--clusters", type=positive_int, default=16)
    parser.add_argument("--rank", type=positive_int, default=None, help="of the table's factors (default 16)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="model batch (default: all at once)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prompt", nargs="+", default=None, help="text-to-image models: the prompts (equal blocks of the samples)"
    )
    parser.add_argument(
        "--class-labels",
        nargs="+",
        type=class_label,
        default=None,
        help="DiT: the classes (equal blocks of the samples)",
    )
    parser.add_argument(
        "--guidance-scale",
        type=_number(float),
        default=None,
        help="with --prompt or --class-labels (default: the pipeline's own)",
    )
    parser.add_argument(
        "--covariance", choices=CALIBRATED_COVARIANCES, default="calibrated", help="the estimator the table is for"
    )
    parser.add_argument(
        "--table-dtype", choices=["float32", "float16"], default=None, help="the table's storage (float16: half)"
    )
    parser.add_argument(
        "--streaming", action="store_true", help="fit from streamed statistics (always so under several processes)"
    )
    parser.add_argument(
        "--cluster-samples", type=positive_int, default=4096, help="streaming: the subsample the clusters come from"
    )
    return parser


def folder_sample_shape(model: str) -> tuple[int, ...] | None:
    """One sample's shape from a local folder's ``unet/config.json``: its ``sample_shape`` (or ``dim``), or
    (in_channels, sample_size, sample_size) as UNet2DModel has it; None for a Hub id or a config that says none."""
    path = Path(model).expanduser() / "unet" / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    if config.get("sample_shape") or config.get("dim"):
        return tuple(config.get("sample_shape") or [config["dim"]])
    size = config.get("sample_size")
    if config.get("in_channels") is None or size is None:
        return None
    return (config["in_channels"], *((size, size) if isinstance(size, int) else size))


def load_samples(parser: argparse.ArgumentParser, path: Path) -> torch.Tensor:
    """The tensor in a --samples file (.pt or .npy); anything else is an argparse error."""
    if not path.is_file() or path.suffix not in (".pt", ".npy"):
        parser.error(f"--samples {path}: pass an existing .pt or .npy file")
    try:
        value = torch.from_numpy(np.load(path)) if path.suffix == ".npy" else torch.load(path, weights_only=True)
    except Exception as err:  # any unreadable file: pickle, zip and numpy errors alike
        parser.error(f"--samples {path}: cannot read it ({type(err).__name__}: {err})")
    if not isinstance(value, torch.Tensor):
        parser.error(f"--samples {path}: the file holds a {type(value).__name__}, not a tensor of samples (N, ...)")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked before any model is loaded (argparse errors, exit code 2): --out can be written,
    a --samples file holds finite floating-point samples of the model's sample shape (for a local folder), at least
    --clusters of them, and --rank fits their dimension."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        parser.error(f"--out {args.out} exists and is not an empty folder")
    check_writable(parser, "--out", args.out)
    args.clean = None
    if args.samples is not None:
        args.clean = load_samples(parser, args.samples)
        check_clean_samples(parser, args, folder_sample_shape(args.model))
    elif args.digits:
        check_clean_samples(parser, args, (1, 8, 8), count=NUM_TRAIN)
    else:
        check_clean_samples(parser, args, folder_sample_shape(args.model), count=args.num_samples or 2048)
    given = "--samples" if args.samples is not None else "--digits" if args.digits else None
    for flag, value in (("--num-samples", args.num_samples), ("--sampler-steps", args.sampler_steps)):
        if given and value is not None:
            parser.error(f"{flag} sets how the model's own samples are drawn; with {given} none are drawn")
    if args.digits and Path(args.model).resolve() != DEFAULT_MODEL.resolve():
        parser.error("--digits calibrates the shipped digits DDPM; with another --model pass --samples")
    conditions = args.prompt if args.prompt is not None else args.class_labels
    if conditions is not None:
        flag = "--prompt" if args.prompt is not None else "--class-labels"
        if args.digits:
            parser.error(f"{flag}: the digits DDPM is unconditional")
        count = len(args.clean) if args.clean is not None else args.num_samples or 2048
        if count % len(conditions):
            parser.error(
                f"{flag}: {len(conditions)} conditions for {count} samples: each takes an equal block of the "
                "samples (pass a sample count divisible by their number)"
            )
    hints = (" (the prompts to calibrate for)", " (the classes to calibrate for)")
    check_conditioning(parser, args, _model_index(parser, args.model), hints)
    return args


def conditioning(args: argparse.Namespace, count: int) -> dict[str, Any]:
    """The calibration's conditioning: each prompt repeated over its block of the ``count`` samples."""
    name, values = ("prompt", args.prompt) if args.prompt is not None else ("class_labels", args.class_labels)
    if values is None:
        return {}
    block = count // len(values)
    out: dict[str, Any] = {name: [value for value in values for _ in range(block)]}
    if args.guidance_scale is not None:
        out["guidance_scale"] = args.guidance_scale
    return out


def check_clean_samples(
    parser: argparse.ArgumentParser, args: argparse.Namespace, shape: tuple[int, ...] | None, count: int = 0
) -> None:
    """The clean samples (``args.clean``, or ``count`` of them of ``shape``) against the model's sample shape and
    the table's settings, with the library's own checks (``mmgibbs.checks``), as an argparse error; a shape that
    is not known yet (a Hub id) is checked after loading, still before any model call."""
    try:
        if args.clean is not None:
            check_samples(args.clean, "--samples", shape)
            count, shape = len(args.clean), tuple(args.clean.shape[1:])
        if shape is not None:
            settings = {"batch_size": args.batch_size, "generator": None, "shrinkage": 64.0, "factor_iterations": 1}
            source = "`--samples`" if args.clean is not None else "`--num-samples`"
            check_calibration(
                count, math.prod(shape), num_clusters=args.clusters, rank=args.rank, **settings, source=source
            )
    except (TypeError, ValueError) as err:
        parser.error(f"--samples {args.samples}: {err}" if args.samples is not None else str(err))


def clean_samples(args: argparse.Namespace) -> torch.Tensor | None:
    if args.digits:
        from digits import load_digits_split

        return load_digits_split()[0]
    return args.clean


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    state = PartialState(cpu=not torch.cuda.is_available())  # several processes under `accelerate launch`
    pipe = MomentMatchingGibbsPipeline.from_pipe(load_pipeline(args.model)).to(state.device)
    pipe.set_progress_bar_config(disable=True)
    if folder_sample_shape(args.model) is None:  # a Hub model's sample shape is known only now (no model call yet)
        count = 0 if args.clean is not None else args.num_samples or 2048
        check_clean_samples(build_parser(), args, sample_shape(pipe.denoiser_model), count=count)
    start = time.perf_counter()
    samples = clean_samples(args)
    count = len(samples) if samples is not None else args.num_samples or 2048
    conditions = conditioning(args, count)
    table = pipe.calibrate_covariance(
        args.steps,
        samples=samples,
        num_samples=None if samples is not None else count if conditions else args.num_samples,
        sampler_steps=args.sampler_steps,
        generator=torch.Generator().manual_seed(args.seed),
        batch_size=args.batch_size,
        num_clusters=args.clusters,
        rank=args.rank,
        streaming=True if args.streaming else None,
        cluster_samples=args.cluster_samples,
        covariance=args.covariance,
        dtype=None if args.table_dtype is None else getattr(torch, args.table_dtype),
        **conditions,
    )
    seconds = time.perf_counter() - start
    if state.is_main_process:
        report(pipe, table, args, count, seconds)
    if state.num_processes > 1:  # every process leaves together, through the process group's own shutdown
        state.wait_for_everyone()
        state.destroy_process_group()


def report(
    pipe: MomentMatchingGibbsPipeline, table: Any, args: argparse.Namespace, count: int, seconds: float
) -> None:
    """Save the calibrated pipeline and print the table, its cost and how to sample it (the main process)."""
    pipe.save_pretrained(args.out)
    print(f"model:    {args.model}")
    rank = table.settings["rank"]
    structure = f"rank {rank}" if args.covariance != "calibrated_stationary" else "stationary"
    print(
        f"table:    {len(table.sigmas)} levels (steps {args.steps}), {args.clusters} clusters, {structure}, "
        f"{table.nbytes / 2**20:.1f} MiB"
    )
    conditions = args.prompt if args.prompt is not None else args.class_labels
    if conditions is not None:
        guidance = table.settings.get("guidance", {}).get("guidance_scale")
        what = "prompts: " if args.prompt is not None else "classes: "
        print(f"{what} {len(conditions)} ({count // len(conditions)} samples each), guidance_scale {guidance}")
    drawn, source = table.settings["sampler_sample_forwards"], table.settings["source"]
    print(f"cost:     {table.sample_forwards} single-sample forwards to calibrate, {drawn} to draw own samples")
    print(f"          ({source}); {seconds:.1f} s")
    if "streaming" in table.settings:
        streamed = table.settings["streaming"]
        print(f"streamed: {streamed['processes']} process(es), clusters from {streamed['cluster_samples']} samples")
    sample_it = f"python examples/sample.py --model {args.out} --covariance {args.covariance}"
    print(f"wrote:    {args.out} (sample it: {sample_it})")


if __name__ == "__main__":
    main()
