"""The reference cache's files: its fingerprint (what made it: weights, data, template, preprocessing, max length),
the merge of the ranks' parts into ``logps.parquet``, and loading it after checking the fingerprint."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from muffin.family import ModelFamily, Sample
from muffin.train.data import PreferenceDataset
from utils.io import atomic_write_json, code_version, read_jsonl

logger = logging.getLogger(__name__)

COMPARED_PARTS = ("model", "data", "template", "preprocessing", "max_length")
TRUNCATION_POLICY = "keep prompt and image tokens; cut the answer's tail at max_length"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
PROBE_QUESTION = "What is in the image? Describe it."
PROBE_ANSWER = "A probe answer: there are two red circles, 3 squares and no dog."


def _sha256_files(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def weights_hash(path: str | Path) -> str:
    """sha256 of a checkpoint directory's weight files and config.json (names and bytes, sorted).

    Hashing a 7B checkpoint reads every byte (tens of seconds), and the reference stage and each training launch
    ask for it: a result is remembered in ``hash_memo_path()`` under the files' names, sizes, modification times and
    inodes, and recomputed when any of them changes (a rewritten or replaced file)."""
    root = Path(path)
    files = sorted(
        f
        for f in root.rglob("*")
        if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name == "config.json") and "/." not in f.as_posix()
    )
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) under '{root}'; is it a checkpoint?")
    memo_file = hash_memo_path()
    key = _stat_key(files, root)
    memo = _read_memo(memo_file) if memo_file else {}
    if key in memo:
        return memo[key]
    digest = _sha256_files(files, root)
    if memo_file:  # read again: another process may have added entries while this one hashed
        memo = dict(list(_read_memo(memo_file).items())[-(MEMO_ENTRIES - 1) :])
        memo[key] = digest
        try:
            atomic_write_json(memo_file, memo)
        except OSError as e:  # a read-only home: hash again next time
            logger.debug("could not remember the weights hash in %s: %s", memo_file, e)
    return digest


MEMO_ENTRIES = 256  # checkpoints remembered; the oldest are dropped


def hash_memo_path() -> Path | None:
    """Where ``weights_hash`` remembers its results: ``$RLAIFV_HASH_MEMO`` (empty or ``off``: nowhere, every call
    reads the bytes), else ``$XDG_CACHE_HOME/rlaifv/weights_sha256.json`` (``~/.cache`` without it)."""
    v = os.environ.get("RLAIFV_HASH_MEMO")
    if v is not None:
        return None if v.strip().lower() in ("", "0", "off", "false") else Path(v)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlaifv" / "weights_sha256.json"


def _stat_key(files: list[Path], root: Path) -> str:
    stats = []
    for f in files:
        st = f.stat()
        stats.append([str(f.relative_to(root)), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev])
    return hashlib.sha256(json.dumps([str(root.resolve()), stats]).encode()).hexdigest()


def _read_memo(path: Path) -> dict[str, str]:
    try:
        memo = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # torn or foreign file: start afresh
        logger.debug("ignoring the weights-hash memo %s: %s", path, e)
        return {}
    return (
        {k: v for k, v in memo.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(memo, dict) else {}
    )


def _probe_image() -> Image.Image:
    w, h = 61, 37  # not square: exercises the family's padding / resizing
    return Image.frombytes(
        "RGB", (w, h), bytes((x * 7 + y * 13 + c * 50) % 256 for y in range(h) for x in range(w) for c in range(3))
    )


def probe_hashes(family: ModelFamily) -> tuple[str, str]:
    """(template, preprocessing) hashes: the token ids / answer mask and the vision tensors of a fixed probe pair."""
    batch = family.encode([Sample(_probe_image(), PROBE_QUESTION, PROBE_ANSWER)])
    text_keys = ("input_ids", "attention_mask", "answer_mask")
    template, vision = hashlib.sha256(), hashlib.sha256()
    for k in sorted(batch):
        v = batch[k]
        if not torch.is_tensor(v) or k == "truncated":
            continue
        if k in text_keys:
            template.update(k.encode() + v.to(torch.int64).numpy().tobytes())
        else:  # rounded so that last-bit differences between library builds do not invalidate a cache
            q = torch.round(v.float() * 1000).to(torch.int64) if v.is_floating_point() else v.to(torch.int64)
            vision.update(k.encode() + str(tuple(v.shape)).encode() + q.numpy().tobytes())
    vision.update(TRUNCATION_POLICY.encode())
    return template.hexdigest(), vision.hexdigest()


def make_fingerprint(
    family: ModelFamily,
    *,
    model_path: str | Path,
    dataset: PreferenceDataset,
    max_length: int,
    lora_path: str | Path | None = None,
) -> dict[str, Any]:
    """What made a reference cache; parts in ``COMPARED_PARTS`` must match for the cache to be reused."""
    template, preprocessing = probe_hashes(family)
    return {
        "model": {
            "family": family.name,
            "weights_sha256": weights_hash(model_path),
            "lora_weights_sha256": weights_hash(lora_path) if lora_path else None,
            # the log-probs are computed in the model's dtype: bf16 ones differ from fp32 ones by more than noise
            "dtype": str(next(family.model.parameters()).dtype),
        },
        "data": {"sha256": dataset.content_hash(), "num_pairs": len(dataset)},
        "template": {"sha256": template},
        "preprocessing": {"sha256": preprocessing, "truncation": TRUNCATION_POLICY},
        "max_length": max_length,
        "info": {
            "model_path": str(model_path),
            "data": dataset.source,
            "code_version": code_version(),
        },
    }


def fingerprint_mismatch(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Names of the compared parts that differ."""
    return [p for p in COMPARED_PARTS if found.get(p) != expected.get(p)]


