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
