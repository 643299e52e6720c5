"""Offline rule-based divide and change-question backends (no model needed).

``split_claims_rule`` cuts an answer into sentences, independent clauses and coordinated objects
("There is a red circle and two blue squares." -> two claims), and merges objects asserted more than once into one
count claim ("a blue heart and a blue heart" -> "two blue hearts"), so every asserted instance is checked; ``claim_to_question_rule`` turns one claim into
a yes/no question ("There is a green triangle." -> "Is there a green triangle in the image?"), keeping negations,
and falls back to "Is it true that ...?" when it cannot parse the clause. Written for plain English descriptions
and the synthetic world's captions; the LLM backends (``divide``/``changeq``) handle free-form text better.
"""

from __future__ import annotations

import re

from muffin.feedback.parsers import dedupe

DETERMINERS = set(
    "a an the one two three four five six seven eight nine ten several many some multiple few various numerous this "
    "that these those another each every his her their its other no both".split()
)
PLURAL_DETERMINERS = set(
    "two three four five six seven eight nine ten several many some multiple few various numerous "
    "these those both".split()
)
PRONOUNS = {"it", "they", "he", "she", "we", "i", "you", "this", "that", "these", "those"}
AUX = set("is are was were can could will would should may might must has have had does do did".split())
DISCOURSE = re.compile(
    r"^(?:overall|additionally|in addition|also|furthermore|moreover|besides|however|meanwhile|"
    r"in the background|in the foreground|finally|notably|interestingly|in summary),?\s+",
    re.I,
)
SHOWS = re.compile(
    r"^((?:the|this) (?:image|picture|photo|photograph|scene|painting|artwork) "
    r"(?:shows|depicts|features|contains|displays|presents|captures|includes|portrays)|"
    r"(?:i|we|you) can see|there (?:is|are)|in the (?:image|picture|photo),? there (?:is|are))\s+(.*)$",
    re.I,
)
IMAGE_WORDS = re.compile(r"\b(?:image|picture|photo|photograph|scene|painting|frame|artwork)\b", re.I)
_ABBREV = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|St|Mt|vs|etc|e\.g|i\.e|No|approx)\.$", re.I)

# Base forms of verbs common in image descriptions; 3rd-person and past forms are derived below.
_VERBS = (
    "sit stand hold wear show depict feature contain display appear seem look lie rest ride walk run play "
    "eat drink carry cover fill face hang lean park stop grow fly swim read write watch use wait smile point "
    "surround line include create add give reach cross pull push throw catch stretch rise float sleep cook "
    "cut move open close overlook dominate occupy extend lead border frame illuminate reflect shine go make "
    "take see get come keep feel fall build put set leave bring spread touch hug kiss talk stare graze lay "
    "belong remain help serve support rest sing dance climb jump kick hit drive pass enjoy perform pose"
).split()
# fmt: off
_IRREGULAR_PAST = {"sit": "sat", "stand": "stood", "hold": "held", "wear": "wore", "lie": "lay", "ride": "rode",
                   "run": "ran", "eat": "ate", "drink": "drank", "hang": "hung", "grow": "grew", "fly": "flew",
                   "swim": "swam", "read": "read", "write": "wrote", "catch": "caught", "rise": "rose",
                   "sleep": "slept", "cut": "cut", "lead": "led", "shine": "shone", "give": "gave", "go": "went",
                   "make": "made", "take": "took", "see": "saw", "get": "got", "come": "came", "keep": "kept",
                   "feel": "felt", "fall": "fell", "build": "built", "put": "put", "set": "set", "leave": "left",
                   "bring": "brought", "spread": "spread", "lay": "laid", "sing": "sang", "drive": "drove",
                   "hit": "hit"}
# fmt: on


def _third(v: str) -> str:
    if re.search(r"(?:s|sh|ch|x|z|o)$", v):
        return v + "es"
    if re.search(r"[^aeiou]y$", v):
        return v[:-1] + "ies"
    return v + "s"


