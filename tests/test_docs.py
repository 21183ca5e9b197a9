"""The documents' own links: README.md and docs/*.md point at files that exist and at headings they have."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ("README.md", "ARCHITECTURE.md", "docs/BENCHMARKS.md", "docs/DATA-DIR.md")


def _prose(text):
    """The text outside fenced code blocks (a `# comment` in a shell block is no heading, a `](x)` no link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def _anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation but hyphens and underscores dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path):
    with open(path) as f:
        return {_anchor(h) for h in re.findall(r"^#+ (.*)$", _prose(f.read()), re.M)}


def _broken_links(document):
    """Each relative link of the document whose file is missing, or whose #anchor names no heading of it."""
    path = os.path.join(ROOT, document)
    with open(path) as f:
        links = re.findall(r"\]\(([^)\s]+)\)", _prose(f.read()))
    broken = []
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue  # http(s), mailto: not checked here (no network)
        target, _, anchor = link.partition("#")
        target_path = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
        if not os.path.exists(target_path) or (anchor and anchor not in _anchors(target_path)):
            broken.append(link)
    return broken


def test_readme_and_docs_links_resolve():
    """The README's benchmark tables link into docs/BENCHMARKS.md by heading: a renamed heading breaks them."""
    broken = {document: _broken_links(document) for document in DOCUMENTS}
    assert broken == {document: [] for document in DOCUMENTS}
