"""The score stage's shared machinery: a resumable per-sample store, ask-parse-reask, and the results JSON.

A scoring run writes ``<out-dir>/samples.jsonl`` (one record per sample, appended as it finishes) and, at the
end, ``<out-dir>/results.json`` (metrics, config, judge id and counters, code and package versions). Killed and
rerun, it keeps every finished record and every cached judge answer, and redoes only the rest.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from eval import parsers, prompts
from eval.judges import Judge, JudgeRequest, JudgeResponse
from utils.fingerprint import check_fingerprint, code_digest, file_identity, remove_paths
from utils.io import JsonlWriter, atomic_write_json, code_version, iter_jsonl, package_versions
from utils.secrets import redact, redact_text

logger = logging.getLogger(__name__)
T = TypeVar("T")


class SampleStore:
    """Per-sample results keyed by ``id``; the last record of an id wins.

    Records flagged ``"retryable": True`` (the judge was unreachable or rate-limited past its retries) count as
    not done, so a rerun tries them again; everything else is final.

    Example:
        >>> store = SampleStore("outputs/mmhal/samples.jsonl")  # doctest: +SKIP
        >>> for item in store.todo(items): store.write(score(item))  # doctest: +SKIP
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: dict[Any, dict[str, Any]] = {}
        self._writer = JsonlWriter(self.path, key="id")  # creates the file, or cuts a torn last line off it
        for rec in iter_jsonl(self.path):
            self.records[rec["id"]] = rec
        self._writer.done = {k for k, r in self.records.items() if not r.get("retryable")}
        n_retry = sum(1 for r in self.records.values() if r.get("retryable"))
        if self.records:
            logger.info("resuming %s: %d finished, %d to retry", self.path, len(self._writer.done), n_retry)

    def is_done(self, key: Any) -> bool:
        return key in self._writer.done

    def todo(self, items: Iterable[T], key: Callable[[T], Any] = lambda x: x["id"]) -> list[T]:  # type: ignore[index]
        return [x for x in items if not self.is_done(key(x))]

    def write(self, rec: dict[str, Any]) -> None:
        self._writer.write(rec)
        self.records[rec["id"]] = rec

    def ordered(self, keys: Sequence[Any]) -> list[dict[str, Any]]:
        """Records in the order of ``keys`` (keys without a record are skipped)."""
        return [self.records[k] for k in keys if k in self.records]

    def close(self) -> None:
        self._writer.close()


def ask_and_parse(
    judge: Judge,
    requests: Sequence[JudgeRequest],
    parse: Callable[[str | None], T | None],
    *,
    reasks: int = 2,
    progress: bool = False,
) -> list[tuple[T | None, JudgeResponse, int]]:
    """Send requests; re-ask (as a new, separately cached call) those whose answer ``parse`` rejects.

    Returns ``(parsed or None, last response, attempts made)`` per request. Transport failures are not
    re-asked here (the judge already retried them); they come back with ``response.error`` set.
    """
    results: list[tuple[T | None, JudgeResponse, int]] = []
    for resp in judge.complete(requests, progress=progress):
        results.append((parse(resp.text) if resp.error is None else None, resp, 1))
    for k in range(1, reasks + 1):
        redo = [i for i, (val, resp, _) in enumerate(results) if val is None and resp.error is None]
        if not redo:
            break
        logger.info("re-asking the judge for %d unparseable answers (attempt %d)", len(redo), k + 1)
        again = judge.complete([_reask(requests[i], k) for i in redo], progress=False)
        for i, resp in zip(redo, again):
            results[i] = (parse(resp.text) if resp.error is None else None, resp, k + 1)
    return results


def _reask(req: JudgeRequest, k: int) -> JudgeRequest:
    return JudgeRequest(req.messages, req.temperature, req.max_tokens, req.attempt + k)


def failure_fields(resp: JudgeResponse, attempts: int, what: str) -> dict[str, Any]:
    """The per-sample fields that record why a judged sample has no value."""
    if resp.error is not None:
        return {"error": redact_text(f"judge failed: {resp.error}"), "retryable": resp.retryable, "judge_output": None}
    return {"error": f"unparseable {what} after {attempts} attempts", "retryable": False, "judge_output": resp.text}


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """Fixed-size slices: records are written after each chunk, so a crash loses at most one chunk's parsing
    (its judge answers are in the cache already)."""
    return [items[i : i + size] for i in range(0, len(items), max(1, size))]


