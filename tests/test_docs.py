"""The README and docs stay true to the tree: every relative link resolves."""

import re

from helpers import ROOT

LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_every_relative_link_in_the_markdown_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert len(pages) > 3 and not broken, broken
