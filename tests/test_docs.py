"""The repository is self-contained: every reference in its code and docs to a document resolves inside it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for pattern in ("*.py", "gptneox/**/*.py", "kernels/**/*.py", "benchmarks/*.py", "tests/**/*.py",
                             "examples/**/*.py", "*.md", "docs/*.md") for p in ROOT.glob(pattern)]
# docs/architecture.md, "Forward pass" and "Half precision"  |  architecture.md, "Presets"  |  architecture.md#presets;
# not part of a URL or another path
CITATION = re.compile(r'(?<![\w/.-])(?:(docs/)([a-z_]+)\.md|([a-z_]+)\.md(?=, "|#))'
                      r'(?:,\s+"([^"]+)"(?:\s+and\s+"([^"]+)")?|#([a-z0-9-]+))?')


def sections(doc: Path) -> set[str]:
    return {line[3:].strip() for line in doc.read_text().splitlines() if line.startswith("## ")}


def anchor(title: str) -> str:  # GitHub's heading anchors
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def test_no_reference_leaves_the_repository():
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in SOURCES if p.name != "test_docs.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if "shared/docs" in line or "neox-spec" in line]
    assert not offenders, f"references to documents outside the repository: {offenders}"


def test_docs_and_code_point_users_at_no_file_outside_the_repository():
    """The tests read ../shared/data (CI has it beside the clone); a user's clone does not: docs and code say where a
    user gets such a file instead (any Pythia checkpoint's tokenizer.json)."""
    user_facing = [p for p in SOURCES if "tests" not in p.relative_to(ROOT).parts]
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in user_facing for i, line in
                 enumerate(p.read_text().splitlines(), 1) if "../shared" in line or "shared/data" in line]
    assert not offenders, f"paths outside the repository in docs or code: {offenders}"


def test_every_cited_document_and_section_exists():
    missing = []
    for p in SOURCES:
        for m in CITATION.finditer(p.read_text()):
            name = m.group(2) or m.group(3)
            titles, hash_ = [" ".join(t.split()) for t in m.group(4, 5) if t], m.group(6)
            doc = ROOT / "docs" / f"{name}.md"
            if not doc.exists():
                missing.append(f"{p.relative_to(ROOT)}: {m.group(0)} (no {doc.relative_to(ROOT)})")
                continue
            have = sections(doc)
            missing += [f"{p.relative_to(ROOT)}: {m.group(0)} (no section {t!r})" for t in titles if t not in have]
            if hash_ and hash_ not in {anchor(t) for t in have}:
                missing.append(f"{p.relative_to(ROOT)}: {m.group(0)} (no anchor #{hash_})")
    assert not missing, "\n".join(missing)
