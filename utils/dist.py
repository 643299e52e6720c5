"""Rank/world-size from the launcher's environment, input sharding and in-order merging of shard outputs.

Works with ``torchrun``, ``accelerate launch`` and ``deepspeed`` (all set RANK / WORLD_SIZE / LOCAL_RANK) and
falls back to a single process. Stages shard by record index (``i % world == rank``; the reference stage in
contiguous blocks of its rows ordered by prompt, ``shard_blocks``, so that a prompt's pairs meet on one rank) and
merge by index, so the merged output has the same records in the same order as a single-process run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def device_for_rank() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{local_rank() % torch.cuda.device_count()}"
    return "cpu"


def shard(items: Sequence[T], r: int | None = None, w: int | None = None) -> list[T]:
    """Items of rank ``r`` of ``w``: every w-th item starting at r (balanced, order preserved)."""
    r = rank() if r is None else r
    w = world_size() if w is None else w
    return [x for i, x in enumerate(items) if i % w == r]


def shard_blocks(items: Sequence[T], r: int | None = None, w: int | None = None) -> list[T]:
    """Items of rank ``r`` of ``w`` as one contiguous block (sizes differ by at most one, order preserved): for
    stages whose neighbouring items share work (the reference stage scores a prompt's pairs together)."""
    r = rank() if r is None else r
    w = world_size() if w is None else w
    n = len(items)
    return list(items[r * n // w : (r + 1) * n // w])


def shard_path(path: str | os.PathLike, r: int | None = None, w: int | None = None) -> str:
    """``out.jsonl`` -> ``out.rank0-of-2.jsonl`` when running on several ranks, else unchanged."""
    r = rank() if r is None else r
    w = world_size() if w is None else w
    p = str(path)
    if w == 1:
        return p
    stem, dot, ext = p.rpartition(".")
    return f"{stem}.rank{r}-of-{w}.{ext}" if dot else f"{p}.rank{r}-of-{w}"


def merge_in_order(
    per_rank: Sequence[Sequence[dict[str, Any]]], order: Sequence[Any], key: str
) -> list[dict[str, Any]]:
    """Merge shard outputs into the order of the input keys (records missing from all shards are skipped)."""
    by_key: dict[Any, dict[str, Any]] = {}
    for recs in per_rank:
        for rec in recs:
            by_key[rec[key]] = rec
    return [by_key[k] for k in order if k in by_key]


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank when torch.distributed is initialised; ``obj`` otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, when torch.distributed is initialised; ``[obj]`` otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def barrier() -> None:
    """Synchronise ranks when torch.distributed is initialised; a no-op otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr on rank 0 only (warnings and errors from every rank), with secrets redacted (also from the
    traceback of an uncaught exception)."""
    import sys

    from utils.secrets import RedactingFilter, redact_text

    handler = logging.StreamHandler()
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    if world_size() > 1:
        handler.addFilter(lambda r: is_main() or r.levelno >= logging.WARNING)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if not getattr(sys.excepthook, "_redacting", False):

        def excepthook(kind, value, tb) -> None:  # noqa: ANN001 (sys.excepthook's signature)
            import traceback

            sys.stderr.write(redact_text("".join(traceback.format_exception(kind, value, tb))))

        excepthook._redacting = True  # type: ignore[attr-defined]
        sys.excepthook = excepthook
