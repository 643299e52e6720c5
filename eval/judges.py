"""Judges for the benchmarks: an OpenAI-compatible API client and (in ``eval.hf_judge``) a local HF causal LM.

Every judge takes chat requests and returns texts, goes through the on-disk cache (``eval.cache``) and counts its
calls, tokens, cache hits, retries and errors for the results JSON. Failures are returned per request, never
raised, except ``JudgeFatalError`` (bad key, unknown model): every later call would fail the same way.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from eval.cache import CachedAnswer, JudgeCache, request_key
from utils.openai_api import ChatEndpoint, Counters, FatalApiError

logger = logging.getLogger(__name__)


class JudgeFatalError(RuntimeError):
    """A configuration error that makes every call fail (authentication, unknown model, missing key)."""


@dataclass(frozen=True)
class JudgeRequest:
    """One chat request. ``attempt`` is part of the cache key: re-asking after an unparseable answer (or for
    another RefoMB run) is a new call, not a cache hit."""

    messages: tuple[tuple[str, str], ...]  # ((role, content), ...)
    temperature: float = 0.0
    max_tokens: int = 1024
    attempt: int = 0

    @classmethod
    def chat(cls, *, system: str | None = None, user: str | None = None, **kw: Any) -> JudgeRequest:
        msgs = ([("system", system)] if system is not None else []) + ([("user", user)] if user is not None else [])
        return cls(tuple(msgs), **kw)

    def payload(self) -> dict[str, Any]:
        return {
            "messages": [list(m) for m in self.messages],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "attempt": self.attempt,
        }

    def openai_messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass
class JudgeResponse:
    """A judge's answer (``text``) or why there is none (``error``; ``retryable`` if a rerun may succeed)."""

    text: str | None
    error: str | None = None
    retryable: bool = False
    cached: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class JudgeStats(Counters):
    """Counters reported in the results JSON; thread-safe."""

    calls: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    errors: int = 0


class Judge(Protocol):
    """What the benchmarks need from a judge."""

    id: str  # names the model and endpoint; part of every cache key
    stats: JudgeStats

    def complete(self, requests: Sequence[JudgeRequest], *, progress: bool = False) -> list[JudgeResponse]:
        """One response per request, in order; failures are responses with ``error`` set."""
        ...


def cached_complete(
    requests: Sequence[JudgeRequest],
    *,
    judge_id: str,
    cache: JudgeCache | None,
    stats: JudgeStats,
    call: Callable[[list[JudgeRequest]], list[JudgeResponse]],
) -> list[JudgeResponse]:
    """Serve requests from the cache, send the rest through ``call`` and store the successful answers."""
    out: list[JudgeResponse | None] = [None] * len(requests)
    keys = [request_key(judge_id, r.payload()) for r in requests]
    todo = []
    for i, key in enumerate(keys):
        hit = cache.get(key) if cache is not None else None
        if hit is not None:
            out[i] = JudgeResponse(
                hit.text, cached=True, prompt_tokens=hit.prompt_tokens, completion_tokens=hit.completion_tokens
            )
        else:
            todo.append(i)
    stats.add(cache_hits=len(requests) - len(todo))
    if todo:
        for i, resp in zip(todo, call([requests[i] for i in todo])):
            out[i] = resp
            if resp.error is None and resp.text is not None and cache is not None:
                cache.put(
                    keys[i],
                    judge_id,
                    requests[i].payload(),
                    CachedAnswer(resp.text, resp.prompt_tokens, resp.completion_tokens),
                )
    return out  # type: ignore[return-value]


