"""Robust parsers for the bullet lists that the split and change-question models write.

Real outputs are messy: a header or none, ``-``/``*``/``•``/``1.``/``(2)`` markers, markdown bold, an item
wrapped over two lines, a chatty preamble, the model running on into a second ``###`` section, the template's
``{Extracted fact 1}`` echoed back, end-of-turn tokens. ``parse_bullets`` returns the items in order, or None
when the text has no recognisable list (the caller records it as unparseable instead of guessing).
"""

from __future__ import annotations

import re

FACTS_HEADER = "Facts"
QUESTIONS_HEADER = "Modified sentences"

_MARKER = re.compile(r"^\s*(?:[-*•·–]|\(?\d{1,3}[.)]|\(?[a-z][.)](?=\s))\s*(.*\S)?\s*$")
_HEADER = re.compile(r"^\s*(?:#{1,6}\s*)?\**\s*([A-Za-z][A-Za-z \-]{0,40}?)\s*\**\s*:?\s*\**\s*$")
_SPECIAL = re.compile(r"<\|[^|>]{1,40}\|>|</s>|<s>|<eos>|<end_of_turn>|\[/?INST\]")
_PLACEHOLDER = re.compile(r"^\{[^{}]*\}$|^\.{2,}$|^…$")
_NONE_ITEM = re.compile(r"^(?:none|n/a|no facts?(?: found| mentioned)?\.?)$", re.IGNORECASE)


def clean_item(text: str) -> str:
    """Strip markdown emphasis, quotes and stray whitespace from one list item."""
    text = re.sub(r"\*\*|__", "", text).strip()
    text = text.strip("`").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return re.sub(r"\s+", " ", text)


def _header_name(line: str) -> str | None:
    """The name of a section header line (``### Facts:``, ``**Facts**``, ``Facts:``), else None."""
    if _MARKER.match(line) and not line.lstrip().startswith(("#", "**")):
        return None
    stripped = line.strip()
    if not (stripped.startswith("#") or stripped.endswith(":") or stripped.startswith("**")):
        return None
    m = _HEADER.match(line)
    return m.group(1).strip().lower() if m else None


def _section(lines: list[str], header: str) -> tuple[list[str], bool]:
    """Lines of the first section named ``header`` (up to the next header); (all lines, False) if absent."""
    want = header.lower()
    for i, line in enumerate(lines):
        name = _header_name(line)
        if name is not None and name.rstrip(":") == want:
            body: list[str] = []
            for nxt in lines[i + 1 :]:
                if nxt.lstrip().startswith("#") or (_header_name(nxt) is not None and body):
                    break
                body.append(nxt)
            return body, True
    return lines, False


def parse_bullets(text: str, header: str | None = None) -> list[str] | None:
    """Items of the bullet list in ``text``, in order.

    Args:
        text: raw model output.
        header: section name to read (``"Facts"`` for ``### Facts:``); when present in the text only that
            section is read, when absent the whole text is.

    Returns:
        The items (possibly empty when the header is there with nothing under it), or None when the output has
        neither the header nor any bullet line, i.e. cannot be read as a list.

    Example:
        >>> parse_bullets("Sure!\\n### Facts:\\n- A cat.\\n- A dog.\\n### Question-answer pair:\\n- x", "Facts")
        ['A cat.', 'A dog.']
    """
    text = _SPECIAL.sub("\n", text or "")
    lines = text.replace("\r\n", "\n").split("\n")
    body, found = _section(lines, header) if header else (lines, False)
    items: list[str] = []
    has_marker = False
    prev_blank = False
    for line in body:
        if not line.strip():
            prev_blank = True
            continue
        m = _MARKER.match(line)
        if m:
            has_marker = True
            items.append(m.group(1) or "")
        elif items and has_marker and not prev_blank and not _header_name(line):
            items[-1] = f"{items[-1]} {line.strip()}"  # an item wrapped onto the next line
        elif found and not has_marker:
            items.append(line)  # a header followed by plain lines: the model dropped the dashes
        prev_blank = False
    if not found and not has_marker:
        return None
    cleaned = [clean_item(i) for i in items]
    return [i for i in cleaned if i and not _PLACEHOLDER.match(i) and not _NONE_ITEM.match(i)]


def dedupe(items: list[str]) -> list[str]:
    """Drop repeated items (case- and space-insensitive), keeping the first: a repeated claim would count twice."""
    seen: set[str] = set()
    out: list[str] = []
    for item in items:
        k = re.sub(r"\W+", " ", item.lower()).strip()
        if k not in seen:
            seen.add(k)
            out.append(item)
    return out