def default_logps_dir(dataset: PreferenceDataset) -> Path:
    """``<data dir or file>.logps`` next to the data; ``./<owner>__<name>.logps`` for a hub id."""
    if dataset.kind == "hub":
        return Path(dataset.source.replace("/", "__") + ".logps")
    return Path(str(Path(dataset.source)).rstrip("/") + ".logps")


def merge_parts(
    dataset: PreferenceDataset, logps_dir: Path, fingerprint: dict[str, Any], world: int, started: float
) -> None:
    """Write ``logps.parquet`` in data order from the ranks' part files, then ``fingerprint.json`` (last: it marks
    the cache complete), and remove the parts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    by_row: dict[int, dict[str, Any]] = {}
    for f in sorted((logps_dir / "parts").glob(f"rank*-of-{world}.jsonl")):
        for rec in read_jsonl(f):
            by_row[rec["row"]] = rec
    missing = [i for i in range(len(dataset)) if i not in by_row]
    if missing:
        raise RuntimeError(
            f"reference log-probs missing for {len(missing)} rows (first {missing[:5]}); rerun the stage, it resumes"
        )
    recs = [by_row[i] for i in range(len(dataset))]
    table = pa.table({"idx": [str(r["idx"]) for r in recs], "logps": [json.dumps(r["logps"]) for r in recs]})
    tmp = logps_dir / ".logps.parquet.tmp"
    pq.write_table(table, tmp)
    tmp.replace(logps_dir / "logps.parquet")
    fingerprint = {
        **fingerprint,
        "info": {
            **fingerprint["info"],
            "seconds": round(time.time() - started, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    }
    atomic_write_json(logps_dir / "fingerprint.json", fingerprint)  # written last: marks the cache complete
    shutil.rmtree(logps_dir / "parts")
    logger.info("wrote reference log-probs of %d pairs to %s", len(recs), logps_dir)


def load_reference_logps(logps_dir: str | Path, expected: dict[str, Any]) -> list[str]:
    """The cached ``logps`` column, after checking the fingerprint; raises ValueError naming what differs."""
    import pyarrow.parquet as pq

    logps_dir = Path(logps_dir)
    found = json.loads((logps_dir / "fingerprint.json").read_text())
    diff = fingerprint_mismatch(found, expected)
    if diff:
        details = "; ".join(f"{p}: cached {found.get(p)} vs now {expected.get(p)}" for p in diff)
        raise ValueError(
            f"reference log-probs in '{logps_dir}' were made with a different {', '.join(diff)} ({details}). "
            f"Recompute them: python -m muffin.train.reference --model_path {expected['info']['model_path']} "
            f"--data {expected['info']['data']} --logps_dir {logps_dir} --overwrite (or pass another --logps_dir)"
        )
    return pq.read_table(logps_dir / "logps.parquet", columns=["logps"]).column("logps").to_pylist()
