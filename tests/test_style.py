"""The code base stays ruff-clean (lint and format), as pyproject.toml configures it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["src", "tests", "examples", "pipelines"]


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is in the `test` extra")
@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, *PATHS], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_api_is_typed_and_exported() -> None:
    import mmgibbs

    assert (Path(mmgibbs.__file__).parent / "py.typed").exists()
    for name in mmgibbs.__all__:
        assert getattr(mmgibbs, name) is not None
