"""The documentation stays honest: the README opens with the two commands a new user runs,
stays short, and every relative link in it and in docs/ leads to a file in the repository
(and, with a #fragment into Markdown, to a heading there). Nothing points outside the
repository."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
MAX_README_LINES = 150
# Directories that hold no documentation: environments, caches, build outputs, expert sets.
SKIP_DIRS = {"experts", "node_modules", "build", "dist", "__pycache__"}
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
# Names of files that live outside the repository, which no file may point at. Built from
# parts so that this test does not match itself.
OUTSIDE = ("MORA_" + "SPEC.md", "DESIGN" + ".md", "../" + "shared")
SCANNED_SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".c", ".h", ".cpp", ".cfg", ".txt"}


def doc_files() -> list[Path]:
    return [README, *sorted((REPO / "docs").rglob("*.md"))]


def repo_files(suffixes: set[str]) -> list[Path]:
    """Files of the checkout with these suffixes, without hidden or generated directories."""
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [
            d for d in dirs if not (d.startswith(".") or d in SKIP_DIRS or d.endswith(".egg-info"))
        ]
        for name in files:
            path = Path(root) / name
            if path.suffix in suffixes or name in {"Makefile", "Dockerfile"}:
                found.append(path)
    return found


def prose(text: str) -> str:
    """Markdown without code blocks and inline code, where link syntax is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def relative_links(text: str) -> list[str]:
    targets = [m.group(1) for m in LINK.finditer(prose(text))]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(FENCE.sub("", path.read_text()))}


def first_commands(text: str) -> list[str]:
    """Command lines of the README's first code block (comments stripped)."""
    block = re.search(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S)
    assert block is not None, "the README has no code block"
    lines = (line.split("#", 1)[0].strip() for line in block.group(1).splitlines())
    return [line for line in lines if line]


def test_readme_is_short() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) < MAX_README_LINES, f"README.md has {len(lines)} lines"


def test_readme_opens_with_make_run_and_make_test() -> None:
    text = README.read_text()
    assert text.lstrip().startswith("```"), "the README must open with the commands"
    assert first_commands(text)[:2] == ["make run", "make test"]
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
    assert {"run", "test"} <= targets


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve_inside_the_repository(doc: Path) -> None:
    broken = []
    for target in relative_links(doc.read_text()):
        path_part, _, fragment = target.partition("#")
        path = (doc.parent / path_part).resolve() if path_part else doc
        if not path.is_relative_to(REPO) or not path.exists():
            broken.append(f"{target} (no such file in the repository)")
        elif fragment and path.suffix == ".md" and fragment.lower() not in anchors(path):
            broken.append(f"{target} (no heading #{fragment} in {path.name})")
    assert not broken, f"{doc.relative_to(REPO)}: {broken}"


def test_link_checker_sees_links_and_anchors() -> None:
    text = (
        "[a](docs/spec.md) ![b](x.png) [c](https://example.com) `[d](e.md)` [f](#g)\n"
        "```\n[h](i.md)\n```\n"
    )
    assert relative_links(text) == ["docs/spec.md", "x.png", "#g"]
    assert slug("Metrics of a continual-learning run") == "metrics-of-a-continual-learning-run"
    assert (
        slug("Engine (`benchmarks/decode.py`, in-process)")
        == "engine-benchmarksdecodepy-in-process"
    )
    assert slug("`max_tokens` limits") == "max_tokens-limits"
    assert first_commands("```bash\nmake run   # serve\n# note\nmake test\n```\n") == [
        "make run",
        "make test",
    ]


def test_nothing_points_outside_the_repository() -> None:
    offenders = [
        f"{path.relative_to(REPO)}: {name}"
        for path in repo_files(SCANNED_SUFFIXES)
        if path != Path(__file__).resolve()
        for name in OUTSIDE
        if name in path.read_text(errors="replace")
    ]
    assert not offenders, offenders
