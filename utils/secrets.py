"""Keep secrets out of manifests, results files and logs: redact by field name, by known formats, and by value.

A field named like a credential (``hub_token``, ``api_key``, ``Authorization``, ...) is replaced whatever its value;
inside any string, URL credentials (``https://user:pass@host``, ``?api_key=...``), ``Bearer ...`` headers, OpenAI
(``sk-...``) and Hugging Face (``hf_...``) tokens, and the value of any environment variable named like a secret
are replaced by ``<redacted>``.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

REDACTED = "<redacted>"

# a key that names a credential: "token", "hub_token", "api_key", "x-api-key", "Authorization", "password", ...
SECRET_KEY = re.compile(
    r"(?:^|[_-])(?:token|secret|password|passwd|api[_-]?key|apikey|authorization|credentials?|cookie|"
    r"private[_-]?key|access[_-]?key)$",
    re.IGNORECASE,
)
# tokenizer fields that end in "token" but hold a vocabulary entry, not a credential
NOT_SECRET_KEYS = {"pad_token", "bos_token", "eos_token", "unk_token", "sep_token", "cls_token", "mask_token"}
SECRET_ENV = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|CREDENTIALS?)", re.IGNORECASE)
_PATTERNS = [
    (re.compile(r"(://)[^/\s:@]+:[^/\s@]+@"), r"\1" + REDACTED + "@"),  # URL user:password@
    (
        re.compile(r"([?&](?:api[_-]?key|key|token|access_token|auth|sig|signature|password)=)[^&\s#\"']+", re.I),
        r"\1" + REDACTED,
    ),
    (re.compile(r"(\b(?:Bearer|Basic|Token)\s+)[A-Za-z0-9._~+/=-]{8,}", re.I), r"\1" + REDACTED),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), REDACTED),  # OpenAI-style keys
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}"), REDACTED),  # Hugging Face tokens
]
MIN_ENV_SECRET = 8  # shorter env values ("1", "true") would redact ordinary text


def is_secret_key(key: Any) -> bool:
    return isinstance(key, str) and key.lower() not in NOT_SECRET_KEYS and bool(SECRET_KEY.search(key))


def _env_secrets() -> list[str]:
    vals = {v for k, v in os.environ.items() if SECRET_ENV.search(k) and len(v) >= MIN_ENV_SECRET}
    return sorted(vals, key=len, reverse=True)


def redact_text(text: str, env_secrets: list[str] | None = None) -> str:
    """``text`` with every credential it holds replaced by ``<redacted>``."""
    for secret in _env_secrets() if env_secrets is None else env_secrets:
        text = text.replace(secret, REDACTED)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact(obj: Any, env_secrets: list[str] | None = None) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples, strings) with secret fields and secrets inside strings redacted.

    Example:
        >>> redact({"hub_token": "abc", "url": "https://u:p@h/x", "max_new_tokens": 5})
        {'hub_token': '<redacted>', 'url': 'https://<redacted>@h/x', 'max_new_tokens': 5}
    """
    env = _env_secrets() if env_secrets is None else env_secrets
    if isinstance(obj, dict):
        return {
            k: (REDACTED if is_secret_key(k) and v not in (None, "", False) else redact(v, env))
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return type(obj)(redact(v, env) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj, env)
    return obj


class RedactingFilter(logging.Filter):
    """A logging filter that redacts the formatted message (and drops the args it was formatted from)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed log call: leave it to the handler to report
            return True
        clean = redact_text(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = redact_text(text)
        return True