def write_results(
    out_dir: str | Path,
    *,
    benchmark: str,
    metrics: dict[str, Any],
    config: dict[str, Any],
    judge: Judge | None,
    started: float,
    **extra: Any,
) -> dict[str, Any]:
    """Write ``<out_dir>/results.json`` atomically and return it."""
    results = {
        "benchmark": benchmark,
        "metrics": metrics,
        "config": config,
        "judge": None if judge is None else {"id": judge.id, **judge.stats.as_dict()},
        "seconds": round(time.time() - started, 3),
        "code_version": code_version(),
        "versions": package_versions(),
        **extra,
    }
    fp = Path(out_dir) / FINGERPRINT_FILE
    if "fingerprint" not in results and fp.is_file():  # what made the samples, as checked by guard_out_dir
        results["fingerprint"] = json.loads(fp.read_text())
    results = redact(results)  # an API key in a base URL, an auth header in an error: never in a results file
    atomic_write_json(Path(out_dir) / "results.json", results)
    return results


# flags that change how the judge is reached, not what it answers; every other flag is part of the fingerprint
OPERATIONAL_ARGS = frozenset(
    {
        "out_dir",
        "overwrite",
        "cache",
        "timeout",
        "concurrency",
        "max_retries",
        "judge_batch_size",
        "judge_device",
        "api_key_env",
    }
)
JUDGE_ARGS = frozenset({"judge", "judge_model", "base_url", "judge_max_tokens", "judge_dtype"})  # moot without one
FINGERPRINT_FILE = "fingerprint.json"


def add_rerun_args(p: argparse.ArgumentParser) -> None:
    """``--overwrite`` for a score step (its judge cache is kept: unchanged requests cost nothing again)."""
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: remove samples.jsonl, results.json and fingerprint.json of --out-dir (the judge cache "
        "stays). Without it, a rerun resumes and refuses an --out-dir scored from other inputs, judge or settings",
    )


def scoring_fingerprint(
    args: argparse.Namespace, judge: Judge | None, benchmark: str, per_record: Sequence[str] = ()
) -> dict[str, Any]:
    """What decides a score step's samples: every flag but the operational ones (a flag naming existing files is
    recorded by their content: answers, templates, annotations, prompt file), the judge's id (model and endpoint,
    or the local checkpoint's digest) and the code of the benchmark. Flags in ``per_record`` name files whose
    records the stage itself rescores when they change (AMBER, POPE: by answer): they are not compared."""
    settings: dict[str, Any] = {}
    inputs: dict[str, Any] = {}
    for name, value in sorted(vars(args).items()):
        if name in OPERATIONAL_ARGS or callable(value) or (judge is None and name in JUDGE_ARGS) or name in per_record:
            continue
        paths = value if isinstance(value, list | tuple) else [value]
        if paths and all(isinstance(v, str) and Path(v).is_file() for v in paths):
            ids = [file_identity(v) for v in paths]
            inputs[name] = ids if isinstance(value, list | tuple) else ids[0]
        else:
            settings[name] = value
    module = sys.modules.get(f"eval.{benchmark.split('-')[0]}")
    return {
        "benchmark": benchmark,
        "judge": "rule" if judge is None else judge.id,
        "settings": settings,
        "inputs": inputs,
        "code": code_digest(*(m for m in (module, sys.modules[__name__], parsers, prompts) if m is not None)),
    }


def guard_out_dir(
    args: argparse.Namespace, judge: Judge | None, *, benchmark: str, per_record: Sequence[str] = ()
) -> dict[str, Any]:
    """Check ``args.out_dir`` before scoring into it: samples made with another ``scoring_fingerprint`` are
    refused (naming what changed) unless ``--overwrite`` starts over; returns the fingerprint recorded there."""
    out = Path(args.out_dir)
    samples = out / "samples.jsonl"
    fp = scoring_fingerprint(args, judge, benchmark, per_record)
    check_fingerprint(
        out / FINGERPRINT_FILE,
        fp,
        output=str(samples),
        overwrite=bool(getattr(args, "overwrite", False)),
        has_output=samples.is_file() and samples.stat().st_size > 0,
        start_over=lambda: remove_paths([samples, out / "results.json", out / FINGERPRINT_FILE]),
    )
    return fp


def group_mean(values: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Mean value per group, groups sorted by name."""
    sums: dict[str, list[float]] = {}
    for g, v in values:
        sums.setdefault(g, []).append(v)
    return {g: sum(v) / len(v) for g, v in sorted(sums.items())}


def load_records(path: str | Path, what: str = "--answers") -> list[dict[str, Any]]:
    """Records of a JSONL file or a JSON list (the published MMHal template is a JSON list)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file '{path}' does not exist")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} file '{path}' starts like a JSON list but is not valid JSON ({e})") from e
    else:
        data = list(iter_jsonl(path))
    bad = [i for i, r in enumerate(data) if not isinstance(r, dict)]
    if bad:
        raise ValueError(f"{what} file '{path}': record {bad[0]} is not a JSON object; each record must be one")
    return data


def fmt(value: float | None, scale: float = 100.0, digits: int = 1) -> str:
    """A metric for the console: scaled and rounded, or "n/a" when undefined (None)."""
    return "n/a" if value is None else f"{scale * value:.{digits}f}"
