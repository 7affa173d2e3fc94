"""The README and the pages in docs/ say what the code does.

- The README's quickstart runs as written (in a scratch directory).
- Every ```python block of every docs/ page runs, in order, in one namespace per page and in
  a scratch directory. A block that only illustrates (it needs your data, a GPU or minutes)
  is marked ```python skip and is not run; any other language tag (bash, text) is not run.
- Every relative link and image in the README and docs/ points to a file that exists, and a
  link to a heading (page.md#heading) to a heading of that page.
- The README's glossary is the one in docs/concepts.md, and docs/api.md documents every name
  in ``depgraph.__all__``.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterator

import pytest

import depgraph

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))

FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def code_blocks(path: pathlib.Path, info: str) -> Iterator[tuple[int, str]]:
    """(first line number, code) of every fenced block of ``path`` whose info string is ``info``."""
    text = path.read_text()
    for match in FENCE.finditer(text):
        if match.group(1).strip() == info:
            yield text.count("\n", 0, match.start(2)), match.group(2)


def run_blocks(path: pathlib.Path, blocks: list[tuple[int, str]]) -> dict[str, object]:
    """Run ``blocks`` in order in one namespace; tracebacks name the page and its line numbers."""
    namespace: dict[str, object] = {"__name__": f"docs.{path.stem}"}
    for line, code in blocks:
        exec(compile("\n" * line + code, str(path), "exec"), namespace)
    return namespace


def test_readme_workflow_example_runs(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = list(code_blocks(README, "python"))
    assert "depgraph.solve" in blocks[0][1] and "Plan.load" in blocks[0][1]
    monkeypatch.chdir(tmp_path)
    run_blocks(README, blocks[:1])
    assert (tmp_path / "resnet18-half.json").exists()


RUNNABLE = [p for p in PAGES if any(code_blocks(p, "python"))]


@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(DOCS)) for p in RUNNABLE])
def test_docs_examples_run(page: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from passes.rules import RULES
    from passes.rules.aten import EXPORT_RULES

    monkeypatch.chdir(tmp_path)
    tables = [(table, dict(table)) for table in (RULES, EXPORT_RULES)]
    try:
        run_blocks(page, list(code_blocks(page, "python")))
    finally:  # a page may register rules (guides/new-op-rule.md): leave the tables as they were
        for table, saved in tables:
            table.clear()
            table.update(saved)


def _slug(heading: str) -> str:
    """The anchor GitHub and myst-parser give a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def test_relative_links_point_to_existing_files_and_headings() -> None:
    broken = []
    for page in [README, *PAGES]:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def _glossary(path: pathlib.Path) -> list[str]:
    """The rows of the first table after the page's "## Glossary" heading."""
    lines = path.read_text().split("## Glossary\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_the_readme_glossary_is_the_concepts_glossary() -> None:
    rows = _glossary(README)
    assert [r.split("|")[1].strip() for r in rows[2:]] == ["atom", "unit", "group", "member", "pinned", "plan", "block"]
    assert rows == _glossary(DOCS / "concepts.md")


def test_the_api_reference_documents_every_public_name() -> None:
    text = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"^\.\. auto\w+:: (?:depgraph\.errors\.|depgraph\.)?(\w+)", text, re.M))
    assert set(depgraph.__all__) - documented == set()
    assert set(depgraph.errors.__all__) - documented == set()
