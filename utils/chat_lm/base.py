"""The chat-LM interface: requests, responses, counters, and the cache step every backend runs its calls through.

A backend answers each request with a text or the reason there is none (never raising, except ``FatalApiError``:
a bad key or an unknown model makes every later call fail the same way).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from utils.chat_lm.cache import CachedAnswer, RequestCache, request_key
from utils.openai_api import Counters


@dataclass(frozen=True)
class ChatRequest:
    """One chat request. ``attempt`` is part of the cache key: re-asking after an unparseable answer (or for
    another RefoMB run) is a new call, not a cache hit; a local model samples a re-ask made at temperature 0."""

    messages: tuple[tuple[str, str], ...]  # ((role, content), ...)
    temperature: float = 0.0
    max_tokens: int = 1024
    attempt: int = 0

    @classmethod
    def chat(cls, *, system: str | None = None, user: str | None = None, **kw: Any) -> ChatRequest:
        msgs = ([("system", system)] if system is not None else []) + ([("user", user)] if user is not None else [])
        return cls(tuple(msgs), **kw)

    def payload(self) -> dict[str, Any]:
        """What the cache key is computed from (with the backend's id)."""
        return {
            "messages": [list(m) for m in self.messages],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "attempt": self.attempt,
        }

    def openai_messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass
class ChatResponse:
    """An answer (``text``) or why there is none (``error``; ``retryable`` if a rerun may succeed)."""

    text: str | None
    error: str | None = None
    retryable: bool = False
    cached: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class ChatStats(Counters):
    """Counters for results files and manifests; thread-safe. ``calls`` counts model calls (API attempts, or
    sequences generated locally); ``retries`` the API attempts after the first."""

    calls: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    errors: int = 0


class ChatLM(Protocol):
    """What divide, change-question and the judges need from a chat LM."""

    id: str  # names the model (and, for an API judge, the endpoint); part of every cache key
    stats: ChatStats

    def complete(
        self, requests: Sequence[ChatRequest], *, batch_size: int | None = None, progress: bool = False
    ) -> list[ChatResponse]:
        """One response per request, in order; failures are responses with ``error`` set. ``batch_size`` caps a
        local model's batch (default: the backend's); an API backend sends ``concurrency`` requests at a time."""
        ...

    def identity(self) -> dict[str, Any]:
        """What a stage's fingerprint records as the model that made its records."""
        ...


# A read of an older cache format: (cache, request) -> the cached response, or None.
LegacyLookup = Callable[[RequestCache, ChatRequest], "ChatResponse | None"]
# A backend's calls: (requests, done) -> one response per request; done(j, response) as each one arrives.
Call = Callable[[list[ChatRequest], Callable[[int, ChatResponse], None]], list[ChatResponse]]


def cached_complete(
    requests: Sequence[ChatRequest],
    *,
    lm_id: str,
    cache: RequestCache | None,
    stats: ChatStats,
    call: Call,
    legacy: LegacyLookup | None = None,
) -> list[ChatResponse]:
    """Serve requests from the cache (key: ``lm_id`` and the request's payload; then ``legacy``) and send the rest
    through ``call``, storing each successful answer as it arrives (a crash loses only the calls in flight)."""
    out: list[ChatResponse | None] = [None] * len(requests)
    keys = [request_key(lm_id, r.payload()) for r in requests]
    todo = []
    for i, key in enumerate(keys):
        resp = None
        if cache is not None:
            hit = cache.get(key)
            if hit is not None:
                resp = ChatResponse(
                    hit.text, cached=True, prompt_tokens=hit.prompt_tokens, completion_tokens=hit.completion_tokens
                )
            elif legacy is not None:
                resp = legacy(cache, requests[i])
        if resp is None:
            todo.append(i)
        else:
            out[i] = resp
    stats.add(cache_hits=len(requests) - len(todo))

    def done(j: int, resp: ChatResponse) -> None:
        i = todo[j]
        if resp.error is None and resp.text is not None and cache is not None:
            cache.put(
                keys[i],
                lm_id,
                requests[i].payload(),
                CachedAnswer(resp.text, resp.prompt_tokens, resp.completion_tokens),
            )

    if todo:
        for i, resp in zip(todo, call([requests[i] for i in todo], done)):
            out[i] = resp
    return out  # type: ignore[return-value]
