#!/usr/bin/env python3
"""Checks that relative links in the repository's Markdown resolve.

    .ci/check-links.py            (from anywhere; checks README.md, docs/,
                                   each crate's README.md)

A link `[text](path)` or `[text](path#anchor)` must name a file or
directory that exists, relative to the document; `#anchor` (in the same
document or another Markdown file) must match one of its headings as
GitHub makes anchors of them. Links with a scheme (https:, mailto:) are
not fetched. Prints every broken link and exits 1 if there is one.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def documents():
    yield ROOT / "README.md"
    yield from sorted((ROOT / "docs").rglob("*.md"))
    yield from sorted(ROOT.glob("*/README.md"))


def outside_fences(text):
    """The numbered lines outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        if fence is None and stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
            continue
        if fence is not None:
            if stripped.startswith(fence):
                fence = None
            continue
        yield number, line


def prose(text):
    """The lines outside fenced code blocks, inline code blanked out."""
    for number, line in outside_fences(text):
        yield number, re.sub(r"`[^`]*`", "``", line)


def raw_headings_text(path):
    """The text outside fenced code blocks, inline code kept: headings
    keep its words in their anchors."""
    text = path.read_text(encoding="utf-8")
    return "\n".join(line for _, line in outside_fences(text))


def heading_anchors(path):
    seen = {}
    result = set()
    for line in raw_headings_text(path).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = heading.group(1).lower()
        slug = re.sub(r"[^\w\- ]", "", slug).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def main():
    broken = []
    checked = 0
    for document in documents():
        if not document.is_file():
            continue
        text = document.read_text(encoding="utf-8")
        for number, line in prose(text):
            for match in LINK.finditer(line):
                target = match.group(1)
                if SCHEME.match(target) or target.startswith("<"):
                    continue
                checked += 1
                path_part, _, anchor = target.partition("#")
                resolved = (document.parent / path_part) if path_part else document
                where = f"{document.relative_to(ROOT)}:{number}: {target}"
                if not resolved.exists():
                    broken.append(f"{where}: no such file")
                elif anchor and resolved.suffix == ".md":
                    if anchor not in heading_anchors(resolved):
                        broken.append(f"{where}: no heading #{anchor}")
    for line in broken:
        print(line)
    print(f"{checked} relative links checked, {len(broken)} broken")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
