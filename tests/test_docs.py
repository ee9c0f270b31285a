"""The docs the code cites exist, with the sections and notes it names, and the code cites nothing outside the repo.

Pure text checks (no model, no Flower): every ``docs/<name>.md`` mentioned in the sources exists; every
"docs/algorithms.md section N" (also "sections N, M" / "sections N and M") names a heading ``## N.`` of
docs/algorithms.md, and every "docs/flower-notes.md note N" a heading ``### Note N.`` of docs/flower-notes.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CITING_DIRS = ("fedlora", "server", "client", "simulations", "benchmarks", "tests")
CODE_DIRS = ("fedlora", "server", "client", "simulations", "benchmarks", "tests")
# Phrases that point at material outside the repository (the research notes the docs were written from).
OUTSIDE = ("../shared", "flower.md trap", "spec section", "privacy-and-adapters")
OUTSIDE_IN_DOCS = (*OUTSIDE, "/work/shared", "flower.md")
SKIP_PARTS = {"__pycache__", ".venv", ".git", "runs"}

_NUMBERS = r"(\d+(?:\s*(?:,|and)\s*\d+)*)"
DOC_REF = re.compile(r"(?<![\w/.-])docs/([\w.-]+?)\.md\b")
SECTION_REF = re.compile(r"(?<![\w/.-])docs/algorithms\.md,?\s+sections?\s+" + _NUMBERS)
NOTE_REF = re.compile(r"(?<![\w/.-])docs/flower-notes\.md,?\s+notes?\s+" + _NUMBERS)
SECTION_HEADING = re.compile(r"^## (\d+)\.", re.M)
NOTE_HEADING = re.compile(r"^#{2,4} Note (\d+)\.", re.M)


def _files(dirs: tuple[str, ...], suffixes: tuple[str, ...], root: Path = ROOT) -> Iterator[Path]:
    for d in dirs:
        for path in sorted((root / d).rglob("*")):
            if path.suffix in suffixes and path.is_file() and not SKIP_PARTS & set(path.relative_to(root).parts):
                yield path


def _citing_files() -> list[Path]:
    extra = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    return [*_files(CITING_DIRS, (".py", ".md")), *(p for p in extra if p.is_file())]


def _text(path: Path) -> str:
    """File text with line breaks (and a comment's leading '#') folded into one space, so a citation wrapped
    over two lines still reads as one."""
    return re.sub(r"[ \t]*\n[ \t]*#*[ \t]*", " ", path.read_text(encoding="utf-8"))


def _numbers(group: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", group)]


def _where(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_cited_doc_pages_exist() -> None:
    missing = sorted(
        {f"{_where(p)}: docs/{m.group(1)}.md" for p in _citing_files() for m in DOC_REF.finditer(_text(p))
         if not (DOCS / f"{m.group(1)}.md").is_file()}
    )
    assert not missing, "cited docs pages that do not exist:\n" + "\n".join(missing)


def _check_numbered(ref: re.Pattern[str], page: str, heading: re.Pattern[str], kind: str) -> int:
    """Assert every ``ref`` citation names an existing heading of docs/``page``; return how many were checked."""
    doc = DOCS / page
    assert doc.is_file(), f"docs/{page} is missing"
    have = {int(n) for n in heading.findall(doc.read_text(encoding="utf-8"))}
    bad, seen = [], 0
    for path in _citing_files():
        for m in ref.finditer(_text(path)):
            for n in _numbers(m.group(1)):
                seen += 1
                if n not in have:
                    bad.append(f"{_where(path)}: '{m.group(0)}' names {kind} {n}")
    assert not bad, f"docs/{page} has {kind}s {sorted(have)}; citations of missing ones:\n" + "\n".join(bad)
    return seen


def test_cited_algorithm_sections_exist() -> None:
    assert _check_numbered(SECTION_REF, "algorithms.md", SECTION_HEADING, "section") > 0  # the pattern still matches


def test_cited_flower_notes_exist() -> None:
    assert _check_numbered(NOTE_REF, "flower-notes.md", NOTE_HEADING, "note") > 0


def test_numbering_is_consecutive() -> None:
    """Sections 0-16 of docs/algorithms.md and notes 1-14 of docs/flower-notes.md, in order, none skipped."""
    sections = [int(n) for n in SECTION_HEADING.findall((DOCS / "algorithms.md").read_text(encoding="utf-8"))]
    notes = [int(n) for n in NOTE_HEADING.findall((DOCS / "flower-notes.md").read_text(encoding="utf-8"))]
    assert sections == list(range(17)), f"docs/algorithms.md sections: {sections}"
    assert notes == list(range(1, 15)), f"docs/flower-notes.md notes: {notes}"


def test_citation_patterns() -> None:
    found = [m.group(1) for m in SECTION_REF.finditer("see docs/algorithms.md sections 8 and 11, and docs/algorithms.md"
                                                      " sections 5, 6; docs/algorithms.md section 4.")]
    assert [_numbers(g) for g in found] == [[8, 11], [5, 6], [4]]
    assert [m.group(1) for m in NOTE_REF.finditer("(docs/flower-notes.md note 7)")] == ["7"]
    sample = "D/a.md, x/D/b.md, myD/c.md, `D/d-e.md`".replace("D/", "docs/")  # not literal: this file is scanned too
    assert [m.group(1) for m in DOC_REF.finditer(sample)] == ["a", "d-e"]


def test_code_cites_nothing_outside_the_repository() -> None:
    me = Path(__file__).resolve()
    bad = [f"{_where(p)}: {phrase!r}" for p in _files(CODE_DIRS, (".py",)) if p.resolve() != me
           for phrase in OUTSIDE if phrase in p.read_text(encoding="utf-8").lower()]
    assert not bad, "code refers to material outside the repository:\n" + "\n".join(bad)


def test_docs_cite_nothing_outside_the_repository() -> None:
    bad = [f"{_where(p)}: {phrase!r}" for p in sorted(DOCS.glob("*.md"))
           for phrase in OUTSIDE_IN_DOCS if phrase in p.read_text(encoding="utf-8").lower()]
    assert not bad, "docs refer to material outside the repository:\n" + "\n".join(bad)
