"""The shipped energy-parametrised DSM model (``checkpoints/digits-energy-sigma0.5``) and its training mode."""

from __future__ import annotations

import json

import pytest
import torch
import train_digits
from diffusers import DiffusionPipeline
from digits import dsm_dir, energy_dir, load_digits_split

from mmgibbs import MomentMatchingGibbsPipeline, NetworkEnergy
from mmgibbs.energy import energy_score


def test_shipped_energy_model_loads_offline_and_samples() -> None:
    folder = energy_dir(0.5)
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = MomentMatchingGibbsPipeline.from_pretrained(folder, local_files_only=True)
    assert isinstance(pipe.unet, NetworkEnergy) and pipe.unet.config.form == "quadratic"
    assert pipe.unet.config.scale == pytest.approx(4.0) and pipe.scheduler.config.sigma == 0.5
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, num_inference_steps=2, covariance="diagonal", output_type="pt")
    assert out.images.shape == (2, 1, 8, 8) and (out.num_forward, out.num_backward) == (2, 2)
    # the folder also loads without importing the class first (diffusers' custom-pipeline convention)
    assert type(DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)).__name__ == type(pipe).__name__
    # it denoises held-out digits: eps-MSE well below the trivial 1, as its record says
    _, _, x, _ = load_digits_split()
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    eps_hat = 0.5 * energy_score(pipe.unet, x + 0.5 * eps, torch.full((len(x),), 0.5))
    record = json.loads((folder / "training.json").read_text())
    assert float(((eps_hat - eps) ** 2).mean()) == pytest.approx(record["sanity_check"]["heldout_eps_mse"], rel=1e-4)
    assert record["sanity_check"]["heldout_eps_mse"] < 0.2


def test_energy_model_trained_as_the_score_model_was() -> None:
    """Same data, split, seeds, steps, batch, optimiser and time budget as the shipped score model; one thread."""
    energy = json.loads((energy_dir(0.5) / "training.json").read_text())
    score = json.loads((dsm_dir(0.5) / "training.json").read_text())
    same = ("seed", "split_seed", "steps_requested", "batch_size", "lr", "ema_decay", "grad_clip", "sigma")
    assert {k: energy[k] for k in same} == {k: score[k] for k in same}
    assert (energy["num_train"], energy["num_heldout"], energy["time_budget_min"]) == (1400, 397, 18.0)
    assert energy["mode"] == "single_sigma_energy_dsm" and energy["energy_form"] == "quadratic"
    assert energy["environment"]["threads"] == 1 and energy["wall_time_s"] < 25 * 60
    args = train_digits.parse_args(["--single-sigma", "0.5", "--energy", "quadratic"])
    assert args.out == energy_dir(0.5) and args.steps == 1200 and args.time_budget_min == 18.0
    with pytest.raises(SystemExit):
        train_digits.parse_args(["--energy", "quadratic"])  # the energy model is the single-level one
