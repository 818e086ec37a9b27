"""Bad and unusual inputs (issues 10 and 16): each gets a clear error naming the argument where it was passed, or the
right result. The cases are the table in ``bad_input_cases``; docs/bad-inputs.md is that table, rendered.

Every case failed on the code before its fix: the input either passed silently (a broadcast sample, an ignored
generator, a dropped argument) or failed deep inside torch or diffusers with a message that names no argument.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bad_input_cases import CASES, ROOT, Case, check, render

PAGE = ROOT / "docs" / "bad-inputs.md"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    check(case, tmp_path)


def test_every_case_is_listed_once() -> None:
    keys = [(case.section, case.input) for case in CASES]
    assert len(set(keys)) == len(keys), [k for k in keys if keys.count(k) > 1]
    ids = [case.id for case in CASES]
    assert len(set(ids)) == len(ids), [i for i in ids if ids.count(i) > 1]


def test_the_page_lists_exactly_the_tested_cases() -> None:
    """docs/bad-inputs.md is the table rendered (rewrite it with `python tests/bad_input_cases.py >
    docs/bad-inputs.md`)."""
    assert PAGE.read_text(encoding="utf-8") == render()
