"""The repository's documents stand on their own: no tracked file refers to a design document or a folder
outside the repository, every relative link of README.md, docs/design.md and the other entry documents leads
to a file of the repository (and to a heading there, when it names an anchor), and every section of
docs/design.md that the code cites by name exists."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"

# (spelled in pieces, so that this file does not hold the strings it looks for)
OUTSIDE_REFERENCES = ("DESIGN" + ".md", ".." + "/shared")


def tracked_files() -> list[Path]:
    """The files git tracks in this checkout (skips the test outside a git checkout: an unpacked sdist)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


def is_binary(data: bytes) -> bool:
    """Git's test: a NUL byte among the first 8,000 bytes."""
    return b"\0" in data[:8000]


def text_of_tracked_files() -> dict[str, str]:
    texts = {}
    for path in tracked_files():
        if not path.is_file():  # (deleted in the work tree, not yet in the index)
            continue
        data = path.read_bytes()
        if not is_binary(data):
            texts[path.relative_to(ROOT).as_posix()] = data.decode("utf-8", errors="replace")
    return texts


def test_is_binary_tells_text_from_binary():
    assert not is_binary(b"plain text\nwith two lines\n")
    assert is_binary(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    assert is_binary(b"x" * 7999 + b"\0")
    assert not is_binary(b"x" * 8000 + b"\0")  # (past the first 8,000 bytes, as git)


def test_no_tracked_file_refers_to_documents_outside_the_repository():
    texts = text_of_tracked_files()
    assert "docs/design.md" in texts and "README.md" in texts  # (the scan reads the files it should)
    found = []
    for name, text in sorted(texts.items()):
        for number, line in enumerate(text.splitlines(), start=1):
            for needle in OUTSIDE_REFERENCES:
                if needle in line:
                    found.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not found, (
        f"{len(found)} line(s) refer to a document outside the repository (cite docs/design.md instead):\n"
        + "\n".join(found)
    )


#: Markdown links ``[text](target)`` and images ``![alt](target)``; the target ends at a space or ``)``.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(markdown: str) -> list[str]:
    """The link targets of ``markdown`` that point into the repository (no scheme, no bare anchor)."""
    targets = []
    for target in _LINK.findall(markdown):
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http:, https:, mailto:, ...; anchors within the page
        targets.append(target)
    return targets


def test_relative_links_are_found():
    text = 'see [a](../README.md) and [b](https://x.org/y) and ![c](img/p.png "t") and [d](#top) [e](f.md#s)'
    assert relative_links(text) == ["../README.md", "img/p.png", "f.md#s"]


#: The documents whose relative links are checked (the user's and the maintainers' entry points).
LINKED_DOCUMENTS = ("README.md", "docs/design.md", "CHANGELOG.md", "benchmarks/README.md", "tfp_kernels/data/README.md")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation other than ``-`` and ``_``
    dropped (backticks, dots, question marks, parentheses...), spaces turned into ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_github_anchor():
    assert github_anchor("Does TFP help? Training effect (`train_effect.py`)") == (
        "does-tfp-help-training-effect-train_effectpy"
    )
    assert github_anchor("Plan: N = 10^8, D = 768") == "plan-n--108-d--768"


def anchors_of(markdown: str) -> set[str]:
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+)$", markdown, re.MULTILINE)}


@pytest.mark.parametrize("document", LINKED_DOCUMENTS)
def test_relative_links_point_to_files_of_the_repository(document):
    source = ROOT / document
    text = source.read_text(encoding="utf-8")
    links = relative_links(text)
    if document in ("README.md", "docs/design.md"):
        assert links, f"{document} has no relative link: the test would check nothing"
    tracked = {path.resolve() for path in tracked_files()} | {source.resolve()}
    bad = []
    for target in links:
        name, _, anchor = target.partition("#")
        path = (source.parent / name).resolve()
        if ROOT not in path.parents or not path.is_file() or path not in tracked:
            bad.append(target)
        elif anchor and path.suffix == ".md" and anchor not in anchors_of(path.read_text(encoding="utf-8")):
            bad.append(f"{target} (no heading with that anchor)")
    assert not bad, f"{document} links to files that are not in the repository: {bad}"


def design_sections() -> set[str]:
    """The headings of docs/design.md, without their ``#`` marks."""
    text = DESIGN.read_text(encoding="utf-8")
    return {m.group(1).strip() for m in re.finditer(r"^#{1,6}\s+(.+)$", text, re.MULTILINE)}


#: A citation of a section: the file's path (or a Markdown link to it) followed by ``, 'Section'``,
#: `` ('Section')`` or ``'s 'Section'``, and possibly `` and 'Other section'``.
_CITATION = re.compile(r"docs/design\.md\)?(?:'s|,| \(|: )\s*((?:'[^']+'(?:,? and |, )?)+)")


def cited_sections(text: str) -> list[str]:
    return [name for group in _CITATION.findall(text) for name in re.findall(r"'([^']+)'", group)]


def test_cited_sections_are_found():
    doc = "docs/design" + ".md"  # (not a citation of this file's own)
    text = f"x ({doc}, 'The rule') y {doc}'s 'A' z {doc} ('B' and 'C') [{doc}](../{doc}), 'D' {doc}."
    assert cited_sections(text) == ["The rule", "A", "B", "C", "D"]


def test_sections_cited_in_the_repository_exist():
    sections = design_sections()
    cited = {}
    for name, text in text_of_tracked_files().items():
        for section in cited_sections(text):
            cited.setdefault(section, []).append(name)
    assert cited, "no file cites a section of docs/design.md: the test would check nothing"
    missing = {section: files for section, files in cited.items() if section not in sections}
    assert not missing, (
        f"sections cited but not in docs/design.md (its headings: {sorted(sections)}): {missing}"
    )
