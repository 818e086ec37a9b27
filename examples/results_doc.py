"""The benchmark's tables in the docs: written between markers from the section's results file, never by hand.

A docs page holds a section's tables between two markers::

    <!-- benchmark:digits -->
    ... everything here is written by ``benchmark.py --section digits --write-docs`` ...
    <!-- /benchmark:digits -->

``benchmark.py --write-docs`` saves what a section measured as ``docs/results/<section>.json`` (for the cached
sections the subset of the result cache that the section's rows use, plus the run's setup) and replaces the block
with the section's renderer applied to that file; ``benchmark.py --render-docs`` re-renders every block from the
committed files without measuring anything. ``tests/test_docs.py`` re-renders every block whose results file is
committed and compares, so a table in the docs is always what its results file says.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: the page the benchmark writes its blocks into
RESULTS_PAGE = "results.md"
BLOCK = re.compile(r"<!-- benchmark:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /benchmark:(?P=name) -->", re.DOTALL)


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def as_json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=1, sort_keys=True, default=_plain) + "\n"


def blocks(text: str) -> dict[str, str]:
    """Every marked block of a page: section name -> its body."""
    found: dict[str, str] = {}
    for match in BLOCK.finditer(text):
        if match["name"] in found:
            raise ValueError(f"the block benchmark:{match['name']} appears twice")
        found[match["name"]] = match["body"]
    return found


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the body of block ``name`` replaced by ``body`` (an error if the page has no such block)."""
    if name not in blocks(text):
        raise ValueError(
            f"no block for section {name!r}: add '<!-- benchmark:{name} -->' and '<!-- /benchmark:{name} -->' "
            "lines where its tables go"
        )
    body = body if body.endswith("\n") else body + "\n"
    return BLOCK.sub(lambda m: m.group(0) if m["name"] != name else _block(name, body), text)


def _block(name: str, body: str) -> str:
    return f"<!-- benchmark:{name} -->\n{body}<!-- /benchmark:{name} -->"


def write_section(
    name: str, data: Mapping[str, Any], render: Callable[[Mapping[str, Any]], str], docs: Path = DOCS
) -> str:
    """Save ``data`` as ``docs/results/<name>.json`` and write ``render(data)`` (rendered from the saved file, so
    the page is exactly what the file re-renders to) into the block of ``docs/results.md``; returns the body."""
    text = as_json(data)
    page = docs / RESULTS_PAGE
    before = page.read_text()
    body = render(json.loads(text))
    after = replace_block(before, name, body)  # the block must exist before anything is written
    (docs / "results").mkdir(parents=True, exist_ok=True)
    (docs / "results" / f"{name}.json").write_text(text)
    page.write_text(after)
    return body


def stale_blocks(renderers: Mapping[str, Callable[[Mapping[str, Any]], str]], docs: Path = DOCS) -> dict[str, str]:
    """Blocks of the docs pages that differ from what their committed results file renders to: section -> why.
    Blocks without a committed file are left out (not written by the benchmark yet)."""
    stale: dict[str, str] = {}
    seen = set()
    for page in sorted(docs.glob("*.md")):
        for name, body in blocks(page.read_text()).items():
            seen.add(name)
            if name not in renderers:
                stale[name] = f"{page.name}: no renderer for a section {name!r} (known: {', '.join(renderers)})"
                continue
            path = docs / "results" / f"{name}.json"
            if path.is_file():
                expected = renderers[name](json.loads(path.read_text()))
                expected = expected if expected.endswith("\n") else expected + "\n"
                if body != expected:
                    stale[name] = f"{page.name}: the block differs from what {path.name} renders to"
    for path in sorted((docs / "results").glob("*.json")):
        if path.stem not in seen:
            stale[path.stem] = f"results/{path.name} has no block <!-- benchmark:{path.stem} --> in the docs"
    return stale
