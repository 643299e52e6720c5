"""One chat-LM backend for the divide / change-question stages and the benchmark judges: a batch of chat requests in,
one response per request out (a text, or why there is none), through an on-disk request cache, with counters.

Backends: ``utils.chat_lm.hf.HFChatLM`` (a local Hugging Face causal LM) and ``utils.chat_lm.api.ApiChatLM`` (an
OpenAI-compatible server, retried). Prompt files and slot filling: ``utils.chat_lm.prompts``.
"""

from utils.chat_lm.base import ChatLM, ChatRequest, ChatResponse, ChatStats, cached_complete

__all__ = ["ChatLM", "ChatRequest", "ChatResponse", "ChatStats", "cached_complete"]
