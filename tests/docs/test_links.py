"""Every relative link and #anchor in README.md and docs/ resolves, anchors as GitHub makes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs.markdown import anchors, blocks, broken_links, links, slug

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken_links(page, ROOT) == []


def test_the_docs_folder_is_linked_from_the_readme():
    targets = {t.partition("#")[0] for _, t in links((ROOT / "README.md").read_text())}
    pages = {str(p.relative_to(ROOT)) for p in PAGES[1:]}
    assert pages <= targets, f"not linked from README.md: {sorted(pages - targets)}"


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        # As GitHub renders them (checked against the README's own links of 2026-12).
        ("CPU: the INT8 graph", "cpu-the-int8-graph"),
        (
            "The edge: nginx + sidecar + Thumbor (`make run`)",
            "the-edge-nginx--sidecar--thumbor-make-run",
        ),
        ("`[server]`", "server"),
        ("What holds with the sidecar down", "what-holds-with-the-sidecar-down"),
        (
            "Read-out v2: every set, a torch head (issue 14)",
            "read-out-v2-every-set-a-torch-head-issue-14",
        ),
        ("[Faces](faces.md) and fixations", "faces-and-fixations"),
        ("heat_map é", "heat_map-é"),
    ],
)
def test_anchors_are_githubs(heading, anchor):
    assert slug(heading) == anchor


def test_repeated_headings_get_numbered_anchors():
    assert anchors("# A\n## A\n```\n# not a heading\n```\n### A\n") == {"a", "a-1", "a-2"}


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# Real heading\n")
    page = tmp_path / "a.md"
    page.write_text(
        "# Top\n"
        "[ok](docs/b.md#real-heading) [ok](#top) ![img](docs) `[code](nowhere.md)`\n"
        "[gone](docs/c.md) [bad anchor](docs/b.md#fake) [self](#nope) "
        "[out](../elsewhere.md) [web](https://example.com/x.md)\n"
        "```\n[in a block](nowhere.md)\n```\n"
    )
    found = broken_links(page, tmp_path)
    assert [p.split(": ")[1] for p in found] == [
        "docs/c.md",
        "docs/b.md#fake",
        "#nope",
        "../elsewhere.md",
    ]


def test_blocks_are_read_with_their_language():
    (block,) = blocks("text\n```sh\nmake run\n```\n")
    assert (block.lang, block.text, block.line) == ("sh", "make run", 2)
