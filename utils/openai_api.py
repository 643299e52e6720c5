"""Calls to OpenAI-compatible chat-completions servers (OpenAI, vLLM, SGLang, ``muffin.serve``) with the retry policy
the judges and the served feedback stages share: rate limits, server errors, timeouts, dropped connections and
malformed bodies are retried with exponential backoff and jitter (at least the server's Retry-After), requests are
spread over several servers and move to the next one on a retry; a request the server rejects (400) is not retried.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

logger = logging.getLogger(__name__)


class FatalApiError(RuntimeError):
    """A configuration error that makes every call fail (authentication, unknown model, missing key)."""


@dataclass
class Counters:
    """Thread-safe integer counters for results files and manifests; subclasses declare the fields (default 0)."""

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


@dataclass
class CallResult:
    """A response (the SDK's object) or why there is none; ``retryable``: a later run may succeed."""

    response: Any = None
    error: str | None = None
    retryable: bool = False
    attempts: int = 0


def api_key(env: str, base_urls: Sequence[str | None]) -> str:
    """The key from ``env``; local servers (any base URL given) accept a placeholder."""
    key = os.environ.get(env)
    if key:
        return key
    if any(u is None for u in base_urls):
        raise FatalApiError(
            f"environment variable {env} is not set; export your API key there or name another variable with "
            "--api-key-env"
        )
    return "EMPTY"


class ChatEndpoint:
    """One model behind one or more OpenAI-compatible base URLs.

    Args:
        model: the served model name.
        base_urls: server URLs (``http://host:8000/v1``); None is OpenAI's own.
        validate: checks a response and raises ValueError when it is unusable (treated as a malformed body).
        on_attempt: called with ``retry=True/False`` on every attempt (for the callers' counters).
    """

    def __init__(
        self,
        model: str,
        base_urls: Sequence[str | None] = (None,),
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        max_retries: int = 6,
        backoff: float = 2.0,
        max_backoff: float = 60.0,
    ) -> None:
        from openai import OpenAI

        if not base_urls:
            raise ValueError("give at least one server URL")
        key = api_key(api_key_env, base_urls)
        self.model, self.base_urls = model, list(base_urls)
        self.clients = [OpenAI(api_key=key, base_url=u, timeout=timeout, max_retries=0) for u in self.base_urls]
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self._next = itertools.count()
        self._lock = threading.Lock()

    def _start(self) -> int:
        with self._lock:
            return next(self._next)

    def create(
        self,
        validate: Callable[[Any], None] | None = None,
        on_attempt: Callable[[bool], None] | None = None,
        **kwargs: Any,
    ) -> CallResult:
        """``chat.completions.create(model=..., **kwargs)`` with retries; never raises but ``FatalApiError``."""
        import openai

        first = self._start()
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if on_attempt is not None:
                on_attempt(attempt > 0)
            client = self.clients[(first + attempt) % len(self.clients)]  # a retry goes to the next server
            retry_after = None
            try:
                resp = client.chat.completions.create(model=self.model, **kwargs)
                if not getattr(resp, "choices", None):
                    raise ValueError(f"no choices in the response: {str(resp)[:200]}")
                if validate is not None:
                    validate(resp)
                return CallResult(resp, attempts=attempt + 1)
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                raise FatalApiError(
                    f"{client.base_url} refused the request ({type(e).__name__}: {e}); check the API key variable, "
                    "the model name and the URL"
                ) from e
            except openai.BadRequestError as e:  # e.g. a prompt too long: this request will never succeed
                return CallResult(error=f"bad request: {e}", retryable=False, attempts=attempt + 1)
            except openai.APIStatusError as e:
                last = f"HTTP {e.status_code}: {str(e)[:200]}"
                if e.status_code != 429 and e.status_code < 500:
                    return CallResult(error=last, retryable=False, attempts=attempt + 1)
                retry_after = _retry_after(e)
            except (openai.APITimeoutError, openai.APIConnectionError) as e:
                last = f"{type(e).__name__}: {e}"
            except (openai.APIResponseValidationError, ValueError, AttributeError, IndexError, TypeError) as e:
                last = f"malformed response: {type(e).__name__}: {str(e)[:200]}"
            except openai.OpenAIError as e:  # anything else the SDK raises: retried, then recorded, never fatal
                last = f"{type(e).__name__}: {str(e)[:200]}"
            if attempt < self.max_retries:
                time.sleep(self.delay(attempt, retry_after))
        logger.warning("%s gave up after %d attempts: %s", self.model, self.max_retries + 1, last)
        return CallResult(error=f"gave up after {self.max_retries + 1} attempts: {last}", retryable=True,
                          attempts=self.max_retries + 1)  # fmt: skip

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with "equal jitter" (half fixed, half random), at least the server's Retry-After."""
        base = min(self.max_backoff, self.backoff * 2**attempt)
        delay = base / 2 + random.uniform(0, base / 2)
        return min(self.max_backoff, max(delay, retry_after or 0.0))


def _retry_after(e: Any) -> float | None:
    try:
        value = e.response.headers.get("retry-after")
        return float(value) if value is not None else None
    except (AttributeError, TypeError, ValueError):
        return None