class OpenAIJudge:
    """A chat-completions judge through the ``openai`` SDK: OpenAI, or any server that speaks the protocol
    (vLLM, SGLang, ...) via ``base_url``.

    Retries rate limits (429), server errors (5xx), timeouts, dropped connections and malformed responses with
    exponential backoff and jitter (honouring ``Retry-After``), at most ``max_retries`` times; the SDK's own
    retries are off so that every attempt is counted here.

    Example:
        >>> judge = OpenAIJudge("gpt-4o-2024-08-06", cache=JudgeCache("outputs/judge.sqlite"))  # doctest: +SKIP
        >>> judge.complete([JudgeRequest.chat(user="Say [[A]]")])[0].text  # doctest: +SKIP
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        concurrency: int = 8,
        max_retries: int = 6,
        backoff: float = 2.0,
        max_backoff: float = 60.0,
        cache: JudgeCache | None = None,
    ) -> None:
        try:
            self.endpoint = ChatEndpoint(
                model,
                [base_url],
                api_key_env=api_key_env,
                timeout=timeout,
                max_retries=max_retries,
                backoff=backoff,
                max_backoff=max_backoff,
            )
        except FatalApiError as e:
            raise JudgeFatalError(str(e)) from e
        self.model, self.base_url = model, base_url or "https://api.openai.com/v1"
        self.id = f"openai:{model}@{self.base_url}"
        self.concurrency, self.max_retries, self.timeout = max(1, concurrency), max_retries, timeout
        self.cache, self.stats = cache, JudgeStats()

    def complete(self, requests: Sequence[JudgeRequest], *, progress: bool = False) -> list[JudgeResponse]:
        def call(reqs: list[JudgeRequest]) -> list[JudgeResponse]:
            with ThreadPoolExecutor(self.concurrency) as pool:
                it = pool.map(self._call_one, reqs)
                return list(tqdm(it, total=len(reqs), desc=f"judge {self.model}", disable=not progress))

        return cached_complete(requests, judge_id=self.id, cache=self.cache, stats=self.stats, call=call)

    def _call_one(self, req: JudgeRequest) -> JudgeResponse:
        def has_text(resp: Any) -> None:
            if not isinstance(resp.choices[0].message.content, str):
                raise ValueError(f"no message content in the response: {str(resp)[:200]}")

        def count(retry: bool) -> None:
            self.stats.add(calls=1, retries=int(retry))

        try:
            res = self.endpoint.create(
                validate=has_text,
                on_attempt=count,
                messages=req.openai_messages(),
                temperature=req.temperature,
                max_tokens=req.max_tokens,
            )
        except FatalApiError as e:
            raise JudgeFatalError(f"judge {self.id}: {e}") from e
        if res.response is None:
            self.stats.add(errors=1)
            return JudgeResponse(None, error=res.error, retryable=res.retryable)
        usage = getattr(res.response, "usage", None)
        pt, ct = (usage.prompt_tokens or 0, usage.completion_tokens or 0) if usage else (0, 0)
        self.stats.add(prompt_tokens=pt, completion_tokens=ct)
        return JudgeResponse(res.response.choices[0].message.content, prompt_tokens=pt, completion_tokens=ct)


def add_judge_args(p: argparse.ArgumentParser) -> None:
    """The judge flags shared by the benchmark CLIs."""
    g = p.add_argument_group("judge")
    g.add_argument(
        "--judge",
        choices=["openai", "hf"],
        default="openai",
        help="openai: any OpenAI-compatible API (OpenAI, vLLM, SGLang); hf: a local HF causal LM",
    )
    g.add_argument(
        "--judge-model",
        default="gpt-4o-2024-08-06",
        help="API model name (--judge openai) or local checkpoint directory (--judge hf)",
    )
    g.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per API call")
    g.add_argument("--concurrency", type=int, default=8, help="parallel API calls")
    g.add_argument("--max-retries", type=int, default=6, help="retries on 429 / 5xx / timeouts")
    g.add_argument(
        "--judge-max-tokens",
        type=int,
        default=None,
        help="cap on the judge's answer length (default: the benchmark protocol's)",
    )
    g.add_argument("--judge-batch-size", type=int, default=8, help="batch size of the local HF judge")
    g.add_argument("--judge-dtype", default=None, help="dtype of the local HF judge (bf16, fp16, fp32)")
    g.add_argument("--judge-device", default=None, help="device of the local HF judge (default cuda if available)")
    g.add_argument("--cache", default=None, help="judge cache file (default: <out-dir>/judge_cache.sqlite)")


def build_judge(args: argparse.Namespace, default_cache: str | Path) -> Judge:
    """A judge from ``add_judge_args`` flags, with its cache."""
    cache = JudgeCache(args.cache or default_cache)
    if args.judge == "hf":
        from eval.hf_judge import HFJudge

        return HFJudge(
            args.judge_model,
            batch_size=args.judge_batch_size,
            dtype=args.judge_dtype,
            device=args.judge_device,
            cache=cache,
        )
    return OpenAIJudge(
        args.judge_model,
        base_url=args.base_url,
        api_key_env=args.api_key_env,
        timeout=args.timeout,
        concurrency=args.concurrency,
        max_retries=args.max_retries,
        cache=cache,
    )
