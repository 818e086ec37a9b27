"""Shared fixtures: examples/ and tests/ importable, float64 exact models; a private diffusers modules cache and one
torch thread per test process."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

# Before diffusers is imported (it reads the variable once): custom-code loads (`trust_remote_code=True`) copy
# mmgibbs_pipeline.py / mmgibbs_scheduler.py into HF_MODULES_CACHE/diffusers_modules/local/ and run them from
# there; in the shared default cache a concurrent run rewriting those files made loads here fail (a SyntaxError on a
# half-written file). Subprocesses of the tests inherit this session's cache; the runs of tests/background.py, which
# go on beside the tests, get one each.
_MODULES_CACHE = tempfile.mkdtemp(prefix="mmgibbs-tests-hf-modules-")
os.environ["HF_MODULES_CACHE"] = _MODULES_CACHE
# Before torch is imported: one thread per test process (and its subprocesses) unless asked otherwise. The tiny
# models gain nothing from more, and on a busy 2-core machine torch's default of one thread per core spins at every
# parallel region: the suite took 23 minutes there instead of 2 (load ~5), with 20 minutes of CPU time. Results
# also no longer depend on the machine's core count (summation order, hence round-off, follows the thread count).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT / "examples", ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import background  # noqa: E402

# the shared SD3/Flux checks assert inside this helper module: pytest explains their failures as in a test
pytest.register_assert_rewrite("exact_flow_gaussians")


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


def pytest_configure(config: pytest.Config) -> None:
    # diffusers' K-DPM2 schedulers call numpy on torch tensors in `_sigma_to_t`, once per training level at every
    # construction and set_timesteps, and numpy 2 warns about torch's `__array_wrap__` at each call: 80k warnings per
    # suite, which pytest records and formats one by one (test_conformance: 18.6 -> 16.9 s CPU without them). It is
    # torch's and diffusers' business, not the tests': ignored here, the one message, the rest stays in the summary.
    config.addinivalue_line("filterwarnings", "ignore:__array_wrap__ must accept context:DeprecationWarning")
    config.addinivalue_line(
        "markers",
        "background(name): the test checks the subprocess run `name` of tests/background.py (started once "
        "the tests are collected, run beside them)",
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the slow subprocess runs the collected tests check, in the order the tests come (tests/background.py):
    they run one at a time beside the in-process tests instead of each holding up the suite while it waits."""
    if session.config.option.collectonly:
        return
    names = [mark.args[0] for item in session.items for mark in item.iter_markers("background")]
    if names:
        background.start(names)


def pytest_unconfigure(config: pytest.Config) -> None:
    background.stop()
    shutil.rmtree(_MODULES_CACHE, ignore_errors=True)
