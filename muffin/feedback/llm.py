"""How the divide and change-question stages ask their chat LM (``utils.chat_lm``, local or served): one greedy user
turn per record, and a record whose prompt gets no text fails alone with the reason, the others are written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from utils.chat_lm import ChatLM, ChatRequest
from utils.chat_lm.api import ApiChatLM
from utils.faults import call_per_record


def complete_texts(
    lm: ChatLM, prompts: Sequence[str], *, max_tokens: int, batch_size: int | None = None
) -> list[tuple[str | None, str | None]]:
    """``(text, None)`` per prompt, or ``(None, reason)``: the model answered with an error (a prompt over its
    context, a request that failed after its retries), or the batch raised a record fault that the prompt raises
    again alone (``utils.faults.call_per_record``)."""
    requests = [ChatRequest.chat(user=p, max_tokens=max_tokens) for p in prompts]
    who = "the server" if isinstance(lm, ApiChatLM) else "the model"
    out: list[tuple[str | None, str | None]] = []
    for resp, fault in call_per_record(lambda reqs: lm.complete(list(reqs), batch_size=batch_size), requests):
        if fault is not None:
            out.append((None, fault["reason"]))
        elif resp.error is not None or resp.text is None:
            out.append((None, f"{who} answered no text: {resp.error}"))
        else:
            out.append((resp.text, None))
    return out


def requests_made(lm: ChatLM | None) -> dict[str, Any]:
    """What a stage's manifest records of its chat LM's calls: its id and counters (calls, cache hits, retries)."""
    return {} if lm is None else {"chat_lm": lm.id, "requests": lm.stats.as_dict()}
