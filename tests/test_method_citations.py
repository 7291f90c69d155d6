"""Code and tests cite the method as ``docs/method.md §N.M``: every cited section exists as a
heading there, and nothing cites documents that are not in the repository (a "SPEC §"
outside it, issue numbers)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
SOURCES = ("robaudit", "tests", "benchmarks", "sample_models")
SUFFIXES = (".py", ".md", ".yaml", ".toml")

#: ``docs/method.md`` followed by one or more section numbers: "§3.2", "§2, §3", "§8.1–§8.3".
CITATION = re.compile(r"docs/method\.md((?:\s*(?:,|–|-|and|or)?\s*§\d+(?:\.\d+)*)+)")
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{2,4} §(\d+(?:\.\d+)*)\s", re.MULTILINE)
#: A number written as an issue reference: "issue 3", "issues 2 and 5", "(#12)".
ISSUE = re.compile(r"\bissues? #?\d+|\(#\d+\)", re.IGNORECASE)


def _texts() -> dict[str, str]:
    files = [p for d in SOURCES for p in (ROOT / d).rglob("*") if p.suffix in SUFFIXES and p.is_file()]
    this = Path(__file__).resolve()
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in files if p.resolve() != this}


def cited_sections(text: str) -> set[str]:
    """Every section number cited after ``docs/method.md`` in ``text``."""
    return {number for match in CITATION.finditer(text) for number in SECTION.findall(match.group(1))}


def test_the_citation_pattern_reads_lists_of_sections():
    text = "see docs/method.md §2, §3.1 and docs/method.md §10.2 (and §99 elsewhere)"
    assert cited_sections(text) == {"2", "3.1", "10.2"}


def test_every_cited_section_is_a_heading_of_the_method():
    headings = set(HEADING.findall(METHOD.read_text(encoding="utf-8")))
    assert {"3.3", "6.3", "10"} <= headings  # the pattern reads the page's headings
    missing = {
        f"{path}: §{number}"
        for path, text in _texts().items()
        for number in cited_sections(text)
        if number not in headings
    }
    assert not missing, f"cited sections that docs/method.md does not have: {sorted(missing)}"


def test_nothing_cites_the_spec_or_issue_numbers():
    offenders = sorted(
        f"{path}:{n}: {line.strip()}"
        for path, text in _texts().items()
        for n, line in enumerate(text.splitlines(), 1)
        if "SPEC §" in line or ISSUE.search(line)
    )
    assert not offenders, "cite docs/method.md §N.M or a README section instead:\n" + "\n".join(offenders)
