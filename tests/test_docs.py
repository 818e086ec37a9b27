"""What the README and the docs pages promise: their links and anchors resolve, their code runs (or at least compiles
and parses), their result tables are what the benchmark's results files render to, and the guide's recommendation
table says what ``mmgibbs.recommend`` returns."""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import results_doc

from mmgibbs.recommend import RECOMMENDED

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
#: the first line of a Python block that needs the Hub's weights (compiled, not run)
HUB = "# needs the Hugging Face Hub"
#: the line before a Python block that runs only in the slow test
SLOW = "<!-- test: slow -->"
README_LIMIT = 250


# ------------------------------------------------------------------------------------------------ parsing
def split(text: str) -> tuple[list[str], list[dict]]:
    """A page's prose lines (code blocks blanked) and its fenced code blocks: info string, code, the prose line
    before the fence."""
    prose, code, block, before = [], [], None, ""
    for line in text.split("\n"):
        if block is None and line.startswith("```"):
            block = {"info": line[3:].strip(), "lines": [], "before": before}
            prose.append("")
        elif block is not None and line.startswith("```"):
            code.append({"info": block["info"], "code": "\n".join(block["lines"]) + "\n", "before": block["before"]})
            block = None
            prose.append("")
        elif block is not None:
            block["lines"].append(line)
            prose.append("")
        else:
            prose.append(line)
            before = line if line.strip() else before
    assert block is None, "an unclosed code fence"
    return prose, code


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped (letters, digits, '_', '-' and spaces kept),
    spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in split(path.read_text())[0]:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = anchor(match[1])
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def links(path: Path) -> list[str]:
    prose = "\n".join(split(path.read_text())[0])
    prose = re.sub(r"`[^`\n]*`", "", prose)  # code spans hold brackets and parentheses that are not links
    prose = re.sub(r"<!--.*?-->", "", prose, flags=re.DOTALL)
    return [t for t in LINK.findall(prose) if not re.match(r"^[a-z]+:", t)]


