"""Crash-safe files: atomic writes, append-only JSONL that resumes by key, and stage manifests.

A stage that is killed at any point and rerun continues where it stopped: finished records are read back by
their key, a torn last line is discarded, and whole-file outputs appear only complete (write-then-rename).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def umask_mode(base: int = 0o666) -> int:
    """The mode ``open()`` would give a new file: ``base`` less the process umask."""
    try:  # Linux reports the umask without changing it (os.umask can only be read by setting it, racing threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return base & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return base & ~mask


def temp_file_for(path: Path) -> tuple[int, str]:
    """A temporary file next to ``path`` (same file system, so ``os.replace`` is atomic) with the mode a plain
    ``open()`` would give: ``mkstemp`` creates 0600 whatever the umask, which made every output private."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, umask_mode())
    return fd, tmp


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_for(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` so that readers see either the old file or the whole new one."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a JSONL file; a torn final line (crash mid-write) is ignored."""
    return list(iter_jsonl(path))


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    path = Path(path)
    with path.open() as f:
        lines = f.readlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) and not line.endswith("\n"):
                return  # torn last line from a crash: the record will be redone
            raise ValueError(f"{path}:{n}: invalid JSON ({e}); fix or delete that line") from e


class JsonlWriter:
    """Append-only JSONL keyed by ``key``; ``done`` holds the keys already written (for resuming).

    Each record is written with one ``write`` + flush + fsync, so a kill loses at most the record in flight.
    A torn last line left by an earlier crash is cut off when the writer opens.

    Example:
        >>> w = JsonlWriter("out.jsonl", key="id")  # doctest: +SKIP
        >>> for rec in todo:                          # doctest: +SKIP
        ...     if rec["id"] not in w.done: w.write(process(rec))
    """

    def __init__(self, path: str | Path, key: str | tuple[str, ...] = "id", fsync: bool = True) -> None:
        self.path = Path(path)
        self.key = key
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[Any] = set()
        if self.path.exists():
            self._repair()
            for rec in iter_jsonl(self.path):
                self.done.add(self.key_of(rec))
        self._f = self.path.open("a")

    def key_of(self, rec: dict[str, Any]) -> Any:
        if isinstance(self.key, tuple):
            return tuple(rec[k] for k in self.key)
        return rec[self.key]

    def _repair(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with self.path.open("r+b") as f:
                f.truncate(cut)

    def write(self, rec: dict[str, Any]) -> None:
        k = self.key_of(rec)
        if k in self.done:
            return
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())
        self.done.add(k)

    def write_many(self, recs: Iterable[dict[str, Any]]) -> None:
        for r in recs:
            self.write(r)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def code_version() -> str:
    """Git commit of the code (with '+dirty'), or the package version when not in a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("rlaifv")
        except PackageNotFoundError:
            return "unknown"


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("torch", "transformers", "peft", "accelerate", "deepspeed", "datasets", "timm", "openai"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def thread_settings() -> dict[str, Any]:
    """The CPU threads a run had (timings depend on them): torch's intra-op threads when torch is loaded, the
    OMP / MKL variables, and the cores this process may use."""
    import sys

    torch = sys.modules.get("torch")
    return {
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }


def write_manifest(
    path: str | Path, *, stage: str, config: dict[str, Any], counts: dict[str, Any], started: float, **extra: Any
) -> dict[str, Any]:
    """Record what made an output: stage, config, counts, timing, the machine's threads, code and package versions
    (secrets redacted: ``utils.secrets.redact``)."""
    from utils.secrets import redact

    manifest = {
        "stage": stage,
        "config": config,
        "counts": counts,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 3),
        "code_version": code_version(),
        "versions": package_versions(),
        "threads": thread_settings(),
        **extra,
    }
    manifest = redact(manifest)
    atomic_write_json(path, manifest)
    return manifest
