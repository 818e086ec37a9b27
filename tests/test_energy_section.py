"""The ``energy`` benchmark section (``examples/energy_bench.py``: score against energy model at one level) at a
tiny size, read back from its cache, and its registration."""

from __future__ import annotations

import argparse
import json

import benchmark
import energy_bench
import numpy as np
import results_doc


def test_energy_section_at_a_tiny_size(tmp_path) -> None:
    args = argparse.Namespace(num_samples=12, seeds=[0, 1], out_dir=tmp_path, force=False)
    settings = {"budgets": (3,), "langevin_steps": (0.5, 1.0), "full_sweeps": 1, "jacobian_points": 2}
    data = energy_bench.section_data(args, **settings)
    data = json.loads(results_doc.as_json(data))
    report = energy_bench.render(data)
    for model in ("score", "energy"):
        for name in (
            "Langevin + Tweedie jump",
            "MMGibbs isotropic",
            "MMGibbs projection (fin. diff.)",
            "MMGibbs full",
        ):
            assert f"| {model} | {name}" in report
        assert f"* {model} model, 3 evaluations: Langevin + jump" in report
    rows = {(r["model"], r["name"]): r for r in data["rows"]}
    assert rows[("energy", "MMGibbs full")]["equiv"] == 1 + 2 * 64  # one sweep: 64 Hessian-vector products
    assert rows[("score", "MMGibbs diagonal (1 probe)")]["steps"] == 1  # 3 evaluations buy one sweep
    assert all(np.isfinite(r["fd"]).all() for r in data["rows"])
    # the energy model's Jacobian is symmetric to float32 round-off, the score model's is not
    assert data["jacobians"]["energy"]["asymmetry"]["max"] < 1e-4 < data["jacobians"]["score"]["asymmetry"]["min"]
    assert data["costs"]["energy_hvp"] > 0 and data["costs"]["energy_evaluation"] > 1
    cache = (tmp_path / "energy.json").read_text()
    again = json.loads(results_doc.as_json(energy_bench.section_data(args, **settings)))
    assert again["rows"] == data["rows"] and (tmp_path / "energy.json").read_text() == cache  # read back, not rerun


def test_benchmark_registers_the_energy_section() -> None:
    assert benchmark.build_parser().parse_args(["--section", "energy"]).section == "energy"
    assert "energy" not in benchmark.ALL and "energy" in benchmark.renderers()
