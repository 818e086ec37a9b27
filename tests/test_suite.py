"""The suite itself: isolated from other runs on the same machine, one thread per process."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def test_custom_code_is_loaded_from_a_cache_of_this_session() -> None:
    """Every `trust_remote_code` load copies the custom file (mmgibbs_pipeline.py, mmgibbs_scheduler.py) into
    HF_MODULES_CACHE/diffusers_modules/local/ and runs it from there. With the user's shared cache, a concurrent run
    (another checkout's suite, a parallel job) rewriting that file breaks the load: with two processes loading the
    two mmgibbs_pipeline.py variants in a loop, 22% of loads failed with a SyntaxError on a half-written file."""
    from diffusers.utils import constants, dynamic_modules_utils

    cache = Path(dynamic_modules_utils.HF_MODULES_CACHE).resolve()
    assert cache == Path(constants.HF_MODULES_CACHE).resolve() == Path(os.environ["HF_MODULES_CACHE"]).resolve()
    assert cache.is_relative_to(Path(tempfile.gettempdir()).resolve()) and "mmgibbs-tests" in cache.name


def test_torch_runs_one_thread_unless_asked_otherwise() -> None:
    """With torch's default (a thread per core) the suite took 23 minutes instead of 2 on a busy 2-core machine
    (threads spinning at every parallel region), and round-off depended on the core count. conftest sets
    OMP_NUM_THREADS=1 when it is not set; a value set by the caller is kept."""
    import torch

    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])
