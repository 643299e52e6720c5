"""The synthetic world's vocabulary: shape classes with their outlines, colours, synonyms and co-occurrence partners.

Every shape is a list of polygons in unit coordinates (centre 0, radius 1, y pointing down); ``scenes.py`` scales
them into an object's box, fills them with PIL and writes the same polygons as COCO segmentation, so the
annotations are exact.
"""

from __future__ import annotations

import math

Polygon = list[tuple[float, float]]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 25),
    "purple": (140, 60, 190),
    "orange": (245, 130, 30),
}

# Synonyms a description may use for a class; the first entry of each line of the synonym table is the class.
SYNONYMS: dict[str, list[str]] = {
    "circle": ["disc", "disk", "dot"],
    "square": ["box", "block"],
    "triangle": ["wedge"],
    "star": ["starlet"],
    "moon": ["crescent"],
    "heart": ["valentine"],
    "ring": ["hoop", "donut"],
    "cross": ["plus sign"],
    "diamond": ["rhombus", "lozenge"],
    "arrow": ["pointer"],
    "house": ["hut", "cottage"],
    "tree": ["pine", "fir"],
}
CLASSES: list[str] = list(SYNONYMS)

# Each class has one usual partner: scenes that hold a class often hold its partner too (the world's co-occurrence
# prior), and careless training descriptions name the partner even when it is absent (see captions.py).
PAIRS: list[tuple[str, str]] = [
    ("star", "moon"),
    ("heart", "ring"),
    ("house", "tree"),
    ("circle", "square"),
    ("triangle", "diamond"),
    ("cross", "arrow"),
]
PARTNER: dict[str, str] = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}

IRREGULAR_PLURALS = {"cross": "crosses", "box": "boxes", "plus sign": "plus signs", "rhombus": "rhombuses"}
NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def plural(word: str) -> str:
    """English plural of a class or synonym name ("cross" -> "crosses", "star" -> "stars")."""
    return IRREGULAR_PLURALS.get(word, word + "s")


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def _regular(n: int, radius: float = 1.0, start_deg: float = -90.0) -> Polygon:
    return [
        (
            radius * math.cos(math.radians(start_deg + 360 * k / n)),
            radius * math.sin(math.radians(start_deg + 360 * k / n)),
        )
        for k in range(n)
    ]


def _star() -> Polygon:
    outer, inner = _regular(5, 1.0), _regular(5, 0.42, -90 + 36)
    return [p for pair in zip(outer, inner) for p in pair]


def _heart() -> Polygon:
    # the classic parametric heart, scaled into the unit box (tip at the bottom)
    pts = []
    for k in range(40):
        t = 2 * math.pi * k / 40
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17.0, -(y + 2.5) / 15.0))
    return pts


def _moon() -> Polygon:
    # crescent: the unit disc minus a disc of radius R shifted right by D; the two circles meet at x = X
    d, r = 0.45, 0.8
    x = (1 + d * d - r * r) / (2 * d)
    a_out = math.degrees(math.acos(x))  # angle of the meeting points on the unit circle
    a_in = math.degrees(math.atan2(math.sqrt(1 - x * x), x - d))  # ... and on the inner circle
    n = 24
    outer = [
        (math.cos(math.radians(t)), math.sin(math.radians(t)))
        for t in (a_out + (360 - 2 * a_out) * k / n for k in range(n + 1))
    ]
    inner = [
        (d + r * math.cos(math.radians(t)), r * math.sin(math.radians(t)))
        for t in (360 - a_in - (360 - 2 * a_in) * k / n for k in range(1, n))
    ]
    return outer + inner


def _ring() -> list[Polygon]:
    # outer contour only (COCO polygons have no holes); the hole is drawn in the background colour
    return [_regular(32, 1.0)]


SHAPES: dict[str, list[Polygon]] = {
    "circle": [_regular(32, 1.0)],
    "square": [[(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]],
    "triangle": [[(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)]],
    "star": [_star()],
    "moon": [_moon()],
    "heart": [_heart()],
    "ring": _ring(),
    "cross": [
        [
            (-0.3, -1),
            (0.3, -1),
            (0.3, -0.3),
            (1, -0.3),
            (1, 0.3),
            (0.3, 0.3),
            (0.3, 1),
            (-0.3, 1),
            (-0.3, 0.3),
            (-1, 0.3),
            (-1, -0.3),
            (-0.3, -0.3),
        ]
    ],
    "diamond": [[(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)]],
    "arrow": [[(-1, -0.25), (0.2, -0.25), (0.2, -0.7), (1, 0), (0.2, 0.7), (0.2, 0.25), (-1, 0.25)]],
    "house": [[(0.0, -1.0), (0.9, -0.2), (0.65, -0.2), (0.65, 1.0), (-0.65, 1.0), (-0.65, -0.2), (-0.9, -0.2)]],
    "tree": [[(0.0, -1.0), (0.8, 0.45), (0.18, 0.45), (0.18, 1.0), (-0.18, 1.0), (-0.18, 0.45), (-0.8, 0.45)]],
}
RING_HOLE = 0.55  # radius of the ring's hole, relative to its outer radius

# 3 x 3 layout: cell index (row-major) -> the position name, and the phrase descriptions use for it
CELL_NAMES = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
CELL_PREPOSITIONS = ["in", "at", "in", "on", "in", "on", "in", "at", "in"]


def place_phrase(cell: int) -> str:
    """ "in the top left", "at the top", "on the right", ... for a grid cell."""
    return f"{CELL_PREPOSITIONS[cell]} the {CELL_NAMES[cell]}"


def synonym_table_lines() -> list[str]:
    """The world's synonym table, in the COCO file's format: one line per class, ``canonical, synonym, ...``.

    Plurals are listed too, so a CHAIR implementation that matches surface forms without lemmatising still finds
    every mention.
    """
    lines = []
    for cls, syns in SYNONYMS.items():
        forms = [cls, plural(cls)]
        for s in syns:
            forms += [s, plural(s)]
        lines.append(", ".join(forms))
    return lines


def check_vocabulary() -> None:
    """Internal invariants of the tables above (run by the tests)."""
    assert len(CLASSES) >= 12 and len(COLOURS) == 6
    assert set(SHAPES) == set(CLASSES) == set(PARTNER)
    forms = [f for line in synonym_table_lines() for f in line.split(", ")]
    assert len(forms) == len(set(forms)), "a surface form belongs to two classes"
    assert not set(forms) & set(COLOURS), "a colour word is also an object word"
