"""Flux through `MomentMatchingGibbsPipeline.from_pipe` and as a drop-in scheduler (tiny, offline).

"CFG on/off" for a guidance-distilled Flux-dev model means true CFG (``true_cfg_scale`` > 1 with a negative
prompt, both branches in one batched call); its embedded ``guidance`` is an input of every call either way.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tiny_flux import FLUX_DEV_SCHEDULER_CONFIG

from mmgibbs import MMGibbsScheduler

COVARIANCES = ["none", "isotropic", "diagonal", "projection"]
PROMPTS = ["a red cat", "a blue dog"]
SIZE = {"height": 16, "width": 16}


def test_scheduler_takes_flux_dev_config_sigmas_and_mu() -> None:
    """A dynamic-shifting FlowMatchEuler config builds (mu is not known before set_timesteps) and
    `set_timesteps(sigmas=, mu=)` lays out FlowMatchEuler's levels, u = 1 (alpha = 0) clamped to 1 - 1/T."""
    reference = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG)
    ours = MMGibbsScheduler.from_config(reference.config)
    sigmas, mu = np.linspace(1.0, 1 / 6, 6), 0.7
    reference.set_timesteps(sigmas=sigmas, mu=mu)
    ours.set_timesteps(sigmas=sigmas, mu=mu)
    torch.testing.assert_close(ours.timesteps[1:], reference.timesteps[1:])
    assert float(reference.timesteps[0]) == 1000.0 and float(ours.timesteps[0]) == 999.0
