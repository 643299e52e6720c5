"""The feedback stages' models behind OpenAI-compatible servers (vLLM, SGLang, ``muffin.serve``): a prompt's samples
as one request with ``n`` and a seed, the labeler's P(yes) / P(no) from the first answer token's top logprobs, and
the divide / change-question model (served as the chat-LM backend ``utils.chat_lm``, or local). Requests are spread
over servers, retried and cached on disk, so a rerun after a crash re-sends nothing that finished.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from utils.chat_lm import ChatLM, ChatRequest, ChatResponse
from utils.chat_lm.api import ApiChatLM
from utils.chat_lm.cache import CachedAnswer, RequestCache, request_key
from utils.images import image_to_bytes
from utils.openai_api import ChatEndpoint, Counters

logger = logging.getLogger(__name__)


def image_part(image: Image.Image) -> dict[str, Any]:
    """An ``image_url`` content part holding the image as a PNG data URL."""
    import base64

    return {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(image_to_bytes(image)).decode()},
    }


def user_message(image: Image.Image | None, text: str) -> list[dict[str, Any]]:
    """A single-turn chat: the image first, then the text (as LLaVA-style templates place them)."""
    if image is None:
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [image_part(image), {"type": "text", "text": text}]}]


def sampling_request(
    image: Image.Image | None, question: str, *, n: int, seed: int, temperature: float, top_p: float, max_tokens: int
) -> dict[str, Any]:
    """The ``n`` samples of one prompt as one request (the server seeds its choices from ``seed``)."""
    return {"messages": user_message(image, question), "n": n, "seed": seed, "temperature": temperature,
            "top_p": top_p, "max_tokens": max_tokens}  # fmt: skip


def labeler_request(image: Image.Image | None, question: str, top_logprobs: int = 20) -> dict[str, Any]:
    """One yes/no question: one greedy token with its ``top_logprobs`` alternatives."""
    return {"messages": user_message(image, question), "temperature": 0.0, "max_tokens": 1, "logprobs": True,
            "top_logprobs": top_logprobs}  # fmt: skip


def choice_texts(response: dict[str, Any]) -> list[str]:
    """The texts of a response's choices, in index order; a choice without text is a malformed response."""
    choices = sorted(response.get("choices") or [], key=lambda c: c.get("index", 0))
    texts = [(c.get("message") or {}).get("content") for c in choices]
    if not texts or any(not isinstance(t, str) for t in texts):
        raise ValueError(f"a choice without text in {json.dumps(response)[:200]}")
    return texts


CASE_VARIANTS = ("yes", "Yes", "no", "No")  # the local labeler's read-out sums these first tokens


