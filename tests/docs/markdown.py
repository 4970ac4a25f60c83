"""What the docs tests read in markdown: fenced blocks, links, and headings' anchors as GitHub
makes them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_FENCE = re.compile(r"^ {0,3}(```+|~~~+)\s*([\w+-]*)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HTML_TARGET = re.compile(r"""<(?:img|a)\b[^>]*?\b(?:src|href)=["']([^"']+)["']""")
_HTML_ANCHOR = re.compile(r"""<a\b[^>]*?\b(?:name|id)=["']([^"']+)["']""")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    line: int  # of the opening fence, 1-based


def blocks(text: str) -> list[Block]:
    """Fenced code blocks, with their info-string language."""
    out: list[Block] = []
    fence: str | None = None
    lang, start, body = "", 0, []
    for n, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence, lang, start, body = match.group(1), match.group(2), n, []
        elif fence is not None and line.strip().startswith(fence) and not line.strip(fence[0]):
            out.append(Block(lang, "\n".join(body), start))
            fence = None
        elif fence is not None:
            body.append(line)
    return out


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced blocks, with inline code spans blanked."""
    out = []
    fence: str | None = None
    for n, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            continue
        if fence is not None:
            if line.strip().startswith(fence) and not line.strip(fence[0]):
                fence = None
            continue
        out.append((n, _INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text, lower case, without punctuation other
    than hyphens and underscores, spaces as hyphens."""
    text = _INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor a page has: its headings' (``-1``, ``-2`` for repeats) and HTML ones."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for _, line in _raw_prose(text):
        heading = _HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
        out.update(_HTML_ANCHOR.findall(line))
    return out


def _raw_prose(text: str) -> list[tuple[int, str]]:
    """Lines outside fenced blocks, inline code kept (headings' anchors include it)."""
    inside: set[int] = set()
    for block in blocks(text):
        inside.update(range(block.line, block.line + block.text.count("\n") + 2))
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if n not in inside]


def links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every link and image that is not an absolute URL."""
    out = []
    for n, line in prose_lines(text):
        for target in _LINK.findall(line) + _HTML_TARGET.findall(line):
            if not _SCHEME.match(target) and not target.startswith("//"):
                out.append((n, target))
    return out


def broken_links(page: Path, root: Path) -> list[str]:
    """Each relative link of ``page`` that does not resolve inside ``root``: a missing file or
    folder, or an anchor the target page does not have."""
    problems = []
    for n, target in links(page.read_text(encoding="utf-8")):
        path_part, _, anchor = target.partition("#")
        where = f"{page.relative_to(root)}:{n}: {target}"
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.is_relative_to(root.resolve()):
            problems.append(f"{where}: outside the repository")
        elif not resolved.exists():
            problems.append(f"{where}: no such file")
        elif anchor and (resolved.suffix != ".md" or resolved.is_dir()):
            problems.append(f"{where}: an anchor into something that is not a page")
        elif anchor and anchor not in anchors(resolved.read_text(encoding="utf-8")):
            problems.append(f"{where}: no heading with that anchor")
    return problems
