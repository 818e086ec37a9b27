"""The learned-model benchmarks: the MNIST loader's split, the shipped mixture / MNIST checkpoints, the training
data of train_digits.py, and the learned-mixture and mnist sections at tiny sizes (50 samples, 3 steps)."""

from __future__ import annotations

import argparse
import json

import benchmark
import image_mixture as im
import learned_bench as lb
import learned_mixture
import mnist
import mnist_bench
import numpy as np
import pytest
import results_doc
import torch
import train_digits
from diffusers import DDPMPipeline
from digits import DigitsClassifier, classifier_features, classifier_predict

from mmgibbs import GaussianMixtureDenoiser


# ------------------------------------------------------------------------------------------------ the data
def test_mnist_split_is_stratified_disjoint_and_deterministic() -> None:
    x_train, y_train, x_held, y_held = mnist.load_mnist_split()
    assert x_train.shape == (4000, 1, 12, 12) and x_held.shape == (1000, 1, 12, 12)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert float(x_train.min()) == -1.0 and float(x_train.max()) <= 1.0 and float(x_train.max()) > 0.99
    assert np.bincount(y_train.numpy()).tolist() == [400] * 10
    assert np.bincount(y_held.numpy()).tolist() == [100] * 10
    again = mnist.load_mnist_split()
    for a, b in zip((x_train, y_train, x_held, y_held), again, strict=True):
        assert torch.equal(a, b)
    # the parts are disjoint and cover the 5000 images: every image lands in exactly one of them
    images, _ = mnist.mnist_images()
    everything = (images / 127.5 - 1.0).astype(np.float32).reshape(len(images), -1)
    parts = torch.cat([x_train, x_held]).flatten(1).numpy()
    assert sorted(r.tobytes() for r in parts) == sorted(r.tobytes() for r in everything)
    other = mnist.load_mnist_split(seed=1)
    assert not torch.equal(other[2], x_held) and np.bincount(other[3].numpy()).tolist() == [100] * 10


def test_mixture_training_data_is_fresh_every_batch_and_seeded() -> None:
    data = train_digits.mixture_data(0)
    assert data.x_train is None and data.sizes() == {"num_train": None, "num_heldout": 2000}
    next_batch, size = data.batches(16, torch.Generator().manual_seed(0))
    first, second = next_batch()[0], next_batch()[0]
    assert size == 16 and first.shape == (16, 1, 8, 8) and first.dtype == torch.float32
    assert not torch.equal(first, second)  # a new draw per batch: no fixed training set
    replay = data.batches(16, torch.Generator().manual_seed(0))[0]
    assert torch.equal(replay()[0], first)
    with pytest.raises(ValueError, match="--split-seed must be 0"):
        train_digits.mixture_data(1)


def test_training_modes_pick_their_data_defaults() -> None:
    args = train_digits.parse_args(["--data", "mnist"])
    assert args.out == mnist.DDPM_DIR and args.steps == 4000 and args.time_budget_min == 28.0
    args = train_digits.parse_args(["--data", "mnist", "--classifier"])
    assert args.out == mnist.CLASSIFIER_DIR and args.steps == 3000
    args = train_digits.parse_args(["--data", "mixture"])
    assert args.out.name == "mixture-ddpm" and args.check_samples == 1000
    args = train_digits.parse_args([])  # the digits DDPM keeps its settings
    assert args.steps == 4000 and args.time_budget_min == 18.0 and args.check_samples == 64
    with pytest.raises(SystemExit):
        train_digits.parse_args(["--data", "mixture", "--classifier"])


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize(("folder", "side", "clip"), [("mixture-ddpm", 8, False), ("mnist-ddpm", 12, True)])
def test_shipped_learned_ddpms_load_and_sample(folder: str, side: int, clip: bool) -> None:
    path = train_digits.CHECKPOINTS / folder
    pipe = DDPMPipeline.from_pretrained(path)
    assert pipe.scheduler.config.clip_sample is clip and pipe.scheduler.config.num_train_timesteps == 1000
    samples, calls = im.run_diffusers(pipe.unet, "DDIM", 3, 4, 0, config=pipe.scheduler.config)
    assert samples.shape == (4, 1, side, side) and calls == 3 and bool(torch.isfinite(samples).all())
    record = json.loads((path / "training.json").read_text())
    assert record["environment"]["threads"] == 1 and record["wall_time_s"] < 35 * 60
    assert record["history"][-1]["train_loss"] < 0.2 and "sanity_check" in record


def test_shipped_mnist_classifier_separates_the_held_out_digits() -> None:
    classifier = DigitsClassifier.from_pretrained(mnist.CLASSIFIER_DIR).eval()
    _, _, x_held, y_held = mnist.load_mnist_split()
    assert classifier.config.image_size == 12
    assert float((classifier_predict(classifier, x_held) == y_held).float().mean()) > 0.95
    assert classifier_features(classifier, x_held[:5]).shape == (5, 64)


