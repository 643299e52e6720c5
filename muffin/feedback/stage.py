"""Plumbing shared by the feedback stages: sharded resumable JSONL outputs, errors files, merging, seeds, CLI flags.

Every model stage writes one record per answer, keyed by ``answer_id``. On several ranks each rank appends to its
own shard (``out.rank1-of-2.jsonl``); when every expected key is present, rank 0 merges all shards (of any world
size, so a rerun on a different number of GPUs still resumes) into ``out`` in input order, with one atomic write.
Bad records go to ``out.errors.jsonl`` (one line per record with the stage and the reason) and the run goes on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from muffin.feedback.records import check_keys, field_problem
from utils.dist import rank, shard, shard_path, world_size
from utils.fingerprint import check_fingerprint, file_identity, remove_paths, sha256_json
from utils.io import JsonlWriter, atomic_write_text, iter_jsonl, write_manifest

logger = logging.getLogger(__name__)

KEY = "answer_id"


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` via SHA-256 (stable across processes and Python versions, unlike ``hash()``).

    Example:
        >>> stable_seed(0, "coco_17", 3) == stable_seed(0, "coco_17", 3)
        True
    """
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & ((1 << 63) - 1)


def errors_path(out: str | Path) -> Path:
    """``answers.jsonl`` -> ``answers.errors.jsonl``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.errors{out.suffix or '.jsonl'}")


def manifest_path(out: str | Path) -> Path:
    """``answers.jsonl`` -> ``answers.manifest.json``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.manifest.json")


def _shard_files(path: Path) -> list[Path]:
    """Shard files of ``path`` written by any world size (``answers.rank0-of-2.jsonl``, ...)."""
    return sorted(path.parent.glob(f"{path.stem}.rank*-of-*{path.suffix}"))


def _read_all(path: Path) -> list[dict[str, Any]]:
    recs: list[dict[str, Any]] = []
    for p in ([path] if path.exists() else []) + _shard_files(path):
        recs.extend(iter_jsonl(p))
    return recs


