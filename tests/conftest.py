"""Shared fixtures: examples/ and tests/ importable, float64 exact models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT / "examples", ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# one config per noise family, with the family's own scheduler class name
FAMILY_CONFIGS = {
    "vp": {"_class_name": "DDPMScheduler", "beta_schedule": "linear"},
    "vp_cosine": {"_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2"},
    "ve": {"_class_name": "ScoreSdeVeScheduler", "sigma_min": 0.01, "sigma_max": 50.0},
    "edm": {"_class_name": "EDMEulerScheduler"},
    "flow": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0},
}


def public(config) -> dict:
    """A config without diffusers' private bookkeeping keys (``_class_name``, ``_use_default_values``, ...)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}
