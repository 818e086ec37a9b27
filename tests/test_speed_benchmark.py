"""The speed benchmark's instruments (``examples/speed.py``): the peak-memory measure, and the sections end to end."""

from __future__ import annotations

import pytest
import speed
import torch
from background import result as background_run

MIB = 2**20


def test_peak_memory_is_the_most_torch_held_from_the_first_model_call_on() -> None:
    """Allocations and frees are summed in order: the peak is the largest simultaneous holding, and with a model
    only what was allocated from its first call on counts (not prompt encoding before the loop)."""
    model = torch.nn.Linear(4, 4)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        before = torch.empty(8 * MIB, dtype=torch.uint8)  # e.g. prompt encoding: freed before the loop
        del before
        model(torch.zeros(1, 4))
        a = torch.empty(3 * MIB, dtype=torch.uint8)
        b = torch.empty(2 * MIB, dtype=torch.uint8)
        del a
        c = torch.empty(1 * MIB, dtype=torch.uint8)
        return b, c

    assert speed.peak_memory_mb(run, model) == pytest.approx(5.0, abs=0.01)  # a and b together
    assert speed.peak_memory_mb(run) == pytest.approx(8.0, abs=0.01)  # the whole call


def test_paired_ratios_and_the_targets_read_the_same_repetition() -> None:
    rows = {
        name: speed.Row(name, lambda: None, 1, seconds=seconds)
        for name, seconds in [
            ("DDPMScheduler, diffusers' pipeline loop", [1.0, 2.0, 1.0]),
            ("MMGibbsScheduler drop-in, none", [1.02, 2.04, 1.02]),
            ("MMGibbsScheduler drop-in, isotropic", [1.1, 2.2, 1.1]),
            ("Gibbs pipeline, none", [1.0, 2.0, 1.0]),
            ("diagonal, reverse, K=1 (1 probe)", [2.5, 5.0, 2.5]),
        ]
    }
    assert speed.paired_ratios(rows["MMGibbsScheduler drop-in, none"], rows["Gibbs pipeline, none"]) == pytest.approx(
        [1.02] * 3
    )
    report = speed.targets(list(rows.values()))
    assert "none: +2.0%" in report and "isotropic: +10.0%" in report and "MISSED" in report
    assert "K=1 (1 probe): 2.50 forward equivalents per level; target <= 1 + 2K = 3: met" in report


@pytest.mark.slow
@pytest.mark.parametrize(
    "section", [pytest.param(s, marks=pytest.mark.background(f"{s}-section")) for s in ("families", "speed", "latent")]
)
def test_speed_sections_run_and_print_their_tables(section: str) -> None:
    """``--quick``: every row once, 2 levels (about 15 s for families, 40 s for speed on one core). The command
    (``examples/benchmark.py --section <section> --quick --threads 1``, ``background.RUNS``) runs beside the other
    tests; the families run also writes its docs block for test_results_doc, one run for both."""
    result, folder = background_run(f"{section}-section")
    out = folder / "bench"
    assert result.returncode == 0, result.stderr[-3000:]
    report = (out / f"report_{section}.md").read_text()
    if section == "families":
        for family in ("unconditional", "Stable Diffusion", "SDXL", "SD3", "Flux", "DiT", "PixArt"):
            assert f"| {family}" in report
        assert "| diagonal | 1 / 1 / 0 |" in report
    elif section == "latent":  # a small UNet of SD 1.5's layout at its latent size, the tables at full size
        assert "| low rank + diagonal, 16 clusters, rank 16, float16 | 9.0 MiB | 180.0 MiB | 36.0 MiB |" in report
        assert "MomentMatchingGibbsPipeline, calibrated_stationary" in report and "| DiT | (4, 4, 4) |" in report
    else:
        assert "| diagonal, reverse, K=2 (2 in one pass) | 1 / 2 / 0 (products in 1 pass) |" in report
        assert "drop-in overhead per step, isotropic" in report and "`full` is not timed here" in report
    assert "nan" not in report
