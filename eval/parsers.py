"""Parsers for judge outputs (MMHal ratings, RefoMB ``[[A/B/C]]`` verdicts, object lists); prompt filling is
``utils.chat_lm.prompts.fill_template``.

Each has our lenient version and the published scripts' version (``*_paper``, the paper protocol). All are pure;
a parser that returns ``None`` lets the caller re-ask the judge and, failing that, record the sample unparseable.
"""

from __future__ import annotations

import ast
import json
import re

# "Rating: 5", "**Rating:** 5", "rating = [4]", "Rating of 3", "Rating is 2/6", "Final rating - 6"
_RATING = re.compile(
    r"rating\**\s*(?:[:=\-]|is|of|would be|should be|will be)?\s*\**\s*[\[(]?\s*(\d+)(?:\s*/\s*(\d+))?", re.IGNORECASE
)
_OPTION_ECHO = [6, 5, 4, 3, 2, 1, 0]  # the published prompt's option list, in its order
# "[[A]]", "[[ b ]]", "[[Model A]]"
_CHOICE = re.compile(r"\[\[\s*(?:model\s+)?([ABC])\s*\]\]", re.IGNORECASE)
_FENCE = re.compile(r"```(?:json|python)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def parse_rating(text: str | None, lo: int = 0, hi: int = 6) -> int | None:
    """The judge's rating in ``[lo, hi]``, or None when there is none.

    The last ``Rating: k`` wins: judges usually explain first and conclude last, and a judge that echoes the
    option list before concluding still ends with its own verdict. Ratings outside ``[lo, hi]`` are ignored
    ("Rating: 7"); ``k/N`` is accepted only when ``N == hi``. Without any ``rating`` keyword, a final line that is
    a bare number in range is accepted ("...\\n\\n4").

    This is our lenient reader (``--protocol ours``); the published rule is ``parse_rating_paper``.
    """
    if not text:
        return None
    found: list[int] = []
    for m in _RATING.finditer(text):
        value, denom = int(m.group(1)), m.group(2)
        if denom is not None and int(denom) != hi:
            continue
        if lo <= value <= hi:
            found.append(value)
    if found[-7:] == _OPTION_ECHO:
        return None  # the judge only repeated the option list and gave no verdict after it
    if found:
        return found[-1]
    lines = [ln.strip().strip("*.").strip() for ln in text.strip().splitlines() if ln.strip()]
    if lines and re.fullmatch(r"\d+", lines[-1]) and lo <= int(lines[-1]) <= hi:
        return int(lines[-1])
    return None


def parse_choice(text: str | None) -> str | None:
    """``"A"``, ``"B"`` or ``"C"`` from a verdict like ``[[B]]``; the last verdict in the text wins.

    Our lenient reader (``--protocol ours``; the published rule is ``parse_choice_paper``). The published RefoMB
    prompt makes judges quote the format ('If Model A is better, output "[[A]]"; ...') before concluding, so the
    first match can be a quotation; when the text ends with the three letters in the order a prompt lists them,
    the judge only repeated the instructions and the result is None.
    """
    if not text:
        return None
    matches = [m.group(1).upper() for m in _CHOICE.finditer(text)]
    if not matches:
        return None
    if matches[-3:] in (["A", "B", "C"], ["C", "A", "B"]):
        return None  # the tail quotes the instruction (in either published prompt's order), not a verdict
    return matches[-1]


def choice_score(choice: str, model_is: str = "B") -> int:
    """Item score of the evaluated model: +1 when it wins, -1 when the reference wins, 0 on a tie (``C``)."""
    if choice == "C":
        return 0
    return 1 if choice == model_is else -1


def parse_object_list(text: str | None) -> list[str] | None:
    """Object names from a judge answer that should be a JSON list, tolerating the usual mess.

    Accepts fenced code blocks, single quotes (a Python literal), trailing commas, prose around the list, the
    published prompt's empty ``()``, and bare "- item" lines. Returns None when nothing list-like is found;
    ``[]`` is a valid answer (no objects).
    """
    if text is None:
        return None
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for cand in candidates:
        parsed = _first_list(cand)
        if parsed is not None:
            return parsed
    stripped = text.strip().strip("`").strip()
    if stripped in ("()", "[]", "", "none", "None"):
        return [] if stripped != "" else None
    bullets = [ln.strip()[1:].strip() for ln in text.splitlines() if ln.strip().startswith(("-", "*"))]
    bullets = [b for b in bullets if b and len(b.split()) <= 5]
    return bullets or None


def _first_list(text: str) -> list[str] | None:
    for start in [i for i, c in enumerate(text) if c == "["]:
        end = text.find("]", start)
        while end != -1:
            snippet = text[start : end + 1]
            value = _load_list(snippet)
            if value is not None and all(isinstance(v, str) for v in value):  # names, not e.g. a citation [1]
                return [v.strip() for v in value if v.strip()]
            end = text.find("]", end + 1)
    if re.search(r"\(\s*\)", text) and "[" not in text:
        return []
    return None


def _load_list(snippet: str) -> list | None:
    cleaned = re.sub(r",\s*\]", "]", snippet)
    for loader in (json.loads, ast.literal_eval):
        try:
            value = loader(cleaned)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, list):
            return value
    return None


# --- the published scripts' parsers (the paper protocol) -------------------------------------------------------

_JSON_FENCE = re.compile(r"```json\n(.*?)\n```", re.DOTALL)
_PAPER_CHOICE = re.compile(r"\[\[(A|B|C)\]\]")
_NOT_PARSED = object()


def parse_object_list_paper(text: str | None) -> object:
    """The published Object HalBench parser: the first ```` ```json ```` block, else the last line when the text
    contains '["'; any other text (a bare ``[]``, ``()``, prose) is a failure and the judge is asked again.

    Returns the decoded JSON value (usually a list) or None on failure; ``json.loads`` of the value ``null`` is
    reported as failure too, since the published script cannot iterate it.
    """
    if text is None:
        return None
    value: object = _NOT_PARSED
    m = _JSON_FENCE.search(text)
    if m:
        try:
            value = json.loads(m.group(1))
        except ValueError:
            value = _NOT_PARSED
    if value is _NOT_PARSED and '["' in text:
        try:
            value = json.loads(text.strip().split("\n")[-1])
        except ValueError:
            return None
    if value is _NOT_PARSED or not isinstance(value, list | dict | str):
        return None
    return value


def parse_rating_paper(text: str | None) -> int:
    """The published MMHal rating: the k in 0..6 for which ``"rating: k"`` occurs in the lower-cased reply, when
    exactly one such k does; otherwise 0. A substring test, so "Rating: 3/10" is 3 and "Rating: 10" is 1."""
    if not text:
        return 0
    low = text.lower()
    found = [k for k in range(7) if f"rating: {k}" in low]
    return found[0] if len(found) == 1 else 0


def rating_found_paper(text: str | None) -> bool:
    """Whether ``parse_rating_paper`` found exactly one rating (else its 0 is the published fallback)."""
    low = (text or "").lower()
    return sum(f"rating: {k}" in low for k in range(7)) == 1


def parse_choice_paper(text: str | None) -> str | None:
    """The published RefoMB verdict: the first ``[[A]]``, ``[[B]]`` or ``[[C]]`` (exact case, no spaces), or None
    (the published script then asks the judge again)."""
    if not text:
        return None
    m = _PAPER_CHOICE.search(text)
    return m.group(1) if m else None
