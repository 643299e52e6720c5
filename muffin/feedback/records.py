"""The pipeline's input format (the original RLAIF-V prompt JSONL) and its validation.

One prompt per line: ``ds_question_id``, ``image_path`` (relative paths resolve against ``--image-root``) or a
base64 ``image``, ``question`` and optional ``metainfos``. Invalid records are reported with their line number,
field and fix, and skipped; the stage goes on with the others.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from utils.fingerprint import sha256_bytes
from utils.images import decode_base64, decode_data_url, load_image

logger = logging.getLogger(__name__)

ID_FIELDS = ("ds_question_id", "question_id", "idx", "id")


@dataclass
class Prompt:
    """One validated input prompt."""

    id: str
    question: str
    image_path: str | None  # as written in the input file (exported as the dataset's ``image_path``)
    resolved_path: Path | None  # where the image file is read from
    image_b64: str | None
    metainfos: dict[str, Any] = field(default_factory=dict)
    line: int = 0
    _image_sha: str | None = field(default=None, repr=False, compare=False)

    def load_image(self) -> Image.Image:
        """The prompt's image as RGB; raises FileNotFoundError/ValueError naming the record on a bad image."""
        what = f"prompt '{self.id}' (line {self.line}), field '{'image_path' if self.resolved_path else 'image'}'"
        if self.resolved_path is not None:
            return load_image(self.resolved_path, what=what)
        return load_image(self.image_bytes(), what=what)

    def image_sha256(self) -> str:
        """sha256 of the encoded image as stored ("missing" when the file is gone or the base64 is bad): an
        edited image makes new answers and new verdicts (``utils.fingerprint``)."""
        if self._image_sha is None:
            try:
                self._image_sha = sha256_bytes(self.image_bytes())
            except (OSError, ValueError):
                self._image_sha = "missing"
        return self._image_sha

    def image_bytes(self) -> bytes:
        """The encoded image as stored (file bytes or decoded base64), for export without re-encoding."""
        if self.resolved_path is not None:
            return self.resolved_path.read_bytes()
        data = self.image_b64 or ""
        what = f"prompt '{self.id}' (line {self.line}), field 'image'"
        if data.startswith("data:"):
            return decode_data_url(data, what)
        raw = decode_base64(data)
        if raw is None:
            raise ValueError(f"{what}: not valid base64")
        return raw


def resolve_image_path(image_path: str, image_root: str | Path | None) -> Path:
    """``./examples/x.jpg`` with root ``/data/RLAIF-V`` -> ``/data/RLAIF-V/examples/x.jpg``; absolute paths kept."""
    p = Path(image_path)
    if p.is_absolute() or image_root is None:
        return p
    return Path(image_root) / p


def parse_prompt(raw: Any, line: int, image_root: str | Path | None = None) -> Prompt:
    """Validate one input record; raises ValueError naming the line, the field and the fix."""
    if not isinstance(raw, dict):
        raise ValueError(f"line {line}: expected a JSON object, got {type(raw).__name__}")
    pid = next((raw[k] for k in ID_FIELDS if raw.get(k) not in (None, "")), None)
    pid = f"line{line}" if pid is None else str(pid)
    question = raw.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(
            f"line {line} (id '{pid}'): field 'question' is missing or empty; every prompt needs a question string"
        )
    image_path, image_b64 = raw.get("image_path"), raw.get("image")
    if image_b64 is not None and not isinstance(image_b64, str):  # e.g. RLAIF-V-Dataset's {"bytes", "path"}
        raise ValueError(
            f"line {line} (id '{pid}'): field 'image' is a {type(image_b64).__name__}; it must be base64 image data "
            "or a data URL (or give the file in 'image_path')"
        )
    resolved = None
    if isinstance(image_path, str) and image_path:
        resolved = resolve_image_path(image_path, image_root)
        if not resolved.is_file():
            raise ValueError(
                f"line {line} (id '{pid}'): field 'image_path': file '{resolved}' does not exist; "
                "fix the path or pass --image-root (the directory the relative paths start from)"
            )
    elif isinstance(image_b64, str) and image_b64:
        where = f"line {line} (id '{pid}'), field 'image'"
        if image_b64.startswith("data:"):
            decode_data_url(image_b64, where)
        elif decode_base64(image_b64) is None:
            raise ValueError(
                f"{where}: not base64 image data and not a data URL; a file goes in 'image_path' "
                "(relative to --image-root)"
            )
    else:
        raise ValueError(f"line {line} (id '{pid}'): no image; give 'image_path' (a file) or 'image' (base64)")
    meta = raw.get("metainfos") or {}
    if not isinstance(meta, dict):
        meta = {"value": meta}
    return Prompt(
        pid, question.strip(), image_path if resolved else None, resolved, None if resolved else image_b64, meta, line
    )