def _past(v: str) -> str:
    if v in _IRREGULAR_PAST:
        return _IRREGULAR_PAST[v]
    if v.endswith("e"):
        return v + "d"
    if re.search(r"[^aeiou]y$", v):
        return v[:-1] + "ied"
    if re.search(r"[^aeiou][aeiou][bdgmnpt]$", v) and len(v) <= 4:
        return v + v[-1] + "ed"
    return v + "ed"


VERB_FORMS: dict[str, tuple[str, str]] = {}  # surface form -> (base, "3sg" | "past" | "base")
for _v in _VERBS:
    VERB_FORMS.setdefault(_v, (_v, "base"))
    VERB_FORMS[_third(_v)] = (_v, "3sg")
    VERB_FORMS.setdefault(_past(_v), (_v, "past"))


# ----------------------------------------------------------------------------------------------------- splitting


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``; list markers and line breaks end sentences, abbreviations and decimals do not."""
    out: list[str] = []
    for line in re.split(r"\n+", text or ""):
        line = re.sub(r"^\s*(?:[-*•]|\d{1,3}[.)])\s+", "", line).strip()
        line = re.sub(r"\*\*|__|#+\s*", "", line)
        buf = ""
        for piece in re.split(r"(?<=[.!?;])\s+", line):
            buf = f"{buf} {piece}".strip() if buf else piece
            if _ABBREV.search(buf) or (piece and piece[-1] not in ".!?;"):
                continue
            out.append(buf)
            buf = ""
        if buf:
            out.append(buf)
    return [s.strip().rstrip(";").strip() for s in out if s.strip()]


def _starts_np(text: str) -> bool:
    words = text.split()
    return bool(words) and (words[0].lower() in DETERMINERS or words[0][:1].isdigit())


def _has_verb(text: str) -> bool:
    words = [w.lower().strip(",") for w in text.split()]
    return any(w in AUX or VERB_FORMS.get(w, ("", ""))[1] in ("3sg", "past") for w in words[1:9])


def split_clauses(sentence: str) -> list[str]:
    """Independent clauses joined by ``and``/``but``/``while``/``whereas``; pronoun clauses stay attached."""
    parts = re.split(r",?\s+(?:and|but|while|whereas)\s+|,\s+(?=(?:the|a|an|there)\s)", sentence, flags=re.I)
    if len(parts) == 1:
        return [sentence]
    clauses: list[str] = []
    seps = re.findall(r",?\s+(?:and|but|while|whereas)\s+|,\s+(?=(?:the|a|an|there)\s)", sentence, flags=re.I)
    for sep, part in zip([""] + seps, parts):
        first = part.split()[0].lower() if part.split() else ""
        independent = (_starts_np(part) or first == "there") and _has_verb(part)
        if clauses and independent and _has_verb(clauses[-1]):
            clauses.append(part)
        elif clauses:
            clauses[-1] += sep + part
        else:
            clauses.append(part)
    return clauses


def is_plural(np: str) -> bool:
    """Rough grammatical number of a noun phrase: its determiner, else an -s head noun."""
    words = np.lower().split()
    if not words:
        return False
    if words[0] in PLURAL_DETERMINERS or (words[0].isdigit() and words[0] != "1"):
        return True
    if words[0] in {"a", "an", "one", "this", "that", "each", "every", "another"}:
        return False
    head = re.split(r"\s+(?:on|in|at|with|of|near|next|above|below|under|behind|to|that|which|who)\s", np)[0]
    last = head.split()[-1].strip(",.")
    return last.endswith("s") and not last.endswith(("ss", "us", "is"))


def split_coordinated(np_list: str) -> list[str]:
    """``a red circle, a blue square and two green triangles`` -> the three noun phrases (each must start with a
    determiner or a number; ``a black and white cat`` and ``between the sofa and the table`` stay whole)."""
    if re.search(r"\b(?:between|both)\b", np_list, re.I):
        return [np_list]
    parts = re.split(r",\s+and\s+|\s+and\s+|,\s+", np_list)
    if len(parts) < 2 or not all(_starts_np(p) for p in parts):
        return [np_list]
    return parts


def _split_coordination(clause: str) -> list[str]:
    m = SHOWS.match(clause)
    if m:
        prefix, rest = m.group(1), m.group(2)
        nps = split_coordinated(rest)
        if len(nps) == 1:
            return [clause]
        if re.search(r"there (?:is|are)$", prefix, re.I):
            head = prefix[: prefix.lower().rfind("there")]
            return [f"{head}There {'are' if is_plural(np) else 'is'} {np}".strip() for np in nps]
        return [f"{prefix} {np}" for np in nps]
    m = re.match(r"^(.+?)\s+(are|were)\s+(.*)$", clause)
    if m and _starts_np(m.group(1)):
        nps = split_coordinated(m.group(1))
        if len(nps) > 1:
            verb = {"are": "is", "were": "was"}[m.group(2)]
            return [f"{np} {m.group(2) if is_plural(np) else verb} {m.group(3)}" for np in nps]
    return [clause]


def _finish(claim: str) -> str:
    claim = DISCOURSE.sub("", claim.strip().strip(",").strip())
    claim = claim.rstrip(".!;: ").strip()
    return (claim[:1].upper() + claim[1:] + ".") if claim else ""


def split_claims_rule(answer: str) -> list[str]:
    """Atomic claims of an answer, in order, one self-contained sentence each (questions and fragments dropped).

    Example:
        >>> split_claims_rule("The image shows a red circle and two blue squares. The red circle is on the left.")
        ['The image shows a red circle.', 'The image shows two blue squares.', 'The red circle is on the left.']
    """
    claims: list[str] = []
    for sentence in split_sentences(answer):
        if sentence.endswith("?"):
            continue
        for clause in split_clauses(sentence):
            for claim in _split_coordination(DISCOURSE.sub("", clause.strip())):
                claim = _finish(claim)
                if len(claim.split()) >= 2:
                    claims.append(claim)
    return dedupe(merge_counts(claims))


# ------------------------------------------------------------------------------------------- counting instances
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_IRREGULAR_NOUNS = {"man": "men", "woman": "women", "person": "people", "child": "children", "foot": "feet"}
_IRREGULAR_NOUNS |= {"mouse": "mice", "goose": "geese", "tooth": "teeth", "sheep": "sheep", "fish": "fish"}
_EXISTENCE = re.compile(
    r"^(?P<prefix>(?:the|this) (?:image|picture|photo|photograph|scene) (?:shows|depicts|features|contains|displays)|"
    r"(?:i|we|you) can see|there (?:is|are))\s+(?P<det>a|an|one|two|three|four|five|six|seven|eight|nine|ten|\d+)\s+"
    r"(?P<rest>[^,;]+?)\.?$",
    re.I,
)
_POSTMODIFIER = re.compile(r"\s(?:on|in|at|with|of|near|next|above|below|under|behind|to|that|which|who)\s", re.I)


def plural_noun_phrase(np: str) -> str:
    """The plural of a noun phrase without its determiner: its head (the last word before a preposition or relative
    clause) in the plural ("blue heart" -> "blue hearts", "red cross on the left" -> "red crosses on the left")."""
    m = _POSTMODIFIER.search(np)
    head, tail = (np[: m.start()], np[m.start() :]) if m else (np, "")
    *words, last = head.split()
    low = last.lower()
    if low in _IRREGULAR_NOUNS:
        last = _IRREGULAR_NOUNS[low]
    elif re.search(r"(?:s|sh|ch|x|z)$", low):
        last += "es"
    elif re.search(r"[^aeiou]y$", low):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return " ".join([*words, last]) + tail


def merge_counts(claims: list[str]) -> list[str]:
    """One claim per asserted object group: existence claims ("There is a ...", "The image shows two ...", "I can
    see a ...") naming the same object are merged into one count claim at the first one's place, the numbers
    summed ("a blue heart" twice -> "The image shows two blue hearts.", "a red star" and "two red stars" -> three).

    Without this the answer "a yellow ring, a blue heart and a blue heart" about one heart would be two true claims
    (a de-duplication would keep one), and padding an answer with repeated objects would cost nothing.
    """
    parsed: list[tuple[str, int, str] | None] = []  # (prefix, number, the object in the plural)
    totals: dict[str, int] = {}
    for claim in claims:
        m = _EXISTENCE.match(claim)
        det = m.group("det").lower() if m else ""
        n = 1 if det in ("a", "an", "one") else (NUMBERS.index(det) + 1 if det in NUMBERS else int(det or 0))
        if not m or n < 1:
            parsed.append(None)
            continue
        plural = plural_noun_phrase(m.group("rest")) if n == 1 else m.group("rest")
        parsed.append((m.group("prefix"), n, plural))
        totals[plural.lower()] = totals.get(plural.lower(), 0) + n
    out: list[str] = []
    done: set[str] = set()
    for claim, p in zip(claims, parsed):
        if p is None or totals[p[2].lower()] == p[1]:
            out.append(claim)  # not an existence claim, or its object asserted once
            continue
        prefix, _, plural = p
        if plural.lower() in done:
            continue
        done.add(plural.lower())
        total = totals[plural.lower()]
        number = NUMBERS[total - 1] if total <= len(NUMBERS) else str(total)
        if re.fullmatch(r"there (?:is|are)", prefix, re.I):
            prefix = prefix[:5] + " are"
        out.append(f"{prefix} {number} {plural}.")
    return out


# ------------------------------------------------------------------------------------------------ change question


def _lower_first(subject: str) -> str:
    first, _, rest = subject.partition(" ")
    if first.lower() in DETERMINERS | PRONOUNS | {"there"} or first.lower() == "i":
        first = first if first == "I" else first.lower()
    return f"{first} {rest}".strip()


def _mentions_image(text: str) -> bool:
    return bool(IMAGE_WORDS.search(text))


def claim_to_question_rule(claim: str) -> str:
    """A yes/no question asking whether ``claim`` holds for the image; negations are kept.

    Example:
        >>> claim_to_question_rule("There is a green triangle in the top right.")
        'Is there a green triangle in the top right in the image?'
        >>> claim_to_question_rule("The man is not wearing a hat.")
        'Is the man not wearing a hat?'
    """
    s = DISCOURSE.sub("", claim.strip()).rstrip(".!;: ").strip()
    if not s:
        raise ValueError("claim_to_question_rule: empty claim; drop empty claims before asking questions")
    if s.endswith("?"):
        return s
    m = re.match(r"^there\s+(is|are|was|were)\s+(.+)$", s, re.I)
    if m:
        tail = "" if _mentions_image(m.group(2)) else " in the image"
        return f"{m.group(1).capitalize()} there {m.group(2)}{tail}?"
    words = s.split()
    starts_ok = words[0].lower() in DETERMINERS | PRONOUNS or words[0][:1].isupper() or words[0][:1].isdigit()
    for i, w in enumerate(words[1:9], 1):
        lw = w.lower().strip(",")
        if "," in words[i - 1] or not starts_ok:
            break
        subject, rest = _lower_first(" ".join(words[:i])), " ".join(words[i + 1 :])
        if lw in {"has", "have", "had"} and not re.match(r"^(?:been|\w+ed|\w+en)\b", rest):
            do = {"has": "Does", "have": "Do", "had": "Did"}[lw]
            return f"{do} {subject} have {rest}?".replace("  ", " ")
        if lw in AUX:
            return f"{lw.capitalize()} {subject} {rest}?".replace(" ?", "?")
        if lw in VERB_FORMS and (i >= 2 or words[0].lower() in PRONOUNS or words[0][:1].isupper()):
            base, form = VERB_FORMS[lw]
            if form == "base" and not is_plural(" ".join(words[:i])) and words[0].lower() not in {"they", "we"}:
                continue  # a singular subject with a base form: probably a noun ("the park bench"), keep looking
            do = {"3sg": "Does", "past": "Did", "base": "Do"}[form]
            return f"{do} {subject} {base} {rest}?".replace(" ?", "?")
    return f"Is it true that {_lower_first(s)}?"
