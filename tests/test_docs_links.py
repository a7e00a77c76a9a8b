"""The README and the pages in docs/: every relative link and image resolves, every `#anchor` names a heading of
its target page (GitHub's heading slugs), every plot in docs/ is shown on some page, and the README stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300

LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (links in code are not links)."""
    lines, in_code = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        if not in_code:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (not `-` or `_`), spaces to `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a Markdown page, with GitHub's `-1`, `-2` suffixes for repeated headings."""
    seen: dict[str, int] = {}
    result = set()
    for line in prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def relative_links(page: Path) -> list[str]:
    """The link and image targets of a page that point into the repository (not http:, mailto:, ...)."""
    targets = []
    for line in prose_lines(page.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                targets.append(target)
    return targets


@pytest.mark.parametrize("page", PAGES, ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in relative_links(page):
        path_part, _, fragment = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if not destination.exists():
            where = destination.relative_to(ROOT) if destination.is_relative_to(ROOT) else destination
            broken.append(f"{target}: {where} does not exist")
            continue
        if fragment and destination.suffix == ".md" and fragment not in anchors(destination):
            broken.append(f"{target}: no heading with the anchor #{fragment} in {destination.name}")
    assert not broken, f"{page.relative_to(ROOT)} has broken links:\n" + "\n".join(broken)


def test_every_plot_in_docs_is_shown_on_a_page():
    shown = {(page.parent / target.partition("#")[0]).resolve() for page in PAGES for target in relative_links(page)}
    orphans = sorted(path.name for path in (ROOT / "docs").glob("*.png") if path.resolve() not in shown)
    assert not orphans, f"plots in docs/ that no page shows (link them from their page, or delete them): {orphans}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in relative_links(ROOT / "README.md")}
    missing = sorted(page.name for page in PAGES[1:] if page.resolve() not in linked)
    assert not missing, f"docs pages the README does not link to: {missing}"


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move the detail to a page in docs/ and link it"
    )


def test_github_slug_matches_github():
    assert github_slug("Static cache and `torch.compile`") == "static-cache-and-torchcompile"
    assert github_slug("Fine-tuning with LoRA / DoRA") == "fine-tuning-with-lora--dora"
    assert (
        github_slug("LoRA with PEFT's defaults, the Trainer and TRL") == "lora-with-pefts-defaults-the-trainer-and-trl"
    )
    assert github_slug("`linear_attention`: gated linear attention") == "linear_attention-gated-linear-attention"
