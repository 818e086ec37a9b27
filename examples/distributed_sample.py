"""The main job split across processes with accelerate: each process samples its own slice with its own seed,
and the main process gathers the samples and writes one grid (and, optionally, the raw array).

    accelerate launch --multi_gpu --num_processes 2 examples/distributed_sample.py --batch-size 64

On a machine without GPUs the same command starts CPU processes that talk over gloo (the script asks accelerate
for CPU state when no accelerator is present).

Process k samples its share of the images (accelerate's ``split_between_processes``: the first B mod P processes
get one more) with seed ``--seed + k``; the gathered set is the same whatever the machine, for a fixed number of
processes. With fewer images than processes the last processes sample none and only take part in the gather. Takes
the same sampler options as ``examples/sample.py``, checked before any model is loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import sample as main_job
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from sample import build_sampler, check_loaded, load_pipeline, sample, save_grid, scheduler_settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The main job's command line and --save-array, all checked before any model is loaded (argparse errors)."""
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--save-array", type=Path, default=None, help="also save the gathered uint8 images (.npy)")
    known, rest = extra.parse_known_args(argv)
    args = main_job.parse_args(rest)
    args.save_array = known.save_array
    if args.save_array is not None:
        if args.save_array.is_dir():
            extra.error(f"--save-array {args.save_array} is a folder; pass a file name, e.g. images.npy")
        if args.save_array.suffix != ".npy":  # numpy would append .npy and write another file than the one named
            extra.error(f"--save-array {args.save_array}: pass a .npy file name (numpy writes .npy files)")
        main_job.check_writable(extra, "--save-array", args.save_array)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    state = PartialState(cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()))
    dtype = getattr(torch, args.dtype)
    pipe = load_pipeline(args.model, dtype)
    check_loaded(pipe, args)
    sampler = build_sampler(pipe, args.mode, scheduler_settings(args)).to(state.device)
    sampler.set_progress_bar_config(disable=not state.is_main_process)

    with state.split_between_processes(list(range(args.batch_size))) as indices:
        # with fewer samples than processes the last processes get none: they sample nothing but still gather
        images, cost = sample(sampler, args, len(indices), args.seed + state.process_index) if indices else (None, {})
    gathered = gather_object([(state.process_index, images, cost)])
    if state.is_main_process:
        parts = sorted(gathered, key=lambda item: item[0])
        all_images = np.concatenate([images for _, images, _ in parts if images is not None])
        save_grid(all_images, args.out)
        if args.save_array is not None:
            np.save(args.save_array, all_images)
        for rank, images, cost in parts:
            if images is None:
                print(f"process {rank}: 0 samples ({args.batch_size} samples for {state.num_processes} processes)")
                continue
            print(
                f"process {rank}: {len(images)} samples, seed {args.seed + rank}, {cost['unet_forwards']} UNet "
                f"forwards, {cost['backward_passes']} backward passes, {cost['seconds']:.1f} s"
            )
        print(f"wrote {args.out} ({len(all_images)} samples from {state.num_processes} processes on {state.device})")
    # every process leaves together, through the process group's own shutdown (a process exiting while its peers'
    # connections are still open can abort in the backend's destructor; seen once, as SIGABRT, on a loaded machine)
    if state.num_processes > 1:
        state.wait_for_everyone()
        state.destroy_process_group()


if __name__ == "__main__":
    main()
