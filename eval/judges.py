"""Judges for the benchmarks: a judge is a chat LM (``utils.chat_lm``), an OpenAI-compatible API or a local HF
causal LM, with the on-disk cache, retries and counters that backend gives; here are the judge flags and the two
constructors. Failures come back per request, never raised, except ``JudgeFatalError`` (bad key, unknown model).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from utils.chat_lm import ChatLM, ChatRequest, ChatResponse, ChatStats
from utils.chat_lm.api import ApiChatLM
from utils.chat_lm.cache import RequestCache
from utils.openai_api import FatalApiError

# The benchmarks' names for the chat-LM types: a judge answers chat requests like any chat LM.
Judge = ChatLM
JudgeRequest = ChatRequest
JudgeResponse = ChatResponse
JudgeStats = ChatStats
JudgeFatalError = FatalApiError  # a configuration error that makes every call fail


def openai_judge(
    model: str,
    *,
    base_url: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    timeout: float = 120.0,
    concurrency: int = 8,
    max_retries: int = 6,
    backoff: float = 2.0,
    max_backoff: float = 60.0,
    cache: RequestCache | None = None,
) -> ApiChatLM:
    """A chat-completions judge: OpenAI, or any server that speaks the protocol (vLLM, SGLang, ...) via
    ``base_url``. Its id, ``openai:MODEL@URL``, keys its cache entries.

    Example:
        >>> judge = openai_judge("gpt-4o-2024-08-06", cache=RequestCache("outputs/judge.sqlite"))  # doctest: +SKIP
        >>> judge.complete([JudgeRequest.chat(user="Say [[A]]")])[0].text  # doctest: +SKIP
    """
    return ApiChatLM.connect(
        model,
        [base_url],
        api_key_env=api_key_env,
        timeout=timeout,
        max_retries=max_retries,
        backoff=backoff,
        max_backoff=max_backoff,
        concurrency=concurrency,
        cache=cache,
    )


def hf_judge(
    model_path: str | Path,
    *,
    batch_size: int = 8,
    dtype: str | None = None,
    device: str | None = None,
    cache: RequestCache | None = None,
) -> Judge:
    """A local judge: any instruction-tuned HF causal LM, batched, so every benchmark can run offline. Its id,
    ``hf:DIR:FINGERPRINT``, changes when the checkpoint at the path is replaced.

    Example:
        >>> judge = hf_judge("checkpoints/Qwen2.5-7B-Instruct", batch_size=16)  # doctest: +SKIP
    """
    from utils.chat_lm.hf import HFChatLM  # torch and transformers load only for a local judge

    return HFChatLM.from_pretrained(
        model_path, dtype=dtype, device=device, batch_size=batch_size, cache=cache, flag="--judge-model"
    )


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
    cache = RequestCache(args.cache or default_cache)
    if args.judge == "hf":
        return hf_judge(
            args.judge_model,
            batch_size=args.judge_batch_size,
            dtype=args.judge_dtype,
            device=args.judge_device,
            cache=cache,
        )
    return openai_judge(
        args.judge_model,
        base_url=args.base_url,
        api_key_env=args.api_key_env,
        timeout=args.timeout,
        concurrency=args.concurrency,
        max_retries=args.max_retries,
        cache=cache,
    )