def fingerprint_path(out: str | Path) -> Path:
    """``answers.jsonl`` -> ``answers.fingerprint.json``: what made the records (written before the first one)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.fingerprint.json")


class ShardedOutput:
    """The output (and errors file) of one stage on this rank; ``done`` holds keys finished on any rank/run.

    With a ``fingerprint`` (the stage's settings, model identity and code), an output made with another one is
    refused (``utils.fingerprint.check_fingerprint``) unless ``overwrite`` starts over. With ``inputs`` (key ->
    sha256 of what the record is computed from), every record written carries its ``input_sha256`` and a record
    whose inputs changed since it was written is not done: it is computed again and replaces the old one.

    Example:
        >>> with ShardedOutput("claims.jsonl") as out:  # doctest: +SKIP
        ...     for rec in todo:
        ...         if rec["answer_id"] not in out.done: out.write(process(rec))
        >>> merged = out.finalize(order=[r["answer_id"] for r in inputs])  # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | Path,
        key: str = KEY,
        *,
        fingerprint: dict[str, Any] | None = None,
        inputs: dict[Any, str] | None = None,
        overwrite: bool = False,
        drop_errors: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        self.path = Path(path)
        self.key = key
        self.errors = errors_path(self.path)
        self.inputs = inputs
        if fingerprint is not None:
            check_fingerprint(
                fingerprint_path(self.path),
                fingerprint,
                output=str(self.path),
                overwrite=overwrite,
                has_output=bool(_read_all(self.path)),
                start_over=self._start_over,
                write=rank() == 0,
            )
        latest = {r[key]: r for r in _read_all(self.path)}  # the last record of a key wins (as in finalize)
        self.done: set[Any] = {k for k, r in latest.items() if self._current(r)}
        stale = {k for k in latest if k not in self.done}
        if stale:
            logger.info(
                "%s: %d records were made from inputs that have changed since (first: %s); computing them again",
                self.path,
                len(stale),
                sorted(map(str, stale))[:3],
            )
        self._drop_errors(stale | {latest[k].get("prompt_id") for k in stale}, drop_errors)
        self.writer = JsonlWriter(shard_path(self.path), key=key)
        self.writer.done -= stale
        self.error_writer = JsonlWriter(shard_path(self.errors), key="id")
        self.n_written = 0
        self.n_errors = 0

    def _current(self, rec: dict[str, Any]) -> bool:
        """Whether ``rec`` was computed from this run's inputs (always, when the stage has no per-record inputs)."""
        return self.inputs is None or rec.get("input_sha256") == self.inputs.get(rec[self.key])

    def _start_over(self) -> None:
        """--overwrite: remove the output, its errors, manifest and fingerprint (rank 0) and this rank's shards."""
        mine = [Path(shard_path(self.path)), Path(shard_path(self.errors))]
        if rank() == 0:
            ours = f"-of-{world_size()}"
            others = [p for p in _shard_files(self.path) + _shard_files(self.errors) if ours not in p.name]
            mine += [self.path, self.errors, manifest_path(self.path), fingerprint_path(self.path), *others]
        remove_paths(mine)

    def _drop_errors(self, ids: set[Any], also: Callable[[dict[str, Any]], bool] | None) -> None:
        """Remove the error lines of records about to be recomputed (and those ``also`` selects) from this rank's
        errors file and, on rank 0, the merged one: they are written again if the fault is still there."""
        files = [Path(shard_path(self.errors))] + ([self.errors] if rank() == 0 else [])
        for f in dict.fromkeys(files):
            if not f.is_file():
                continue
            recs = list(iter_jsonl(f))
            kept = [r for r in recs if r.get("id") not in ids and not (also and also(r))]
            if len(kept) != len(recs):
                atomic_write_text(f, "".join(_dumps(r) for r in kept))

    def write(self, rec: dict[str, Any]) -> None:
        if rec[self.key] in self.done:
            return
        if self.inputs is not None:
            rec = {**rec, "input_sha256": self.inputs.get(rec[self.key])}
        self.writer.write(rec)
        self.done.add(rec[self.key])
        self.n_written += 1

    def error(self, rec_id: str, stage: str, reason: str, **extra: Any) -> None:
        """Record a per-record error (idempotent per id) and log it."""
        logger.warning("%s: record '%s': %s", stage, rec_id, reason)
        self.error_writer.write({"id": rec_id, "stage": stage, "reason": reason, **extra})
        self.n_errors += 1

    def close(self) -> None:
        self.writer.close()
        self.error_writer.close()

    def __enter__(self) -> ShardedOutput:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def finalize(
        self, order: Sequence[Any], *, wait: bool = True, timeout: float = 86400.0, poll: float = 2.0
    ) -> list[dict[str, Any]] | None:
        """Merge every shard into ``path`` in ``order`` once all keys are present; return the merged records.

        Rank 0 waits (polling) for the other ranks' shards, merges and removes them. Other ranks return None at
        once, or with ``wait`` wait until the merged file is complete (the pipeline needs it for the next stage).
        """
        self.close()
        want = list(dict.fromkeys(order))
        deadline = time.time() + timeout
        while True:
            if rank() == 0:
                recs = _read_all(self.path)
                by_key = {r[self.key]: r for r in recs}
                by_key = {k: r for k, r in by_key.items() if self._current(r)}
                missing = [k for k in want if k not in by_key]
                if not missing:
                    merged = [by_key[k] for k in want]
                    self._merge_errors(want)
                    atomic_write_text(self.path, "".join(_dumps(r) for r in merged))
                    for p in _shard_files(self.path) + _shard_files(self.errors):
                        p.unlink(missing_ok=True)
                    return merged
                if world_size() == 1:
                    raise RuntimeError(
                        f"{self.path}: {len(missing)} records missing after the run "
                        f"(first: {missing[:3]}); rerun the same command to finish them"
                    )
            else:
                if not wait:
                    return None
                if self.path.exists() and not _shard_files(self.path):
                    merged = list(iter_jsonl(self.path))
                    if {r[self.key] for r in merged if self._current(r)} >= set(want):
                        return merged
            if time.time() > deadline:
                raise TimeoutError(f"{self.path}: other ranks did not finish within {timeout:.0f}s")
            time.sleep(poll)

    def _merge_errors(self, order: Sequence[Any]) -> None:
        recs = _read_all(self.errors)
        if not recs:
            return
        pos = {k: i for i, k in enumerate(order)}
        unique = list({r["id"]: r for r in recs}.values())
        unique.sort(key=lambda r: pos.get(r["id"], len(pos)))
        atomic_write_text(self.errors, "".join(_dumps(r) for r in unique))


def _dumps(rec: dict[str, Any]) -> str:
    return json.dumps(rec, ensure_ascii=False) + "\n"


def read_errors(out: str | Path) -> list[dict[str, Any]]:
    """The merged errors file of a stage output (empty when there were none)."""
    p = errors_path(out)
    return list(iter_jsonl(p)) if p.exists() else []


def finish_stage(
    out: str | Path,
    *,
    stage: str,
    config: dict[str, Any],
    counts: dict[str, Any],
    started: float,
    inputs: dict[str, Any],
    fingerprint: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the stage manifest next to ``out`` (rank 0 only) and log a one-line summary.

    The manifest carries the fingerprint the records were checked against (the fingerprint file a keyed stage
    wrote), or ``fingerprint`` for a whole-file stage, which recomputes its output on every run (it is also
    written to the fingerprint file).
    """
    counts = {**counts, "errors": len(read_errors(out))}
    fp = fingerprint_path(out)
    if fingerprint is not None and rank() == 0:
        atomic_write_text(fp, json.dumps(fingerprint, indent=2, ensure_ascii=False) + "\n")
    if rank() == 0:
        write_manifest(
            manifest_path(out),
            stage=stage,
            config=config,
            counts=counts,
            started=started,
            inputs=inputs,
            output=str(out),
            errors_file=str(errors_path(out)),
            fingerprint=json.loads(fp.read_text()) if fp.is_file() else None,
        )
    summary = ", ".join(f"{k} {v}" for k, v in counts.items() if not isinstance(v, list | dict))
    logger.info("%s done in %.1fs: %s -> %s", stage, time.time() - started, summary, out)
    return counts


def whole_file_fingerprint(
    stage: str, *, inputs: dict[str, Any], settings: dict[str, Any], code: dict[str, str]
) -> dict[str, Any]:
    """The fingerprint of a whole-file stage: each input as the sha256 of its records (a list) or of its file
    (a path), the settings and the code."""
    return {
        "stage": stage,
        "inputs": {k: sha256_json(v) if isinstance(v, list | dict) else file_identity(v) for k, v in inputs.items()},
        "settings": settings,
        "code": code,
    }


def load_records(path: str | Path, what: str) -> list[dict[str, Any]]:
    """Read a previous stage's JSONL output with an error that names the missing step."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} file '{path}' does not exist; run the previous stage first "
            "(or finish it: a multi-rank run leaves only .rank*-of-* shards until it completes)"
        )
    return list(iter_jsonl(path))


def chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), max(1, size)):
        yield items[i : i + max(1, size)]


