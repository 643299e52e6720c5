"""On-disk cache of model calls (judges, divide / change-question, served stages) keyed by (model id, full request):
a rerun costs nothing, a crash loses nothing.

SQLite (as lm-evaluation-harness caches its API calls): each answer is committed as it arrives, readers in other
processes see it at once (WAL mode), and a killed process leaves the file consistent. Only successful answers are
stored, so a call that failed is tried again on the next run.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def request_key(model_id: str, payload: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of (model id, request payload); the "judge" field name keeps the keys of caches
    written by the judges before the stages shared this cache."""
    blob = json.dumps({"judge": model_id, "request": payload}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class CachedAnswer:
    text: str
    prompt_tokens: int
    completion_tokens: int


class RequestCache:
    """A thread-safe key -> answer store in one SQLite file.

    Example:
        >>> cache = RequestCache("outputs/judge_cache.sqlite")  # doctest: +SKIP
        >>> key = request_key("openai:gpt-4o@https://api.openai.com/v1", {"messages": [...]})  # doctest: +SKIP
        >>> cache.get(key) or cache.put(key, "openai:...", {...}, CachedAnswer("Rating: 5", 900, 40))  # doctest: +SKIP
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, judge_id TEXT, request TEXT, response TEXT, "
            "prompt_tokens INTEGER, completion_tokens INTEGER, created REAL)"
        )
        self._db.commit()

    def get(self, key: str) -> CachedAnswer | None:
        with self._lock:
            row = self._db.execute(
                "SELECT response, prompt_tokens, completion_tokens FROM calls WHERE key = ?", (key,)
            ).fetchone()
        return None if row is None else CachedAnswer(row[0], int(row[1] or 0), int(row[2] or 0))

    def put(self, key: str, model_id: str, payload: dict[str, Any], answer: CachedAnswer) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO calls VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    model_id,
                    json.dumps(payload, ensure_ascii=False),
                    answer.text,
                    answer.prompt_tokens,
                    answer.completion_tokens,
                    time.time(),
                ),
            )
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM calls").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
