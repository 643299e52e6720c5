"""Fingerprints of what made an output: input contents, model identity and weights digest, settings, code.

A stage writes its fingerprint next to its output before the first record (``check_fingerprint``); a rerun whose
fingerprint differs is refused with the list of what changed, unless ``--overwrite`` starts it over. Stages keyed
per record also store each record's ``input_sha256`` and recompute exactly the records whose inputs changed.
What each part covers, and why, is in docs/RESUMING.md.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SMALL_FILE = 4 << 20  # files up to this size are hashed whole (configs, tokenizers, small models)
SAMPLES, SAMPLE_BYTES = 16, 64 << 10  # larger (weight) files: 16 evenly spaced 64 KiB blocks, the first at offset 0
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".model", ".json", ".txt", ".tiktoken", ".py")


class StaleOutputError(RuntimeError):
    """An output was made with other inputs or settings than the rerun's; the message says what differs."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no spaces)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return sha256_bytes(blob.encode("utf-8"))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_identity(path: str | Path | None) -> dict[str, Any] | None:
    """``{"name", "sha256"}`` of a file's content (its directory is left out: moving a file changes nothing)."""
    if path is None:
        return None
    p = Path(path)
    return {"name": p.name, "sha256": sha256_file(p) if p.is_file() else "missing"}


def _sampled_digest(path: Path, size: int) -> str:
    """The file's size and 16 evenly spaced 64 KiB blocks: any retraining changes the sampled bytes, a copy or a
    touch does not, and a 15 GB checkpoint costs 1 MiB of reading."""
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for k in range(SAMPLES):
            f.seek((size - SAMPLE_BYTES) * k // (SAMPLES - 1) if size > SAMPLE_BYTES else 0)
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def weights_digest(path: str | Path) -> str:
    """Digest of a checkpoint directory: every file up to 4 MiB whole (config, tokenizer, index, generation
    config), larger files by size and 16 sampled blocks (``_sampled_digest``); names relative to the folder."""
    root = Path(path)
    if root.is_file():
        files = [root]
        root = root.parent
    else:
        files = sorted(
            f
            for f in root.rglob("*")
            if f.is_file() and f.suffix in WEIGHT_SUFFIXES and not any(p.startswith(".") for p in f.parts[-3:])
        )
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        digest = sha256_file(f) if size <= SMALL_FILE else _sampled_digest(f, size)
        h.update(f"{f.relative_to(root)}\0{digest}\0".encode())
    return h.hexdigest()


def model_identity(
    path: str | Path | None,
    *,
    lora: str | Path | None = None,
    family: str | None = None,
    dtype: Any = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Which model made the records: its directory name, weights digest, LoRA digest, family and dtype."""
    p = Path(path) if path else None
    return {
        "name": name or (p.name if p else None),
        "weights": weights_digest(p) if p is not None and p.exists() else None,
        "lora": weights_digest(lora) if lora else None,
        "family": family,
        "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
    }


def family_identity(family: Any, *, path: str | Path | None = None, lora: str | Path | None = None) -> dict[str, Any]:
    """``model_identity`` of a loaded model family (or ChatLM): path from the model's ``name_or_path``, dtype from
    its first parameter. Pass ``lora`` when an adapter was merged at load (the model cannot tell)."""
    if callable(getattr(family, "served_identity", None)):  # a model behind a server: its served name
        return family.served_identity()
    model = getattr(family, "model", family)
    path = path or getattr(model, "name_or_path", None) or None
    try:
        dtype = next(model.parameters()).dtype
    except (AttributeError, StopIteration, TypeError):
        dtype = None
    return model_identity(path, lora=lora, family=getattr(family, "name", type(family).__name__), dtype=dtype)


def code_digest(*parts: ModuleType | type | Callable[..., Any] | str) -> dict[str, str]:
    """Short sha256 of each source file that computes a stage's records, keyed by its path in the repository."""
    out: dict[str, str] = {}
    for part in parts:
        try:
            src = part if isinstance(part, str) else inspect.getsourcefile(part)  # type: ignore[arg-type]
        except TypeError:  # a built-in (no source file): nothing of ours to version
            continue
        if not src:
            continue
        p = Path(src).resolve()
        key = str(p.relative_to(REPO)) if p.is_relative_to(REPO) else p.name
        out[key] = sha256_file(p)[:16] if p.is_file() else "missing"
    return dict(sorted(out.items()))


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the leaves that differ, with both values: ``["settings.seed: 0 -> 1", ...]``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += differences(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if old == new:
        return []
    return [f"{prefix or 'fingerprint'}: {_short(old)} -> {_short(new)}"]


def _short(v: Any) -> str:
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return repr(v[:12] + "...")  # a sha256: its start is enough to tell two apart
    s = json.dumps(v, ensure_ascii=False, default=str) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def check_fingerprint(
    path: str | Path,
    expected: dict[str, Any],
    *,
    output: str,
    overwrite: bool,
    has_output: bool,
    start_over: Callable[[], None],
    write: bool = True,
) -> None:
    """Refuse to add to ``output`` when it was made with another fingerprint; record the fingerprint otherwise.

    Args:
        path: the fingerprint file (written before the first record, so a killed run can be checked too).
        expected: the fingerprint of this run.
        output: how to name the output in the error.
        overwrite: start over: ``start_over()`` removes the old outputs, then the new fingerprint is written.
        has_output: whether records exist (an output without a fingerprint file was made by an older version).
        write: whether this process writes the file (rank 0 only, on several ranks).
    """
    from utils.secrets import redact

    path = Path(path)
    expected = redact(expected)  # a judge id may carry an endpoint's credentials: compared and stored redacted
    if overwrite:
        start_over()
    elif path.is_file():
        found = json.loads(path.read_text())
        diff = differences(found, expected)
        if diff:
            raise StaleOutputError(
                f"{output} was made with other inputs or settings than this run:\n  "
                + "\n  ".join(diff[:12])
                + (f"\n  ... and {len(diff) - 12} more" if len(diff) > 12 else "")
                + "\nIts records would not match this run's settings. Rerun with --overwrite to start over, "
                "pass another output, or rerun with the settings above (the part after each arrow is this run's)."
            )
        return
    elif has_output:
        raise StaleOutputError(
            f"{output} holds records but no fingerprint ({path.name}): it was made by an older version or its "
            "fingerprint file was deleted, so what made it is unknown. Rerun with --overwrite to start over, or "
            "pass another output"
        )
    if write:
        from utils.io import atomic_write_json

        atomic_write_json(path, expected)


def remove_paths(paths: Iterable[Path]) -> None:
    for p in paths:
        if p.is_file() or p.is_symlink():
            p.unlink()
            logger.info("--overwrite: removed %s", p)