# ------------------------------------------------------------------------------------------------ the sections
TINY_ROWS = [
    lb.MMGibbsRow("isotropic, eta 0", {"covariance": "isotropic", "eta": 0.0}, budgets=(3,)),
    lb.MMGibbsRow("calibrated, eta 0", {"covariance": "calibrated", "eta": 0.0}, lb.CALIBRATED, budgets=(3,)),
]


def _args(tmp_path, seeds=(0,)) -> argparse.Namespace:
    return argparse.Namespace(num_samples=50, seeds=list(seeds), out_dir=tmp_path, force=False, only=None)


def test_every_sampler_of_a_section_starts_from_the_same_noise(tmp_path) -> None:
    pipe = DDPMPipeline.from_pretrained(learned_mixture.MODEL_DIR)
    bench = lb.LearnedBench("t", pipe.unet, pipe.scheduler.config, lambda: None, lambda x: {}, 6, [3], tmp_path)
    first: list[torch.Tensor] = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda _, inputs: first.append(inputs[0].clone()) if not first else None
    )
    starts = []
    for run in (bench.baseline("UniPC (bh2)", 2), bench.mmgibbs(TINY_ROWS[0], 2)):
        first.clear()
        run(3, 6)
        starts.append(first[0])
    hook.remove()
    # the pipeline's first input is alpha * (x_T / alpha): the same draw up to round-off
    assert starts[0].shape == (6, 1, 8, 8) and torch.allclose(starts[0], starts[1], rtol=1e-6, atol=1e-6)


def test_level_errors_vanish_for_the_exact_model_and_split_the_residual() -> None:
    truth = im.fit_digits_mixture()
    assert isinstance(truth, GaussianMixtureDenoiser)
    rows = learned_mixture.level_errors(truth, im.scheduler_config(), truth, steps=(3, 2), num_samples=2000)
    # DDPM's leading layout: 3 steps at t = 666, 333, 0 and 2 steps at 500, 0; the shared level is computed once
    assert {r["t"]: r["steps"] for r in rows} == {666: [3], 500: [2], 333: [3], 0: [3, 2]}
    assert [r["sigma"] for r in rows] == sorted((r["sigma"] for r in rows), reverse=True)
    for r in rows:
        assert 0 < r["var"] and r["err"] < 1e-6 * r["var"]  # the model is the truth: float32 round-off only
        assert r["resid"] == pytest.approx(r["var"], rel=0.1)  # E||x - mu||^2 = E tr Cov[x|y] (+ err)


def _through_results_file(module, data: dict) -> str:
    """What benchmark.py renders: the section's data as its results file holds it (JSON), then the renderer."""
    assert benchmark.renderers()[data["section"]] is module.render
    return module.render(json.loads(results_doc.as_json(data)))


def test_learned_mixture_section_at_a_tiny_size(tmp_path) -> None:
    data = learned_mixture.section_data(
        _args(tmp_path), TINY_ROWS, budgets=(3,), limit_steps=4, num_calibration=200, level_steps=(3,)
    )
    report = _through_results_file(learned_mixture, data)
    assert report == learned_mixture.render(data)
    for name in (
        *lb.BASELINE_NAMES,
        "MMGibbs isotropic, eta 0",
        "MMGibbs calibrated, eta 0",
        "DDPM, all training steps",
    ):
        assert f"| {name}" in report
    assert "exact samples (floor)" in report and "E tr Cov[x|y]/d" in report
    assert report.count("| 3 | 3 |") == 6  # four baselines and two MMGibbs rows, 3 steps = 3 model calls
    cache = json.loads((tmp_path / "learned_mixture.json").read_text())
    assert all(np.isfinite(r["fd"]) and 0 <= r["tv"] <= 1 for r in cache.values())
    # cached: a second run reads every row back instead of sampling again
    again = learned_mixture.section(
        _args(tmp_path), TINY_ROWS, budgets=(3,), limit_steps=4, num_calibration=200, level_steps=()
    )
    assert json.loads((tmp_path / "learned_mixture.json").read_text()) == cache and "| DDIM | 3 |" in again


def test_mnist_section_at_a_tiny_size(tmp_path) -> None:
    data = mnist_bench.section_data(
        _args(tmp_path, seeds=(0, 1)), TINY_ROWS, budgets=(3,), limit_steps=4, limit_samples=20, num_calibration=100
    )
    report = _through_results_file(mnist_bench, data)
    for name in (*lb.BASELINE_NAMES, "MMGibbs isotropic, eta 0", "MMGibbs calibrated, eta 0", "train images (floor"):
        assert f"| {name}" in report
    assert "(20 samples, seed [0])" in report  # the limit row says its size
    cache = json.loads((tmp_path / "mnist.json").read_text())
    assert len(cache) == 2 + 6 * 2 + 1  # floor and six rows per seed, the limit on one seed
    assert all(np.isfinite(r["fd"]) and r["fd"] >= 0 and r["class_kl"] >= 0 for r in cache.values())
    assert "**3 calls**" in report


def test_benchmark_registers_the_learned_sections() -> None:
    parser = benchmark.build_parser()
    for name in ("learned-mixture", "mnist"):
        assert parser.parse_args(["--section", name]).section == name and name not in benchmark.ALL