def load_prompts(
    path: str | Path, image_root: str | Path | None = None, limit: int | None = None
) -> tuple[list[Prompt], list[dict[str, Any]]]:
    """Read and validate a prompt file.

    Returns:
        (valid prompts in file order, error records ``{"id", "stage": "input", "reason"}`` for the invalid ones).
        Duplicate ids keep the first record.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file '{path}' does not exist; pass --prompts a JSONL file")
    prompts: list[Prompt] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                prompt = parse_prompt(raw, n, image_root)
            except (json.JSONDecodeError, ValueError) as e:
                errors.append({"id": f"line{n}", "stage": "input", "reason": str(e)})
                continue
            if prompt.id in seen:
                errors.append(
                    {
                        "id": f"line{n}",
                        "stage": "input",
                        "reason": f"line {n}: duplicate ds_question_id '{prompt.id}'; the first one is kept",
                    }
                )
                continue
            seen.add(prompt.id)
            prompts.append(prompt)
            if limit is not None and len(prompts) >= limit:
                break
    for e in errors:
        logger.warning("%s: %s", path, e["reason"])
    if not prompts:
        detail = f"; the first problem: {errors[0]['reason']}" if errors else " (the file is empty)"
        raise ValueError(
            f"prompt file '{path}' holds no valid prompt ({len(errors)} invalid records){detail}. Each line needs "
            "a JSON object with 'question' and 'image_path' (or base64 'image')"
        )
    return prompts, errors


def prompts_by_id(prompts: list[Prompt]) -> dict[str, Prompt]:
    return {p.id: p for p in prompts}


def answer_id(prompt_id: str, sample_idx: int) -> str:
    """Stable key of one sampled answer: ``{prompt id}#{sample index}``."""
    return f"{prompt_id}#{sample_idx}"


def is_ok(rec: dict[str, Any]) -> bool:
    """True when no earlier stage marked the answer record as failed."""
    return not rec.get("error")


# Field checks for records read back from a previous stage's file (a hand edit, another tool's output).
FIELD_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "text": (lambda v: isinstance(v, str), "a string"),
    "texts": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "number": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    "flags": (lambda v: isinstance(v, list) and all(isinstance(x, bool) for x in v), "a list of true/false"),
}


def field_problem(rec: dict[str, Any], requires: dict[str, str], made_by: str) -> str | None:
    """Why ``rec`` cannot be processed (a required field missing or of the wrong kind), or None.

    ``requires`` maps field names to ``FIELD_KINDS`` keys; ``made_by`` names the stage that writes the fields.
    """
    for name, kind in requires.items():
        ok, what = FIELD_KINDS[kind]
        if name not in rec:
            return f"field '{name}' is missing; it is written by {made_by}: rerun it or restore the record"
        if not ok(rec[name]):
            got = "null" if rec[name] is None else type(rec[name]).__name__
            return f"field '{name}' is {got}, not {what}; it is written by {made_by}: rerun it or fix the record"
    return None


def check_keys(records: Sequence[dict[str, Any]], path: str | Path, key: str = "answer_id") -> None:
    """Every record is an object with its ``key`` (without it, a record cannot be resumed, merged or reported)."""
    for n, rec in enumerate(records, 1):
        if not isinstance(rec, dict) or rec.get(key) in (None, ""):
            raise ValueError(
                f"{path}: record {n} has no '{key}'; every record of a stage file needs its key. "
                "Restore the record or rerun the stage that wrote the file"
            )