def add_model_args(p: argparse.ArgumentParser, prefix: str, what: str, required: bool = True) -> None:
    """``--{prefix}`` (checkpoint dir), ``--{prefix}-family``, ``--{prefix}-lora`` for a vision-language model."""
    p.add_argument(f"--{prefix}", required=required, help=f"{what}: local checkpoint directory")
    p.add_argument(f"--{prefix}-family", default=None, help="force the model family (default: read config.json)")
    p.add_argument(f"--{prefix}-lora", default=None, help="LoRA adapter directory merged at load")


def add_overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: remove the output, its errors, manifest and fingerprint first. Without it, a rerun resumes "
        "and refuses an output made with other settings, model or code (docs/RESUMING.md)",
    )


def add_runtime_args(
    p: argparse.ArgumentParser, batch_size: int, batch_help: str = "records per forward pass"
) -> None:
    p.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default=None, help="default: this rank's GPU, else cpu")
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="ranks > 0 exit after writing their shard instead of waiting for rank 0's merge",
    )


def run_record_stage(
    records: Sequence[dict[str, Any]],
    out_path: str | Path,
    stage: str,
    process: Callable[[list[dict[str, Any]]], list[tuple[dict[str, Any], str | None]]],
    *,
    batch_size: int,
    requires: dict[str, str] | None = None,
    made_by: str = "the previous stage",
    fingerprint: dict[str, Any] | None = None,
    overwrite: bool = False,
    wait: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]] | None:
    """Run a per-answer stage over this rank's share of ``records``; resumable; returns the merged output.

    ``process`` maps a batch of (error-free) records to ``(new fields, error reason or None)`` per record. A
    record that failed in an earlier stage passes through unchanged; one that fails here keeps its new fields
    (e.g. the raw model output) and gets ``error: {"stage", "reason"}`` plus a line in the errors file. A record
    whose ``requires`` fields (``field_problem``) are missing or malformed fails here the same way, unprocessed.
    ``fingerprint`` (settings, model, code) guards the output (``ShardedOutput``); each record's input is the
    whole input record, so a record whose input changed upstream is computed again.
    """
    check_keys(records, out_path)
    inputs = {r[KEY]: sha256_json(r) for r in records}
    out = ShardedOutput(out_path, fingerprint=fingerprint, inputs=inputs, overwrite=overwrite)
    todo = [r for r in shard(list(records)) if r[KEY] not in out.done]
    logger.info("%s: %d records to process on this rank (%d already done)", stage, len(todo), len(out.done))
    bar = tqdm(total=len(todo), desc=stage, disable=not progress)
    for batch in chunks(todo, batch_size):
        live, results = [], {}
        for r in batch:
            if r.get("error"):
                continue
            problem = field_problem(r, requires or {}, made_by)
            if problem is None:
                live.append(r)
            else:
                results[r[KEY]] = ({}, f"record '{r[KEY]}': {problem}")
        results.update(zip((r[KEY] for r in live), process(live)) if live else {})
        for rec in batch:
            if rec[KEY] not in results:
                out.write(rec)
                continue
            fields, reason = results[rec[KEY]]
            new = {**rec, **fields}
            if reason:
                out.error(rec[KEY], stage, reason, **{k: v for k, v in fields.items() if k.endswith("_raw")})
                new["error"] = {"stage": stage, "reason": reason}
            out.write(new)
        bar.update(len(batch))
    bar.close()
    return out.finalize([r[KEY] for r in records], wait=wait)
