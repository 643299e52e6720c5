"""Per-record faults inside a batch: when a batched model call fails, retry it record by record so that one bad
record (a prompt over the model's context, a token the model rejects) fails alone and the others are written.

Only faults a single input can cause are caught: ``ValueError`` (our families refuse an over-long or malformed
prompt with one, naming the limit), ``IndexError`` (an id beyond an embedding table) and running out of memory
(a long record may fit alone). Anything else is a bug or a broken device and stops the stage as before.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

logger = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

RECORD_FAULTS: tuple[type[BaseException], ...] = (ValueError, IndexError, torch.OutOfMemoryError)
_LIMIT = re.compile(r"(?:context|max(?:imum)?[ _-]?length|limit)\D{0,20}?(\d+)", re.IGNORECASE)


def fault_fields(error: BaseException) -> dict[str, Any]:
    """The errors-file fields of a per-record fault: ``reason`` and, when the message names one, ``limit``."""
    text = f"{type(error).__name__}: {error}"
    m = _LIMIT.search(str(error))
    return {"reason": text, **({"limit": int(m.group(1))} if m else {})}


def call_per_record(
    fn: Callable[[Sequence[T]], Sequence[R]], items: Sequence[T]
) -> list[tuple[R | None, dict[str, Any] | None]]:
    """``fn(items)`` as ``(result, None)`` per item; if the batch raises a record fault, each item alone: the
    ones that fail again come back as ``(None, fault_fields(error))``.

    Example:
        >>> call_per_record(lambda xs: [10 // x for x in xs], [1, 2])
        [(10, None), (5, None)]
    """
    if not items:
        return []
    try:
        out = list(fn(items))
        return [(r, None) for r in out]
    except RECORD_FAULTS as batch_error:
        if len(items) > 1:
            logger.warning("a batch of %d failed (%s); retrying it record by record", len(items), batch_error)
        if isinstance(batch_error, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
    results: list[tuple[R | None, dict[str, Any] | None]] = []
    for item in items:
        try:
            results.append((list(fn([item]))[0], None))
        except RECORD_FAULTS as e:
            results.append((None, fault_fields(e)))
    return results
