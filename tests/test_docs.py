"""The user-facing docs: links resolve, the README stays short and keeps its commands, and
nothing cites documents users cannot see."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8"))
    local = [link for link in links if "://" not in link and not link.startswith("mailto:")]
    missing = [link for link in local if not (doc.parent / link).exists()]
    assert not missing, f"{doc.name} links to missing files: {missing}"


def test_no_citations_of_internal_seed_documents():
    """'seed 000' / 'seed 004' name documents users never see: describe the idea in words."""
    files = DOCS + sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "examples").rglob("*.py"))
    files += sorted((ROOT / "benchmarks").rglob("*.py"))
    pattern = re.compile(r"seeds?[ /_]?0\d\d", re.IGNORECASE)
    hits = [f"{f.relative_to(ROOT)}:{n}: {line.strip()}" for f in files
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
            if pattern.search(line)]
    assert not hits, "\n".join(hits)


def test_readme_is_a_first_visit():
    """At most 10 KB (the details live in the site), with the commands CI runs, word for word."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) <= 10 * 1024, len(readme.encode())
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    install = re.search(r'pip install -q -c constraints.txt -e "(\.\[[a-z,]+\])"', ci)[1]
    assert f'.venv/bin/pip install -c constraints.txt -e "{install}"' in readme
    assert '.venv/bin/pip install --no-deps -c constraints.txt "timm==1.0.31"' in ci + readme
    assert ".venv/bin/python -m pytest\n" in ci and "&& .venv/bin/python -m pytest\n" in readme
    assert '-e ".[docs]"' in ci and "mkdocs build --strict" in ci
    assert '-e ".[docs]" && .venv/bin/mkdocs build --strict' in readme
    assert "&& .venv/bin/emakit demo\n" in readme


def test_every_docs_page_is_in_the_site():
    """Each page under docs/ is in mkdocs.yml's nav (a page left out is unreachable)."""
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", config, re.MULTILINE))
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")
             if "_ext" not in p.parts}
    assert pages == nav, (sorted(pages - nav), sorted(nav - pages))
