"""The documentation: a short README, a page per registered analysis, no link out of the repo.

Torch-free and fast: the analysis names are read from ``workbench/registry.py`` with ``ast``,
and the markdown files are read as text (the site itself is built by ``make docs``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 210

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
PARENT = re.compile(r"(?<![\w.:/])\.\./[^\s)`'\"<>|,;]*")
ABSOLUTE = re.compile(r"(?<![\w.$}~])/(?:work|home|root|tmp|Users|opt|mnt)/[^\s)`'\"<>]*")


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def registered_analyses() -> list[str]:
    tree = ast.parse((ROOT / "workbench" / "registry.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "_PACKAGES" for t in node.targets
        ):
            assert isinstance(node.value, ast.Tuple)
            return [ast.unparse(e).split(".")[-1] for e in node.value.elts]
    raise AssertionError("workbench/registry.py has no _PACKAGES tuple")


def link_targets(text: str) -> list[str]:
    """Targets of markdown links and reference definitions, outside code."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    return LINK.findall(prose) + REFERENCE.findall(prose)


def is_external(target: str) -> bool:
    """A URL with a scheme (http, https, mailto), except ``file:``."""
    scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*):", target)
    return scheme is not None and scheme.group(1).lower() != "file"


def inside(path: Path) -> bool:
    return path == ROOT or ROOT in path.parents


def problems_in(text: str, md: Path) -> list[str]:
    """Every link or path of ``text`` (the markdown file ``md``) that leaves the repository,
    is an absolute local path, or (a relative link) names a file that does not exist."""
    name = md.relative_to(ROOT) if inside(md) else md
    problems = []
    for target in link_targets(text):
        if target.startswith("#") or is_external(target):
            continue  # an anchor on the same page, or a public URL
        where = f"{name}: link {target!r}"
        if target.startswith(("file:", "/", "~")):
            problems.append(f"{where} is an absolute local path")
            continue
        resolved = (md.parent / target.split("#", 1)[0].split("?", 1)[0]).resolve()
        if not inside(resolved):
            problems.append(f"{where} points outside the repository")
        elif not resolved.exists():
            problems.append(f"{where} does not exist")
    for bare in PARENT.findall(text):  # bare ../ paths, in prose or code
        if not inside((md.parent / bare).resolve()):
            problems.append(f"{name}: path {bare!r} points outside the repository")
    for bare in ABSOLUTE.findall(text):
        problems.append(f"{name}: {bare!r} is an absolute local path")
    if "file://" in text:
        problems.append(f"{name}: a file:// URL")
    return problems


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines (at most {MAX_README_LINES}): move detail into docs/"
    )


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository(md: Path) -> None:
    problems = problems_in(md.read_text(encoding="utf-8"), md)
    assert not problems, "\n".join(problems)


def test_every_registered_analysis_has_a_page() -> None:
    names = registered_analyses()
    assert len(names) >= 18, names
    missing = [n for n in names if not (DOCS / "analyses" / f"{n}.md").exists()]
    assert not missing, f"no docs/analyses/<name>.md for: {', '.join(missing)}"
    pages = {p.stem for p in (DOCS / "analyses").glob("*.md")} - {"index"}
    stale = sorted(pages - set(names))
    assert not stale, f"pages for analyses that are not registered: {', '.join(stale)}"


def test_analysis_pages_carry_the_generated_options() -> None:
    """``docs/gen_api.py`` writes each analysis's options where its page has the marker."""
    missing = [
        n
        for n in registered_analyses()
        if "<!-- options -->" not in (DOCS / "analyses" / f"{n}.md").read_text(encoding="utf-8")
    ]
    assert not missing, f"no <!-- options --> marker on: {', '.join(missing)}"


def test_the_checker_catches_links_out_of_the_repository() -> None:
    page = DOCS / "analyses" / "head_detectors.md"  # read for its folder only
    bad = "[m](../../../shared/reference/metrics.md) [a](/work/x.md) [n](missing.md)"
    good = "[d](../definitions.md#head-detectors) [p](https://arxiv.org/abs/2404.15574) [s](#x)"
    code = "```\n[c](../../../in/a/fence.md)\n```\n`../../../shared/x.md`"
    assert len(link_targets(f"{bad}\n{good}\n{code}")) == 6  # the fenced link is not a link
    problems = problems_in(f"{bad}\n{good}\n{code}", page)
    assert sum("outside the repository" in p for p in problems) == 4, problems
    assert sum("absolute local path" in p for p in problems) == 2, problems
    assert sum("does not exist" in p for p in problems) == 1, problems
    assert problems_in(good, page) == []


def test_docstrings_never_point_outside_the_repository() -> None:
    """The API pages are generated from the docstrings: they must not send a reader to files a
    clone lacks (the team's reference notes live outside the repository)."""
    outside = re.compile(r"\.\./shared|shared/reference")
    hits = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in ("workbench", "app", "scripts", "benchmarks")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if outside.search(line)
    ]
    assert hits == []
