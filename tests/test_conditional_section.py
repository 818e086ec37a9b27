"""The conditional section (examples/conditional.py) on a small run: an exact guided DiT case, every row measured
per condition against the guided target and rendered from the results file alone."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
conditional = pytest.importorskip("conditional")


def test_the_section_measures_and_renders_every_row(tmp_path, monkeypatch) -> None:
    """5 steps, 30 samples per condition, tables from 48, FD against 400 exact samples (a smoke run: the KL needs
    more than d + 1 samples per mode, so it is inf here)."""
    monkeypatch.setattr(conditional, "BUDGETS", (5,))
    monkeypatch.setattr(conditional, "NUM_REFERENCE", 400)
    data = conditional.section_data(30, [0], tmp_path, quick=True, cases_run=("dit-gaussian",), num_calibration=48)
    data = json.loads(json.dumps(data))  # what --write-docs keeps
    (case,) = data["cases"]
    names = {row["name"] for row in case["rows"]}
    assert {"DDIM", "DPM-Solver++ (2M)", "UniPC (bh2)"} <= names and len(names) == 10
    assert {row["budget"] for row in case["rows"]} == {5} and case["guidance"] == conditional.GUIDANCE
    for row in case["rows"]:
        for key in row["keys"]:
            metrics = data["results"][key]["conditions"]
            assert len(metrics) == conditional.NUM_CONDITIONS
            assert all(math.isfinite(m["fd"]) and m["nonfinite"] == 0 for m in metrics), row["name"]
    text = conditional.render(data)
    assert "#### DiT, Gaussian classes, shared covariance (guidance 3)" in text
    assert "tables from 48 samples per condition" in text and "own samples" in text
    assert all(f"| {name} | 5 |" in text for name in names)


def test_sd_cases_start_every_sampler_from_the_exact_marginal_at_its_own_first_level() -> None:
    """SD's schedule leaves sqrt(abar) = 0.07-0.12 of the signal at the first levels: the SD cases start from
    q(x_t) = N(sqrt(abar_t) m_c, abar_t C_c + (1 - abar_t) I) per condition (paired across samplers), the DiT ones
    from N(0, I)."""
    import torch
    from diffusers import DDIMScheduler, UniPCMultistepScheduler

    case = conditional.sd_case("gaussian", seed=0)
    ids = [c for c in range(conditional.NUM_CONDITIONS) for _ in range(4000)]
    config = {k: v for k, v in case.pipe.scheduler.config.items() if not k.startswith("_")}
    ddim = conditional.first_timestep(case, DDIMScheduler.from_config(config), 20, ids)
    unipc = conditional.first_timestep(case, UniPCMultistepScheduler.from_config(config), 20, ids)
    assert ddim == 951 and unipc != ddim
    abar = DDIMScheduler.from_config(config).alphas_cumprod[ddim].double()
    start = conditional.start_latents(case, ids, 0, ddim).flatten(1)
    for c, target in enumerate(case.targets):
        rows = start[c * 4000 : (c + 1) * 4000]
        mean = abar.sqrt() * target.means[0].flatten()
        cov = abar * target.covariances[0] + (1 - abar) * torch.eye(conditional.D, dtype=torch.float64)
        # the sample mean of 4000 rows is within 4 standard errors of the exact one in every direction's norm
        assert torch.linalg.norm(rows.mean(0) - mean) < 4 * math.sqrt(float(cov.trace()) / 4000)
        assert abs(float(rows.var(0).sum() / cov.trace()) - 1) < 0.05
    assert torch.linalg.norm(start.mean(0)) > 3 * math.sqrt(conditional.D / 4000)  # not N(0, I)
    dit = conditional.dit_case("gaussian", seed=0)
    assert torch.equal(
        conditional.start_latents(dit, ids, 0, ddim),
        torch.randn((len(ids), *conditional.SHAPE), generator=torch.Generator().manual_seed(0), dtype=torch.float64),
    )