def first_token_alternatives(response: dict[str, Any]) -> list[dict[str, Any]]:
    """The first answer token's ``top_logprobs``; ValueError when the body has none (a malformed answer for the
    labeler: retried, then recorded)."""
    try:
        top = response["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError("the response carries no first-token top_logprobs (start the server with logprobs on, "
                         "e.g. vLLM's --max-logprobs 20)") from e  # fmt: skip
    if not isinstance(top, list) or not top:
        raise ValueError("the response's first-token top_logprobs are empty")
    return top


def yes_no_from_logprobs(response: dict[str, Any]) -> tuple[float, float]:
    """(P(yes), P(no)) of the first answer token: the probabilities of its top alternatives whose text, stripped, is
    "yes" / "Yes" (resp. "no" / "No"), summed as the local path sums "yes" and "Yes". ValueError when neither
    word is among the alternatives (the labeler would say something else: a per-record error, not a retry)."""
    top = first_token_alternatives(response)
    p = {"yes": 0.0, "no": 0.0}
    for entry in top:
        word = str(entry.get("token", "")).strip()
        if word in CASE_VARIANTS:
            p[word.lower()] += math.exp(float(entry["logprob"]))
    if p["yes"] == 0.0 and p["no"] == 0.0:
        shown = ", ".join(repr(e.get("token")) for e in top[:5])
        raise ValueError(f"neither 'yes' nor 'no' among the first token's top {len(top)} alternatives ({shown}, ...)")
    return p["yes"], p["no"]


@dataclass
class ServedStats(Counters):
    """Counters for manifests and reports; thread-safe."""

    requests: int = 0
    cache_hits: int = 0
    attempts: int = 0
    retries: int = 0
    errors: int = 0


@dataclass
class Served:
    """A response's JSON (``response``) or why there is none (``error``)."""

    response: dict[str, Any] | None = None
    error: str | None = None


class ServedModel:
    """A model behind one or more servers, its requests cached by (model, request).

    Args:
        urls: base URLs (``http://node1:8000/v1``, or one comma-separated string); requests round-robin over them, a
            retry moves to the next.
        model: the served model name (default: the first one the first server lists).
        cache: the request cache file (SQLite, ``utils.chat_lm.cache``).
        concurrency: requests in flight.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        model: str | None = None,
        cache: str | Path | None = None,
        concurrency: int = 16,
        timeout: float = 300.0,
        max_retries: int = 6,
        backoff: float = 2.0,
        api_key_env: str = "OPENAI_API_KEY",
    ) -> None:
        urls = [u.strip().rstrip("/") for u in (urls.split(",") if isinstance(urls, str) else urls) if u.strip()]
        if not urls:
            raise ValueError("give at least one server URL (http://host:port/v1)")
        self.urls = urls
        self.model = model or served_model_name(urls[0], api_key_env)
        self.endpoint = ChatEndpoint(self.model, urls, api_key_env=api_key_env, timeout=timeout,
                                     max_retries=max_retries, backoff=backoff)  # fmt: skip
        self.id = f"served:{self.model}"  # not the URLs: the same model on other servers answers the same
        self.cache = RequestCache(cache) if cache is not None else None
        self.concurrency = max(1, concurrency)
        self.stats = ServedStats()

    def identity(self) -> dict[str, Any]:
        """What a stage records as the model that made its records."""
        return {"served_model": self.model, "servers": list(self.urls)}

    def call(self, request: dict[str, Any], validate: Any = None) -> Served:
        """One request through the cache; ``validate(response_json)`` raising ValueError marks a body malformed
        (retried like one; the cache keeps only bodies that passed)."""
        key = request_key(self.id, request)
        hit = self.cache.get(key) if self.cache is not None else None
        self.stats.add(requests=1)
        if hit is not None:
            self.stats.add(cache_hits=1)
            return Served(json.loads(hit.text))

        def check(resp: Any) -> None:
            if validate is not None:
                validate(resp.model_dump())

        res = self.endpoint.create(
            validate=check, on_attempt=lambda retry: self.stats.add(attempts=1, retries=int(retry)), **request
        )
        if res.response is None:
            self.stats.add(errors=1)
            return Served(error=res.error)
        body = res.response.model_dump()
        if self.cache is not None:
            self.cache.put(key, self.id, request, CachedAnswer(json.dumps(body), 0, 0))
        return Served(body)

    def map(self, requests: Sequence[dict[str, Any]], validate: Any = None, *, progress: bool = False,
            desc: str = "served") -> list[Served]:  # fmt: skip
        """``call`` for each request, ``concurrency`` at a time, results in order."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            it = pool.map(lambda r: self.call(r, validate), requests)
            return list(tqdm(it, total=len(requests), desc=desc, disable=not progress))


def served_model_name(url: str, api_key_env: str = "OPENAI_API_KEY") -> str:
    """The first model a server lists at ``/models`` (what `vllm serve CKPT` names ``CKPT``)."""
    from openai import OpenAI

    from utils.openai_api import api_key

    try:
        models = OpenAI(api_key=api_key(api_key_env, [url]), base_url=url, timeout=30, max_retries=2).models.list()
        return models.data[0].id
    except Exception as e:  # noqa: BLE001 (any failure here is one message: the server is not usable)
        raise ValueError(f"cannot list the models of {url} ({type(e).__name__}: {e}); is the server up? "
                         "pass the model name explicitly") from e  # fmt: skip


# --- the stages on a served model ------------------------------------------------------------------------------


def add_server_args(p: Any, role: str) -> None:
    """``--{role}-server URL[,URL...]`` and the client's knobs (shared by the stages that take a served model)."""
    p.add_argument(f"--{role}-server", default=None,
                   help=f"serve the {role} instead of loading it: OpenAI-compatible base URL(s), comma-separated")  # fmt: skip
    p.add_argument("--served-model", default=None, help="the served model's name (default: the first it lists)")
    p.add_argument("--server-cache", default=None,
                   help="request cache file: a rerun re-sends nothing it holds (default: <out>.requests.sqlite)")  # fmt: skip
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request attempt")
    p.add_argument("--max-retries", type=int, default=6,
                   help="retries of a request after a 429, 5xx, timeout or malformed body, with exponential backoff")  # fmt: skip


def served_from_args(args: Any, role: str, out: str | Path) -> ServedModel:
    return ServedModel(getattr(args, f"{role}_server"), model=args.served_model, cache=args.server_cache or f"{out}.requests.sqlite",
                       concurrency=args.concurrency, timeout=args.request_timeout, max_retries=args.max_retries)  # fmt: skip


def served_identity(model: ServedModel) -> dict[str, Any]:
    """What a fingerprint records of a served model: its name (the servers' addresses may change between runs)."""
    return {"served_model": model.model}


def served_yes_no_probs(
    model: ServedModel, samples: Sequence[Any], *, top_logprobs: int = 20
) -> list[tuple[float, float]]:
    """(P(yes), P(no)) of each sample's question from the first token's top logprobs; ValueError naming the question
    when a request failed or neither word is among the alternatives (the caller then records that question alone)."""
    res = model.map([labeler_request(s.image, s.question, top_logprobs) for s in samples],
                    validate=first_token_alternatives)  # fmt: skip
    out = []
    for s, r in zip(samples, res):
        if r.response is None:
            raise ValueError(f"question {s.question!r}: {r.error}")
        try:
            out.append(yes_no_from_logprobs(r.response))
        except ValueError as e:
            raise ValueError(f"question {s.question!r}: {e}") from e
    return out


def served_chat_lm(served: ServedModel) -> ApiChatLM:
    """The divide / change-question model behind ``served``'s servers, as a chat LM sharing its endpoint and cache;
    it also reads the answers those stages cached before they used the chat-LM backend (``legacy_text_answer``)."""
    return ApiChatLM(served.endpoint, id=served.id, cache=served.cache, concurrency=served.concurrency,
                     legacy=lambda cache, req: legacy_text_answer(cache, served.id, req))  # fmt: skip


def legacy_text_answer(cache: RequestCache, model_id: str, req: ChatRequest) -> ChatResponse | None:
    """A greedy single-turn answer cached in the earlier format of the served divide / change-question stages: keyed
    by the request as sent (one user message, ``temperature`` 0.0, ``max_tokens``), the whole response body
    stored. None when the request could not have been cached so, or is not there."""
    if req.attempt or req.temperature != 0.0 or len(req.messages) != 1 or req.messages[0][0] != "user":
        return None
    sent = {"messages": user_message(None, req.messages[0][1]), "temperature": 0.0, "max_tokens": req.max_tokens}
    hit = cache.get(request_key(model_id, sent))
    if hit is None:
        return None
    try:
        return ChatResponse(choice_texts(json.loads(hit.text))[0], cached=True)
    except (ValueError, TypeError):  # a body that is not an answer: ask again
        return None


def text_model(
    path: str,
    served: ServedModel | None = None,
    *,
    dtype: Any = None,
    device: Any = None,
    cache: str | Path | None = None,
) -> tuple[ChatLM | None, str]:
    """The divide / change-question model and the name its stage records: the served model when given (cached in its
    request cache), else no model for the rules (``path == "rule"``) or the local chat-LM checkpoint at ``path``,
    its calls cached in ``cache`` when given."""
    if served is not None:
        lm = served_chat_lm(served)
        return lm, lm.id
    if path == "rule":
        return None, "rule"
    from utils.chat_lm.hf import HFChatLM

    lm = HFChatLM.from_pretrained(path, dtype=dtype, device=device, cache=RequestCache(cache) if cache else None)
    return lm, path
