"""The chat LM behind an OpenAI-compatible server (OpenAI, vLLM, SGLang, ``muffin.serve``): one request per chat,
``concurrency`` in flight, retried as ``utils.openai_api`` retries (429, 5xx, timeouts, malformed bodies)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tqdm.auto import tqdm

from utils.chat_lm.base import ChatRequest, ChatResponse, ChatStats, LegacyLookup, cached_complete
from utils.chat_lm.cache import RequestCache
from utils.openai_api import ChatEndpoint, FatalApiError

OPENAI_URL = "https://api.openai.com/v1"


class ApiChatLM:
    """A chat LM served by one or more OpenAI-compatible endpoints, its calls cached.

    Args:
        endpoint: the model and its servers, with the retry policy (``max_retries``, backoff).
        id: names what answers, in every cache key (the judges name the endpoint too; the served stages only the
            model, so that the same model on other nodes continues the same cache).
        cache: the request cache (SQLite), or None.
        concurrency: requests in flight.
        legacy: a read of an older cache format (``cached_complete``).

    Example:
        >>> lm = ApiChatLM.connect("gpt-4o-2024-08-06", cache=RequestCache("judge.sqlite"))  # doctest: +SKIP
        >>> lm.complete([ChatRequest.chat(user="Say [[A]]")])[0].text  # doctest: +SKIP
    """

    def __init__(
        self,
        endpoint: ChatEndpoint,
        *,
        id: str,  # noqa: A002 (the attribute every backend and the results JSON call id)
        cache: RequestCache | None = None,
        concurrency: int = 8,
        legacy: LegacyLookup | None = None,
    ) -> None:
        self.endpoint, self.id, self.cache, self.legacy = endpoint, id, cache, legacy
        self.model = endpoint.model
        self.concurrency = max(1, concurrency)
        self.stats = ChatStats()

    @classmethod
    def connect(
        cls,
        model: str,
        base_urls: Sequence[str | None] = (None,),
        *,
        id: str | None = None,  # noqa: A002
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        max_retries: int = 6,
        backoff: float = 2.0,
        max_backoff: float = 60.0,
        concurrency: int = 8,
        cache: RequestCache | None = None,
    ) -> ApiChatLM:
        """Connect to ``model`` at ``base_urls`` (None: OpenAI's own); ``id`` defaults to ``openai:MODEL@URL``.
        Raises ``FatalApiError`` when the key variable is unset for OpenAI's own endpoint."""
        endpoint = ChatEndpoint(
            model,
            list(base_urls),
            api_key_env=api_key_env,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            max_backoff=max_backoff,
        )
        lm_id = id or f"openai:{model}@{','.join(u or OPENAI_URL for u in base_urls)}"
        return cls(endpoint, id=lm_id, cache=cache, concurrency=concurrency)

    def identity(self) -> dict[str, Any]:
        return {"name": self.id, "weights": None, "lora": None, "family": "served", "dtype": None}

    def complete(
        self, requests: Sequence[ChatRequest], *, batch_size: int | None = None, progress: bool = False
    ) -> list[ChatResponse]:
        def call(reqs: list[ChatRequest], done: Callable[[int, ChatResponse], None]) -> list[ChatResponse]:
            def one(j: int) -> ChatResponse:
                resp = self._call_one(reqs[j])
                done(j, resp)
                return resp

            with ThreadPoolExecutor(self.concurrency) as pool:
                it = pool.map(one, range(len(reqs)))
                return list(tqdm(it, total=len(reqs), desc=f"chat {self.model}", disable=not progress))

        return cached_complete(
            requests, lm_id=self.id, cache=self.cache, stats=self.stats, call=call, legacy=self.legacy
        )

    def _call_one(self, req: ChatRequest) -> ChatResponse:
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
            raise FatalApiError(f"{self.id}: {e}") from e
        if res.response is None:
            self.stats.add(errors=1)
            return ChatResponse(None, error=res.error, retryable=res.retryable)
        usage = getattr(res.response, "usage", None)
        pt, ct = (usage.prompt_tokens or 0, usage.completion_tokens or 0) if usage else (0, 0)
        self.stats.add(prompt_tokens=pt, completion_tokens=ct)
        return ChatResponse(res.response.choices[0].message.content, prompt_tokens=pt, completion_tokens=ct)