# ------------------------------------------------------------------------------------------------ links
def test_anchor_rules() -> None:
    assert anchor("The aim, measured (paired seeds 0 / 1)") == "the-aim-measured-paired-seeds-0--1"
    assert anchor("Batched Jacobian products (`product_batch`)") == "batched-jacobian-products-product_batch"
    assert anchor("One noise level (the paper's setting)") == "one-noise-level-the-papers-setting"


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in links(page):
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.name}")
        elif fragment and (file.suffix != ".md" or fragment not in anchors(file)):
            broken.append(f"{target}: no heading #{fragment} in {file.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    assert not broken_links(page), f"{page.name}: " + "; ".join(broken_links(page))


def test_broken_links_are_found(tmp_path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading (1)\n\n```\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#a-code-heading-1) [ok](#page) [web](https://example.com/x#y) `[no](link)`\n"
        "[bad](missing.md) [bad](other.md#not-a-heading) [bad](#nope) ![bad](missing.png)\n"
    )
    assert broken_links(page) == [
        "missing.md: no file missing.md",
        "other.md#not-a-heading: no heading #not-a-heading in other.md",
        "#nope: no heading #nope in page.md",
        "missing.png: no file missing.png",
    ]


def test_every_docs_page_is_linked_from_the_readme_and_opens_with_what_it_answers() -> None:
    readme = set(links(ROOT / "README.md"))
    for page in DOCS.glob("*.md"):
        assert f"docs/{page.name}" in {t.partition("#")[0] for t in readme}, f"the README does not link {page.name}"
        lines = [line for line in page.read_text().split("\n") if line.strip()]
        assert lines[0].startswith("# ") and not lines[1].startswith(("#", "|", "```", "-")), page.name


def test_readme_is_short_and_starts_with_the_two_commands() -> None:
    """The two commands are the README's first two code blocks; .ci/run greps the test command and runs it."""
    text = (ROOT / "README.md").read_text()
    assert len(text.split("\n")) <= README_LIMIT
    blocks = split(text)[1]
    assert blocks[0]["code"].startswith('pip install torch==2.13.0 && pip install -e ".[examples]"')
    command = blocks[1]["code"].strip()
    assert command == 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'
    assert re.search(r'^pip install torch==2\.13\.0 && pip install -e "\.\[test\]"', text, re.MULTILINE)


# ------------------------------------------------------------------------------------------------ code
def python_blocks(page: Path) -> list[dict]:
    return [b for b in split(page.read_text())[1] if b["info"].split(" ")[:1] == ["python"]]


def _runnable(kind: str) -> list[tuple[str, str]]:
    out = []
    for i, block in enumerate(python_blocks(ROOT / "README.md")):
        if block["code"].startswith(HUB):
            continue
        if (block["before"].strip() == SLOW) == (kind == "slow"):
            out.append((f"block {i}", block["code"]))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_python_block_compiles(page: Path) -> None:
    for block in python_blocks(page):
        compile(block["code"], f"{page.name}: {block['code'].splitlines()[0]}", "exec")


def _run(code: str, tmp_path: Path, monkeypatch) -> None:
    """A README block as a user runs it from a checkout: in a fresh namespace, the repository's examples/ at hand,
    what it writes in a scratch folder."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize(("name", "code"), _runnable("fast"), ids=[n for n, _ in _runnable("fast")])
def test_readme_python_blocks_run_offline(name: str, code: str, tmp_path, monkeypatch) -> None:
    _run(code, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "code"), _runnable("slow"), ids=[n for n, _ in _runnable("slow")])
def test_readme_slow_python_blocks_run_offline(name: str, code: str, tmp_path, monkeypatch) -> None:
    _run(code, tmp_path, monkeypatch)


def test_the_hub_blocks_say_so() -> None:
    """Every README Python block runs offline, except those whose first line says they need the Hub."""
    for block in python_blocks(ROOT / "README.md"):
        if 'from_pretrained("' in block["code"] and "examples/checkpoints" not in block["code"]:
            assert block["code"].startswith(HUB), block["code"].splitlines()[0]


SCRIPTS = ("sample", "calibrate", "compare", "benchmark")


def command_lines() -> list[tuple[str, str, list[str]]]:
    """(page, script, arguments) of every ``python examples/<script>.py ...`` line of the pages' bash blocks."""
    out = []
    for page in PAGES:
        for block in split(page.read_text())[1]:
            if block["info"] != "bash":
                continue
            for line in block["code"].replace("\\\n", " ").split("\n"):
                words = shlex.split(line, comments=True)
                if words[:1] == ["python"] and re.match(r"examples/(\w+)\.py$", words[1] if len(words) > 1 else ""):
                    out.append((page.name, Path(words[1]).stem, words[2:]))
    return out


@pytest.mark.parametrize(("page", "script", "argv"), command_lines())
def test_documented_command_lines_parse(page: str, script: str, argv: list[str]) -> None:
    """Every documented command line of the example scripts has flags and values their parsers take."""
    assert script in SCRIPTS, f"{page}: no parser check for examples/{script}.py"
    importlib.import_module(script).build_parser().parse_args(argv)


# ------------------------------------------------------------------------------------------------ results
def test_recommendation_table_says_what_the_code_returns() -> None:
    """docs/guide.md's settings columns are mmgibbs.recommend.RECOMMENDED, budget by budget."""
    prose = split((DOCS / "guide.md").read_text())[0]
    start = prose.index("## Which setting for which budget")
    rows = {}
    for line in prose[start:]:
        match = re.match(r"^\| (\d+) \|", line)
        if match:
            rows[int(match[1])] = [c.strip() for c in line.strip("|").split("|")]
        elif rows and not line.startswith("|"):
            break

    def written(settings: dict) -> str:
        return "`" + ", ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in settings.items()) + "`"

    assert sorted(rows) == sorted(RECOMMENDED)
    for budget, cells in rows.items():
        assert cells[1].startswith(written(RECOMMENDED[budget]["calibrated"])), (budget, cells[1])
        assert cells[2].startswith(written(RECOMMENDED[budget]["uncalibrated"])), (budget, cells[2])


def _renderers() -> dict:
    import benchmark

    return benchmark.renderers()


def test_results_page_has_a_block_for_every_section_and_no_other() -> None:
    found = {}
    for page in DOCS.glob("*.md"):
        for name in results_doc.blocks(page.read_text()):
            found[name] = page.name
    assert set(found) == set(_renderers())
    assert set(found.values()) == {results_doc.RESULTS_PAGE}


@pytest.mark.parametrize(
    "section",
    [
        "digits",
        "digits-levers",
        "single-level",
        "toy",
        "image-mixture",
        "speed",
        "families",
        "learned-mixture",
        "mnist",
        "energy",
        "latent",
        "conditional",
    ],
)
def test_results_block_is_what_its_committed_results_file_renders_to(section: str) -> None:
    path = DOCS / "results" / f"{section}.json"
    if not path.is_file():
        pytest.skip(
            f"no committed docs/results/{section}.json yet (the block holds the figures moved from the README)"
        )
    body = results_doc.blocks((DOCS / results_doc.RESULTS_PAGE).read_text())[section]
    assert body == _renderers()[section](json.loads(path.read_text())).rstrip("\n") + "\n"


def test_no_results_file_without_its_block() -> None:
    assert results_doc.stale_blocks(_renderers(), DOCS) == {}
